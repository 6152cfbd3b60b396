"""Float8Linear: nn.Linear whose three GEMMs run in fp8 through one autograd.Function.

torch._scaled_mm has no autograd, so `_Float8LinearFn` does both gradient GEMMs itself:

    output      = x  @ W.t()       x (M, K) row-major,        W.t() (K, N) column-major (free view)
    grad_input  = gy @ W           gy (M, N) row-major,       W (N, K) -> column-major copy
    grad_weight = gy.t() @ x       gy.t() (N, M) -> row-major copy, x (M, K) -> column-major copy

Each operand is cast for the GEMM it feeds (its cast config says dtype, scaling type and
granularity; rowwise scales run along that GEMM's contracted dim). Every operand's casts are built by
`cast_both_orientations`: one amax pass (all scales of the operand, both orientations) and one cast
pass writing each layout needed at that point, so no cast is repeated and no fp8 tensor is transposed
in a separate pass.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .casting import OperandCasts, cast_both_orientations
from .config import Float8LinearConfig, Gemm, Operand
from .delayed import amax_buffer_name, record_amax, register_delayed_buffers, reset_delayed_buffers, scale_buffer_name
from .kernels import HAVE_TRITON
from .scaled_mm import MMConfig
from .scaling import tensor_amax
from .tensor import Float8TrainingTensor

logger = logging.getLogger(__name__)

_MAIN_GEMM = {Operand.INPUT: Gemm.OUTPUT, Operand.WEIGHT: Gemm.OUTPUT, Operand.GRAD_OUTPUT: Gemm.GRAD_INPUT}
_OTHER_GEMM = {Operand.INPUT: Gemm.GRAD_WEIGHT, Operand.WEIGHT: Gemm.GRAD_INPUT, Operand.GRAD_OUTPUT: Gemm.GRAD_WEIGHT}
_CACHE_BUFFERS = ("float8_weight_cache", "float8_weight_cache_scale", "float8_weight_cache_t", "float8_weight_cache_t_scale")


def unconvertible_reason(linear: nn.Linear) -> Optional[str]:
    """Why ``linear`` cannot become a Float8Linear, or None."""
    if linear.in_features % 16 or linear.out_features % 16:
        return (
            f"in_features={linear.in_features} and out_features={linear.out_features} must be multiples of 16 "
            "(torch._scaled_mm contract)"
        )
    if linear.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {linear.weight.dtype} is not bf16/fp16/fp32"
    if type(linear.weight).__name__ == "DTensor" or hasattr(linear.weight, "device_mesh"):
        return "the weight is already a DTensor: convert to float8 before applying FSDP/TP"
    return None


def _mm_config(config: Float8LinearConfig, gemm: Gemm) -> MMConfig:
    return MMConfig(emulate=config.emulate, use_fast_accum=config.gemm_config(gemm).use_fast_accum)


def _fp8_config(config: Float8LinearConfig, operand: Operand, gemm: Gemm):
    """The operand's cast config for ``gemm``, or None when that GEMM runs in high precision."""
    cc = config.cast_config(operand, gemm)
    return cc if cc.enabled else None


def _cast_backend(config: Float8LinearConfig, operand: Operand, *, main: bool, other: Optional[str],
                  other_scale: Optional[torch.Tensor]) -> str:
    """Where a cast runs. The Triton kernels earn their keep on activations, whose amax pass they fuse
    (rows and columns in one read); under torch.compile everything else stays in torch ops for inductor."""
    if config.cast_backend == "torch" or not torch.compiler.is_compiling():
        return config.cast_backend  # eager: the Triton kernel is one launch where torch ops are several
    # The backward's recast with the scale the forward computed is one pointwise op, which inductor fuses
    # into the kernel that recomputes its input (RMSNorm, SwiGLU), so the partitioner keeps nothing for it.
    # As an opaque Triton op it pinned its bf16 input (or, with save_float8_for_backward, an fp8 copy) in
    # memory until backward: rowwise peak 0.955x -> 0.89x bf16 at 1.177x vs 1.184x (H100).
    backward_recast = not main and other == "data" and other_scale is not None
    # A weight has no producer kernel to fuse with, and is small next to the activations: the Triton kernels
    # save little GPU time on it but each launch costs host time (custom op + autotuner + Triton launcher),
    # which isolated or small Linears wait for (H100 per-Linear rowwise 4096x4096: 0.95x -> 1.06x bf16).
    if backward_recast or operand is Operand.WEIGHT:
        return "torch"
    return config.cast_backend


