"""Float8Linear: nn.Linear whose three GEMMs run in fp8 through one autograd.Function.

torch._scaled_mm has no autograd, so `_Float8LinearFn` does both gradient GEMMs itself:

    output      = x  @ W.t()       x (M, K) row-major,        W.t() (K, N) column-major (free view)
    grad_input  = gy @ W           gy (M, N) row-major,       W (N, K) -> column-major copy
    grad_weight = gy.t() @ x       gy.t() (N, M) -> row-major copy, x (M, K) -> column-major copy

Each operand is cast for the GEMM it feeds (its cast config says dtype, scaling type and
granularity; rowwise scales run along that GEMM's contracted dim). Tensorwise casts that would be
repeated (same config, same scale) are reused: only their layout changes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .casting import cast_to_float8
from .config import Float8LinearConfig, Gemm, Operand, ScalingGranularity
from .delayed import amax_buffer_name, record_amax, register_delayed_buffers, reset_delayed_buffers, scale_buffer_name
from .scaled_mm import MMConfig
from .scaling import tensor_amax
from .tensor import Float8TrainingTensor

# The contracted dimension of each (operand, GEMM) pair, in the operand's own (un-transposed) layout.
_CONTRACTED_DIM = {
    (Operand.INPUT, Gemm.OUTPUT): 1,
    (Operand.WEIGHT, Gemm.OUTPUT): 1,
    (Operand.GRAD_OUTPUT, Gemm.GRAD_INPUT): 1,
    (Operand.WEIGHT, Gemm.GRAD_INPUT): 0,
    (Operand.GRAD_OUTPUT, Gemm.GRAD_WEIGHT): 0,
    (Operand.INPUT, Gemm.GRAD_WEIGHT): 0,
}
_OTHER_GEMM = {Operand.INPUT: Gemm.GRAD_WEIGHT, Operand.WEIGHT: Gemm.GRAD_INPUT, Operand.GRAD_OUTPUT: Gemm.GRAD_WEIGHT}


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


def _reusable(config: Float8LinearConfig, operand: Operand) -> bool:
    """True when the operand's second-orientation cast equals its first: same tensorwise config,
    hence the same scale and the same fp8 bytes."""
    main_gemm = Gemm.GRAD_INPUT if operand is Operand.GRAD_OUTPUT else Gemm.OUTPUT
    main, other = config.cast_config(operand, main_gemm), config.cast_config(operand, _OTHER_GEMM[operand])
    return main == other and main.enabled and main.scaling_granularity is ScalingGranularity.TENSORWISE


def _to_float8(
    t: torch.Tensor, operand: Operand, gemm: Gemm, config: Float8LinearConfig, scale: Optional[torch.Tensor] = None
) -> Float8TrainingTensor:
    """Cast ``t`` (or re-tag an existing fp8 tensor) as the ``operand`` of ``gemm``."""
    mm_config = _mm_config(config, gemm)
    if isinstance(t, Float8TrainingTensor):
        return t._with(t._data, t._scale, role=operand, gemm=gemm, mm_config=mm_config)
    return cast_to_float8(
        t,
        config.cast_config(operand, gemm),
        role=operand,
        gemm=gemm,
        axis=_CONTRACTED_DIM[(operand, gemm)],
        scale=scale,
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
        mm_config=mm_config,
    )


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


class _Float8LinearFn(torch.autograd.Function):
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
    ) -> torch.Tensor:
        if config.gemm_in_float8(Gemm.OUTPUT):
            x_fp8 = _to_float8(x, Operand.INPUT, Gemm.OUTPUT, config, scale_input)  # (M, K)
            w_fp8 = _to_float8(weight, Operand.WEIGHT, Gemm.OUTPUT, config, scale_weight)  # (N, K)
            out = torch.mm(x_fp8, w_fp8.t())  # (M, N)
            # Tensorwise: the backward recast would use the same scale, so keep it (0-d, cheap)
            # instead of recomputing the amax; or keep the fp8 bytes themselves if configured.
            if _reusable(config, Operand.INPUT):
                scale_input = x_fp8._scale
            if _reusable(config, Operand.WEIGHT) and not isinstance(weight, Float8TrainingTensor):
                # (An fp8-all-gathered weight is reused as is; FSDP refreshes its scale in place.)
                scale_weight = w_fp8._scale
            if config.save_float8_for_backward:
                x, weight = x_fp8, w_fp8
        else:
            out = torch.mm(x, _high_precision(weight).t().to(x.dtype))
        ctx.config = config
        ctx.amax_grad_output = amax_grad_output
        ctx.save_for_backward(x, weight, scale_input, scale_weight, scale_grad_output)
        return out

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # gy: (M, N)
        x, weight, scale_input, scale_weight, scale_grad_output = ctx.saved_tensors
        config: Float8LinearConfig = ctx.config
        gy = gy.contiguous()
        grad_x = grad_w = None
        gy_fp8 = None

        if ctx.needs_input_grad[0]:
            if config.gemm_in_float8(Gemm.GRAD_INPUT):
                gy_fp8 = _to_float8(gy, Operand.GRAD_OUTPUT, Gemm.GRAD_INPUT, config, scale_grad_output)  # (M, N)
                w_fp8 = _to_float8(weight, Operand.WEIGHT, Gemm.GRAD_INPUT, config, scale_weight)  # (N, K)
                grad_x = torch.mm(gy_fp8, _col_major(w_fp8))  # (M, K)
            else:
                grad_x = torch.mm(gy, _high_precision(weight).to(gy.dtype))

        if ctx.needs_input_grad[1]:
            w_dtype = weight.dtype
            if config.gemm_in_float8(Gemm.GRAD_WEIGHT):
                if gy_fp8 is not None and _reusable(config, Operand.GRAD_OUTPUT):
                    gy_gw = _to_float8(gy_fp8, Operand.GRAD_OUTPUT, Gemm.GRAD_WEIGHT, config)
                else:
                    gy_gw = _to_float8(gy, Operand.GRAD_OUTPUT, Gemm.GRAD_WEIGHT, config, scale_grad_output)
                x_gw = _to_float8(x, Operand.INPUT, Gemm.GRAD_WEIGHT, config, scale_input)  # (M, K)
                a, b = _pad_contracted(gy_gw.t(), x_gw)  # (N, M'), (M', K)
                grad_w = torch.mm(a.contiguous(), _col_major(b)).to(w_dtype)  # (N, K)
            else:
                grad_w = torch.mm(gy.t(), _high_precision(x).to(gy.dtype)).to(w_dtype)

        if ctx.amax_grad_output is not None:
            record_amax(ctx.amax_grad_output, tensor_amax(gy))
        return grad_x, grad_w, None, None, None, None, None


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
        if config.enable_fsdp_float8_all_gather:
            from .fsdp import wrap_weight_for_fsdp_float8_all_gather

            wrap_weight_for_fsdp_float8_all_gather(self)

    def reset_float8_buffers(self) -> None:
        """Initialise the delayed-scaling buffers (call after materialising a meta-device model)."""
        reset_delayed_buffers(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float8=({self.config.short_str()})"

    def _delayed_scaling_args(self, x2d: torch.Tensor):
        """Scales to cast with (None = dynamic); records this step's amaxes of x and W."""
        delayed = self.config.delayed_operands()
        if not delayed:
            return None, None, None, None
        if Operand.INPUT in delayed:
            record_amax(getattr(self, amax_buffer_name(Operand.INPUT)), tensor_amax(x2d.detach()))
        if Operand.WEIGHT in delayed and not isinstance(self.weight, Float8TrainingTensor):
            # (An fp8-all-gathered weight had its amax recorded by fsdp_pre_all_gather.)
            record_amax(getattr(self, amax_buffer_name(Operand.WEIGHT)), tensor_amax(self.weight.detach()))
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
        out = _Float8LinearFn.apply(x2d, self.weight, self.config, *self._delayed_scaling_args(x2d))
        out = out.reshape(*input.shape[:-1], self.out_features)  # (B, T, N)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out