def _cast(
    t: torch.Tensor,
    operand: Operand,
    config: Float8LinearConfig,
    *,
    main: bool,
    other: Optional[str],  # None, "scale" (the other orientation's scale only) or "data"
    main_scale: Optional[torch.Tensor] = None,
    other_scale: Optional[torch.Tensor] = None,
    need_amax: bool = False,
) -> OperandCasts:
    """Cast a 2-D operand for its main GEMM and/or its other GEMM (see casting.cast_both_orientations)."""
    main_gemm, other_gemm = _MAIN_GEMM[operand], _OTHER_GEMM[operand]
    backend = _cast_backend(config, operand, main=main, other=other, other_scale=other_scale)
    return cast_both_orientations(
        t,
        _fp8_config(config, operand, main_gemm) if main else None,
        _fp8_config(config, operand, other_gemm) if other else None,
        role=operand,
        main_gemm=main_gemm,
        other_gemm=other_gemm,
        main_mm=_mm_config(config, main_gemm),
        other_mm=_mm_config(config, other_gemm),
        write_other=other == "data",
        main_scale=main_scale,
        other_scale=other_scale,
        need_amax=need_amax,
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
        backend=backend,
    )


def _retag(t: Float8TrainingTensor, operand: Operand, gemm: Gemm, config: Float8LinearConfig) -> Float8TrainingTensor:
    """An existing fp8 tensor (FSDP's all-gathered weight) as the ``operand`` of ``gemm``."""
    return t._with(t._data, t._scale, role=operand, gemm=gemm, mm_config=_mm_config(config, gemm))


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _pad_contracted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the contracted dim of ``a @ b`` to a multiple of 16 (exact: zeros add nothing).
    Needed for grad_weight, whose contracted dim is the token count M."""
    pad = -a.shape[1] % 16
    if pad == 0:
        return a, b
    return torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, 0, 0, pad))


def _high_precision(t: torch.Tensor) -> torch.Tensor:
    return t.to_original_precision() if isinstance(t, Float8TrainingTensor) else t


def forward_amax_operands(config: Float8LinearConfig, weight_is_float8: bool, weight_cached: bool) -> tuple[Operand, ...]:
    """The delayed-scaling amaxes `_Float8LinearFn.forward` returns after its output, in order. The
    weight's is measured elsewhere when it arrives in fp8 (FSDP pre-all-gather) or from the cache."""
    delayed = config.delayed_operands()
    ops = []
    if Operand.INPUT in delayed:
        ops.append(Operand.INPUT)
    if Operand.WEIGHT in delayed and not weight_is_float8 and not weight_cached:
        ops.append(Operand.WEIGHT)
    return tuple(ops)


class _Float8LinearFn(torch.autograd.Function):
    """out = x @ W.t() with fp8 GEMMs forward and backward.

    Passes over the activations (per operand: one amax pass unless the scale is known, then one cast
    pass writing every layout needed at that point):
      forward:  x -> x8 row-major (+ its transposed copy, saved for grad_weight, with
                save_float8_for_backward); W -> W8 row-major. The other orientation's scales are
                computed in the same amax pass and saved (tiny).
      backward: gy -> gy8 row-major + transposed copy in one pass; W -> W8 transposed copy with the saved
                scale (one pass; or from the weight cache); x -> x8 transposed copy with the saved scale
                (one pass; none with save_float8_for_backward).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,  # (M, K) high precision
        weight: torch.Tensor,  # (N, K) high precision, or Float8TrainingTensor from an fp8 all-gather
        config: Float8LinearConfig,
        scale_input: Optional[torch.Tensor],  # delayed scales (None: dynamic)
        scale_weight: Optional[torch.Tensor],
        scale_grad_output: Optional[torch.Tensor],
        amax_grad_output: Optional[torch.Tensor],  # delayed: buffer the backward records gy's amax into
        w8: Optional[torch.Tensor],  # weight cache (reuse_float8_weight): fp8 (N, K) row-major,
        w8_scale: Optional[torch.Tensor],  # its scale,
        w8_t: Optional[torch.Tensor],  # fp8 (K, N) contiguous for grad_input,
        w8_t_scale: Optional[torch.Tensor],  # its scale
        backward_needed: bool,  # False under no_grad: nothing is prepared for a backward
    ):
        weight_is_fp8 = isinstance(weight, Float8TrainingTensor)
        amax_ops = forward_amax_operands(config, weight_is_fp8, w8 is not None)
        amaxes = {}
        x_saved, x_other_scale, w_other_scale = x, None, None
        x_is_fp8 = False
        if config.gemm_in_float8(Gemm.OUTPUT):
            x_other = _fp8_config(config, Operand.INPUT, Gemm.GRAD_WEIGHT) if backward_needed else None
            x_is_fp8 = config.save_float8_for_backward and x_other is not None and weight.requires_grad
            xc = _cast(
                x, Operand.INPUT, config, main=True,
                other="data" if x_is_fp8 else ("scale" if x_other is not None else None),
                main_scale=scale_input, other_scale=scale_input, need_amax=Operand.INPUT in amax_ops,
            )  # (M, K)
            if x_is_fp8:
                x_saved = xc.other  # (M, K) column-major fp8, exactly what grad_weight consumes
            x_other_scale = xc.other_scale
            amaxes[Operand.INPUT] = xc.amax

            if weight_is_fp8:
                w_main = _retag(weight, Operand.WEIGHT, Gemm.OUTPUT, config)
            elif w8 is not None:
                w_main = Float8TrainingTensor(
                    w8, w8_scale, weight.dtype, Operand.WEIGHT, Gemm.OUTPUT,
                    None if w8_scale.dim() == 0 else 1, _mm_config(config, Gemm.OUTPUT),
                )
            else:
                w_other = _fp8_config(config, Operand.WEIGHT, Gemm.GRAD_INPUT) if backward_needed else None
                wc = _cast(
                    weight, Operand.WEIGHT, config, main=True, other="scale" if w_other is not None else None,
                    main_scale=scale_weight, other_scale=scale_weight, need_amax=Operand.WEIGHT in amax_ops,
                )  # (N, K)
                w_main, w_other_scale = wc.main, wc.other_scale
                amaxes[Operand.WEIGHT] = wc.amax
            out = torch.mm(xc.main, w_main.t())  # (M, N)
        else:
            out = torch.mm(x, _high_precision(weight).t().to(x.dtype))
        ctx.config = config
        ctx.amax_grad_output = amax_grad_output
        ctx.x_is_fp8 = x_is_fp8
        ctx.save_for_backward(x_saved, weight, x_other_scale, w_other_scale, scale_grad_output, w8_t, w8_t_scale)
        extra = [amaxes[op] for op in amax_ops]
        ctx.mark_non_differentiable(*extra)
        return (out, *extra)

    @staticmethod
    def backward(ctx, gy: torch.Tensor, *unused):  # gy: (M, N)
        x, weight, x_other_scale, w_other_scale, scale_grad_output, w8_t, w8_t_scale = ctx.saved_tensors
        config: Float8LinearConfig = ctx.config
        gy = gy.contiguous()
        need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx_fp8 = need_gx and config.gemm_in_float8(Gemm.GRAD_INPUT)
        gw_fp8 = need_gw and config.gemm_in_float8(Gemm.GRAD_WEIGHT)
        record = ctx.amax_grad_output is not None
        grad_x = grad_w = None

        gyc = None
        if gx_fp8 or gw_fp8:
            # Both layouts of gy in one pass: row-major for grad_input, transposed for grad_weight.
            gyc = _cast(
                gy, Operand.GRAD_OUTPUT, config, main=gx_fp8, other="data" if gw_fp8 else None,
                main_scale=scale_grad_output, other_scale=scale_grad_output, need_amax=record,
            )

        if need_gx:
            if gx_fp8:
                if isinstance(weight, Float8TrainingTensor):
                    w_gi = _retag(weight, Operand.WEIGHT, Gemm.GRAD_INPUT, config)
                elif w8_t is not None:
                    w_gi = Float8TrainingTensor(
                        w8_t.t(), w8_t_scale, weight.dtype, Operand.WEIGHT, Gemm.GRAD_INPUT,
                        None if w8_t_scale.dim() == 0 else 0, _mm_config(config, Gemm.GRAD_INPUT),
                    )
                else:
                    w_gi = _cast(weight, Operand.WEIGHT, config, main=False, other="data", other_scale=w_other_scale).other
                grad_x = torch.mm(gyc.main, _col_major(w_gi))  # (M, K)
            else:
                grad_x = torch.mm(gy, _high_precision(weight).to(gy.dtype))

        if need_gw:
            w_dtype = weight.dtype
            if gw_fp8:
                x_gw = x if ctx.x_is_fp8 else _cast(x, Operand.INPUT, config, main=False, other="data",
                                                    other_scale=x_other_scale).other  # (M, K) column-major
                a, b = _pad_contracted(gyc.other.t(), x_gw)  # (N, M'), (M', K)
                grad_w = torch.mm(a.contiguous(), _col_major(b)).to(w_dtype)  # (N, K)
            else:
                grad_w = torch.mm(gy.t(), _high_precision(x).to(gy.dtype)).to(w_dtype)

        if record:
            amax = gyc.amax if gyc is not None and gyc.amax is not None else tensor_amax(gy)
            record_amax(ctx.amax_grad_output, amax)
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None


class Float8Linear(nn.Linear):
    """nn.Linear training in float8. Build with ``Float8Linear.from_float(linear, config)`` (keeps
    the Linear's parameter objects) or directly like nn.Linear plus ``config=``."""

    def __init__(self, *args, config: Optional[Float8LinearConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_float8(config or Float8LinearConfig())

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Optional[Float8LinearConfig] = None) -> "Float8Linear":
        reason = unconvertible_reason(linear)
        if reason is not None:
            raise ValueError(f"cannot convert {linear} to Float8Linear: {reason}")
        # Bypass nn.Linear.__init__: no fresh weights to allocate and initialise, just adopt the
        # existing Parameters (an optimizer holding them keeps working).
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new._init_float8(config or Float8LinearConfig())
        return new

    def _init_float8(self, config: Float8LinearConfig) -> None:
        if not isinstance(config, Float8LinearConfig):
            raise ValueError(f"Float8Linear config must be a Float8LinearConfig, got {type(config).__name__}")
        reason = unconvertible_reason(self)
        if reason is not None:
            raise ValueError(f"Float8Linear({self.in_features}, {self.out_features}): {reason}")
        self.config = config
        register_delayed_buffers(self, config, self.weight.device)
        # reuse_float8_weight: a Python bool, so compiled code specialises on it (a second graph for
        # forwards outside a precompute/invalidate bracket, e.g. validation).
        self.float8_weight_cache_valid = False
        self._float8_weight_cache_version = -1
        if config.cast_backend != "torch" and not HAVE_TRITON:
            logger.warning("float8 cast_backend='triton' but Triton is not importable: casts run the torch "
                           "reference math (same results, not the fused kernels)")
        if config.enable_fsdp_float8_all_gather:
            from .fsdp import wrap_weight_for_fsdp_float8_all_gather

            wrap_weight_for_fsdp_float8_all_gather(self)

    def reset_float8_buffers(self) -> None:
        """Initialise the delayed-scaling buffers (call after materialising a meta-device model)."""
        reset_delayed_buffers(self)
        self.invalidate_float8_weight_cache()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float8=({self.config.short_str()})"

    # ------------------------------------------------------------------ weight reuse across micro-batches

    @torch.no_grad()
    def precompute_float8_weight(self) -> None:
        """Cast the weight to fp8 in both layouts now and use these casts in every forward/backward until
        ``invalidate_float8_weight_cache()`` (call once per optimizer step, before the first micro-batch;
        ``precompute_float8_weights(model)`` does it for a whole model). Requires reuse_float8_weight."""
        if not self.config.reuse_float8_weight:
            raise ValueError("precompute_float8_weight needs Float8LinearConfig.reuse_float8_weight=True")
        w = self.weight
        if isinstance(w, Float8TrainingTensor) or type(w).__name__ == "DTensor" or hasattr(w, "device_mesh"):
            raise ValueError("reuse_float8_weight does not support sharded (FSDP/DTensor) or fp8-gathered weights")
        if not (self.config.gemm_in_float8(Gemm.OUTPUT) and self.config.gemm_in_float8(Gemm.GRAD_INPUT)):
            raise ValueError("reuse_float8_weight needs both weight GEMMs in fp8")
        w = w.detach()
        scale = None
        if Operand.WEIGHT in self.config.delayed_operands():
            if self.float8_amax_initialized:
                scale = getattr(self, scale_buffer_name(Operand.WEIGHT))
        wc = _cast(w, Operand.WEIGHT, self.config, main=True, other="data", main_scale=scale, other_scale=scale,
                   need_amax=Operand.WEIGHT in self.config.delayed_operands())
        if wc.amax is not None:
            record_amax(getattr(self, amax_buffer_name(Operand.WEIGHT)), wc.amax)
        new = (wc.main._data, wc.main._scale, wc.other._data.t(), wc.other._scale)  # (N, K), s, (K, N), s
        old = [getattr(self, name, None) for name in _CACHE_BUFFERS]
        if all(o is not None and o.shape == n.shape and o.dtype == n.dtype for o, n in zip(old, new)):
            for o, n in zip(old, new):  # same storage: compiled graphs keep their inputs
                o.copy_(n)
        else:
            for name, n in zip(_CACHE_BUFFERS, new):
                # Own storage each (tensorwise shares one scale object; compiled autograd.Functions refuse
                # the same tensor as two inputs).
                self.register_buffer(name, n.contiguous().clone(), persistent=False)
        self._float8_weight_cache_version = self.weight._version
        self.float8_weight_cache_valid = True

    def invalidate_float8_weight_cache(self) -> None:
        """Back to casting the weight in every forward (call after optimizer.step())."""
        self.float8_weight_cache_valid = False

    def _weight_cache(self):
        if not self.float8_weight_cache_valid:
            return None, None, None, None
        if not torch.compiler.is_compiling() and self.weight._version != self._float8_weight_cache_version:
            raise RuntimeError(
                "Float8Linear: the weight changed after precompute_float8_weight() (reuse_float8_weight); call "
                "invalidate_float8_weight_cache() after optimizer.step() and precompute again before the next step"
            )
        return tuple(getattr(self, name) for name in _CACHE_BUFFERS)

    # ------------------------------------------------------------------ forward

    def _delayed_scaling_args(self):
        """Delayed scales to cast with (None = dynamic) and the buffer gy's amax goes to."""
        delayed = self.config.delayed_operands()
        if not delayed:
            return None, None, None, None
        use_history = self.float8_amax_initialized
        scales = [
            getattr(self, scale_buffer_name(op)) if (op in delayed and use_history) else None
            for op in (Operand.INPUT, Operand.WEIGHT, Operand.GRAD_OUTPUT)
        ]
        amax_go = getattr(self, amax_buffer_name(Operand.GRAD_OUTPUT)) if Operand.GRAD_OUTPUT in delayed else None
        return (*scales, amax_go)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(input.device.type):
            input = input.to(torch.get_autocast_dtype(input.device.type))
        x2d = input.reshape(-1, self.in_features)  # (B*T, K)
        cache = self._weight_cache()
        backward_needed = torch.is_grad_enabled() and (x2d.requires_grad or self.weight.requires_grad)
        out, *amaxes = _Float8LinearFn.apply(
            x2d, self.weight, self.config, *self._delayed_scaling_args(), *cache, backward_needed
        )
        # Delayed scaling: the amaxes measured in the cast passes themselves (single pass over the data).
        weight_is_fp8 = isinstance(self.weight, Float8TrainingTensor)
        for op, amax in zip(forward_amax_operands(self.config, weight_is_fp8, cache[0] is not None), amaxes):
            record_amax(getattr(self, amax_buffer_name(op)), amax)
        out = out.reshape(*input.shape[:-1], self.out_features)  # (B, T, N)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out


def precompute_float8_weights(model: nn.Module) -> int:
    """Cast every ``reuse_float8_weight`` Float8Linear weight of ``model`` to fp8 (both layouts) for reuse in
    all micro-batches of the coming optimizer step. Call before the step's first forward; call
    ``invalidate_float8_weights(model)`` after ``optimizer.step()``. Returns how many weights were cast."""
    n = 0
    for m in model.modules():
        if isinstance(m, Float8Linear) and m.config.reuse_float8_weight:
            m.precompute_float8_weight()
            n += 1
    return n


def invalidate_float8_weights(model: nn.Module) -> None:
    """After ``optimizer.step()``: forwards cast the (new) weights again until the next precompute."""
    for m in model.modules():
        if isinstance(m, Float8Linear):
            m.invalidate_float8_weight_cache()
