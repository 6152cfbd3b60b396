"""QAT fake-quantised modules and the model-level passes: prepare (QAT), quantise (PTQ / QAT convert),
pick kernels for inference, measure weight memory.

Which modules: every `nn.Linear` and `nn.Embedding` whose fully qualified name contains none of
`filter_fqns` and whose rows split into whole groups (`in_features % group_size == 0`). One rule,
`skip_reason`, serves QAT prepare and PTQ, so QAT trains exactly the modules export quantises.
Skipped modules are logged with the reason, never silently.

Fake quantisation (`FakeQuantLinear`, `FakeQuantEmbedding`) keeps the parameter names of the module it
replaces (`weight`, `bias`), so state_dict keys and checkpoints are unchanged; it adds no saved buffers.

    forward(x) = F.linear(fake_quantize(x, scheme.activation), fake_quantize(weight, scheme.weight), bias)

with `fake_quantize` = the serving format's dequantize(quantize(.)) and a straight-through gradient.
Called with labels (the model's output head, in training), it returns the mean cross-entropy of that
output through titan_fp8.loss's fused head + loss instead of the logits.

Range learning (`range_learning=True`, symmetric integer weights: 8da4w, int8_weight_only) adds one
trainable parameter per module, `weight_scale` (rows x groups, fp32): the weight's quantisation scales,
trained with the LSQ gradient instead of recomputed from the weight's range every step. It starts at
zero = "not initialised"; `initialize_learned_scales_` sets it when fake quantisation first switches on:
to the range-based scales (amax / 7.5 for int4; QAT then starts exactly where plain QAT does), or to the
clipped scales with the least squared error of the weights ("mse") or of the layer's output
("activation_mse": weighted by the inputs' per-feature mean squares, which `calibrate_learned_scales_`
collects over one forward of the float model into a Linear's unsaved `input_sq_sum` buffer). Convert
stores the learned scales in the QuantizedTensor.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_fp8.loss import head_loss

from .primitives import fake_quantize, fake_quantize_learned_scale
from .schemes import QuantScheme
from .tensor import QuantizedTensor, choose_kernel

__all__ = ["FakeQuantLinear", "FakeQuantEmbedding", "QuantReport", "skip_reason", "prepare_qat_",
           "set_fake_quant_", "reset_learned_scales_", "initialize_learned_scales_", "quantize_", "prepare_for_inference_",
           "weight_memory_bytes", "LEARNED_SCALE_NAME"]

LEARNED_SCALE_NAME = "weight_scale"  # the range-learning parameter of a fake-quantised module
INPUT_SQ_NAME = "input_sq_sum"  # a range-learning Linear's calibration statistics (buffer, not saved)
SCALE_INITS = ("range", "mse", "activation_mse")  # how learned scales start (initialize_learned_scales_)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantReport:
    """What a pass did: converted {fqn: scheme or kernel}, skipped {fqn: reason}."""

    converted: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def log(self, what: str) -> None:
        logger.info("%s: %d modules converted, %d skipped", what, len(self.converted), len(self.skipped))
        for fqn, reason in self.skipped.items():
            logger.info("%s: kept %s in high precision (%s)", what, fqn, reason)


def skip_reason(module: nn.Module, fqn: str, scheme: QuantScheme, filter_fqns: Iterable[str]) -> Optional[str]:
    """None if `module` is quantised under `scheme`, else why not."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return "not a Linear or Embedding"
    hit = next((f for f in filter_fqns if f and f in fqn), None)
    if hit is not None:
        return f"filter_fqns entry {hit!r}"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "embedding with max_norm"
    k = module.weight.shape[-1]
    g = scheme.weight.group_size
    if g and k % g != 0:
        return f"row length {k} is not a multiple of group_size {g}"
    return None


# --------------------------------------------------------------------------------------------------
# Fake-quantised modules
# --------------------------------------------------------------------------------------------------


def _check_range_learning(scheme: QuantScheme) -> None:
    if not scheme.weight.supports_learned_scale:
        raise ValueError(f"range learning needs symmetric integer weights (int8_dynamic_activation_int4_weight, "
                         f"int8_weight_only), not {scheme.name}")


def _register_learned_scale(module: nn.Module, weight: torch.Tensor, scheme: QuantScheme, range_learning: bool) -> None:
    if not range_learning:
        module.register_parameter(LEARNED_SCALE_NAME, None)
        return
    _check_range_learning(scheme)
    fmt = scheme.weight
    rows, k = weight.shape
    # Zero = not initialised yet (initialize_learned_scales_); on the meta device while the model is.
    scale = torch.zeros(rows, fmt.groups(k), dtype=torch.float32, device=weight.device)
    module.register_parameter(LEARNED_SCALE_NAME, nn.Parameter(scale))
    if isinstance(module, nn.Linear):
        # Sum over calibration tokens of each input feature's square (calibrate_learned_scales_); not saved:
        # it is read once, when the scales start.
        module.register_buffer(INPUT_SQ_NAME, torch.zeros(k, dtype=torch.float32, device=weight.device),
                               persistent=False)


def _fake_quantize_weight(module: nn.Module, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    fmt = module.scheme.weight
    return fake_quantize(weight, fmt) if scale is None else fake_quantize_learned_scale(weight, scale, fmt)


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose weight (and, for dynamic-activation schemes, input) pass through fake quantisation."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], scheme: QuantScheme, *,
                 range_learning: bool = False):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.scheme = scheme
        self.register_buffer(INPUT_SQ_NAME, None, persistent=False)
        _register_learned_scale(self, weight, scheme, range_learning)
        self.fake_quant_enabled = True  # a plain attribute: not in the state dict
        self.calibrating = False  # calibrate_learned_scales_: accumulate input statistics in this forward

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, *, range_learning: bool = False) -> "FakeQuantLinear":
        # The same Parameter objects: no copy, meta stays meta.
        return cls(linear.weight, linear.bias, scheme, range_learning=range_learning)

    # As the model's OutputHead: called with labels, the layer returns the mean cross-entropy of its output
    # without a second logits-sized buffer (titan_fp8.loss). Only an output head is ever called so.
    accepts_labels = True
    compile_loss: bool = False

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight
        if self.calibrating:
            self.input_sq_sum.add_(x.detach().float().square().reshape(-1, x.shape[-1]).sum(0))
        if self.fake_quant_enabled:
            act = self.scheme.activation
            if act is not None:
                x = fake_quantize(x, act)
            weight = _fake_quantize_weight(self, weight, self.weight_scale)
        if labels is None:
            return F.linear(x, weight, self.bias)
        if self.bias is not None:
            raise NotImplementedError("FakeQuantLinear(labels=...): the fused loss has no bias term")
        return head_loss(x, weight, labels, compiled=self.compile_loss)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, group_size={self.scheme.group_size}, " \
               f"range_learning={self.weight_scale is not None}, " \
               f"fake_quant={'on' if self.fake_quant_enabled else 'off'}"


class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose looked-up rows are fake-quantised with the scheme's weight format.

    Groups run along each row, so quantising the gathered rows equals quantising the table first.
    """

    def __init__(self, embedding: nn.Embedding, scheme: QuantScheme, *, range_learning: bool = False):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        self.scheme = scheme
        _register_learned_scale(self, embedding.weight, scheme, range_learning)
        self.fake_quant_enabled = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)
        if not self.fake_quant_enabled:
            return rows
        scales = None if self.weight_scale is None else F.embedding(input, self.weight_scale)  # each row's scales
        return _fake_quantize_weight(self, rows, scales)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, fake_quant={'on' if self.fake_quant_enabled else 'off'}"


_FAKE_QUANT = (FakeQuantLinear, FakeQuantEmbedding)


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------


def prepare_qat_(model: nn.Module, scheme: QuantScheme, filter_fqns: Iterable[str] = (), *,
                 range_learning: bool = False) -> QuantReport:
    """Swap eligible Linears/Embeddings for fake-quantised ones, in place (works on the meta device).

    range_learning: each one also gets a trainable `weight_scale` (see the module docstring)."""
    filter_fqns = list(filter_fqns)
    if range_learning:
        _check_range_learning(scheme)
    report = QuantReport()
    for fqn, module in list(model.named_modules()):
        if isinstance(module, _FAKE_QUANT) or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        reason = skip_reason(module, fqn, scheme, filter_fqns)
        if reason is not None:
            report.skipped[fqn] = reason
            continue
        new = FakeQuantLinear.from_linear(module, scheme, range_learning=range_learning) \
            if isinstance(module, nn.Linear) else FakeQuantEmbedding(module, scheme, range_learning=range_learning)
        _set_submodule(model, fqn, new)
        report.converted[fqn] = scheme.name
    return report


def set_fake_quant_(model: nn.Module, enabled: bool) -> int:
    """Switch fake quantisation on or off in every fake-quantised module; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, _FAKE_QUANT):
            m.fake_quant_enabled = enabled
            n += 1
    return n


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t  # DTensor (FSDP): this rank's shard


def _learned_scales(model: nn.Module):
    """(module, its learned scale) for every fake-quantised module with range learning."""
    for m in model.modules():
        scale = getattr(m, LEARNED_SCALE_NAME, None) if isinstance(m, _FAKE_QUANT) else None
        if scale is not None:
            yield m, scale


@torch.no_grad()
def reset_learned_scales_(model: nn.Module) -> None:
    """Zero every learned scale (= not initialised) and its calibration statistics: after materialising a
    model, whose memory is garbage."""
    for m, scale in _learned_scales(model):
        _local(scale).zero_()
        if getattr(m, INPUT_SQ_NAME, None) is not None:
            getattr(m, INPUT_SQ_NAME).zero_()


def _uninitialised(scale: torch.Tensor) -> bool:
    local = _local(scale)
    return not local.numel() or bool((local == 0).all())


def count_uninitialised_learned_scales(model: nn.Module) -> int:
    return sum(_uninitialised(scale) for _, scale in _learned_scales(model))


# Clipping ratios the MSE searches try: scale = ratio * amax / half_range, ratio in [0.4, 1] in steps of 0.015.
_CLIP_RATIOS = tuple(0.4 + 0.015 * i for i in range(41))


def mse_scales(weight: torch.Tensor, fmt, col_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per group of `weight` (rows, K), the clipped scale (as stored) with the least squared quantisation error,
    each input column's error weighted by `col_weight` (K,) when given: with the inputs' mean squares that is
    the diagonal of the layer's output error (activation-aware), without it the error of the weights.

    Symmetric integer formats. A weight group's amax / half_range (the range-based scale) is ratio 1.0, so the
    result is never worse than the range-based scale on this measure."""
    wg = fmt._grouped(weight.detach().float())  # (rows, G, group)
    cw = 1.0 if col_weight is None else fmt._grouped(col_weight.detach().float().reshape(1, -1))  # (1, G, group)
    amax = wg.abs().amax(dim=-1)
    half_range = (fmt.qmax - fmt.qmin) / 2
    best_err = torch.full_like(amax, float("inf"))
    best = torch.empty_like(amax)  # every group takes ratio 1.0's scale in the first pass
    for ratio in (1.0,) + _CLIP_RATIOS[:-1]:  # 1.0 first: ties keep the range-based scale
        s = fmt.stored_scale(amax * ratio / half_range).float()
        q = torch.clamp(torch.round(wg / s.unsqueeze(-1)), fmt.qmin, fmt.qmax)
        err = (((q * s.unsqueeze(-1) - wg) ** 2) * cw).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


@torch.no_grad()
def initialize_learned_scales_(model: nn.Module, method: str = "range") -> int:
    """Set every learned scale that is still all zero; returns how many.

    method: "range" — the weight group's range (amax / 7.5 for int4: where plain QAT starts); "mse" — the
    clipped scale with the least squared weight error (`mse_scales`); "activation_mse" — the same error weighted
    per input feature by the inputs' mean squares that `calibrate_learned_scales_` collected (a Linear without
    statistics, and every embedding, falls back to "mse").

    Works shard by shard under FSDP: a weight (rows, K) and its scale (rows, groups) are sharded on the
    same rows, so each rank initialises its own rows with no communication (the calibration statistics are
    summed over ranks before). Scales loaded from a checkpoint (non-zero) are kept.
    """
    if method not in SCALE_INITS:
        raise ValueError(f"learned scale init: expected one of {', '.join(SCALE_INITS)}, got {method!r}")
    n = 0
    for m, scale in _learned_scales(model):
        local_scale, local_weight = _local(scale), _local(m.weight)
        if not _uninitialised(scale):
            continue
        if local_scale.shape[0] != local_weight.shape[0]:
            raise RuntimeError(f"learned scale shard has {local_scale.shape[0]} rows, its weight shard "
                               f"{local_weight.shape[0]}: they must be sharded alike")
        if local_weight.numel():
            fmt = m.scheme.weight
            if method == "range":
                local_scale.copy_(fmt.choose_qparams(local_weight)[0].float())
            else:
                stats = getattr(m, INPUT_SQ_NAME, None) if method == "activation_mse" else None
                has_stats = stats is not None and bool((stats > 0).any())
                local_scale.copy_(mse_scales(local_weight, fmt, stats if has_stats else None))
        n += 1
    return n


@torch.no_grad()
def calibrate_learned_scales_(model: nn.Module, run_forward: Callable[[], object], process_group=None) -> int:
    """Collect the inputs' per-feature mean squares of every fake-quantised Linear whose learned scale is still
    uninitialised, over one `run_forward()` (fake quantisation should be off: the statistics of the float
    model), summed over `process_group` when torch.distributed runs; returns how many Linears were calibrated.
    Then `initialize_learned_scales_(model, "activation_mse")` uses them."""
    modules = [m for m, scale in _learned_scales(model)
               if isinstance(m, FakeQuantLinear) and _uninitialised(scale)]
    if not modules:
        return 0
    for m in modules:
        getattr(m, INPUT_SQ_NAME).zero_()
        m.calibrating = True
    try:
        run_forward()
    finally:
        for m in modules:
            m.calibrating = False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stats = [getattr(m, INPUT_SQ_NAME) for m in modules]
        flat = torch.cat(stats)
        torch.distributed.all_reduce(flat, group=process_group)
        for t, part in zip(stats, flat.split([t.numel() for t in stats])):
            t.copy_(part)
    return len(modules)


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor (FSDP): gather the whole weight


def quantize_(model: nn.Module, scheme: Optional[QuantScheme] = None, filter_fqns: Iterable[str] = (), *,
              dtype: Optional[torch.dtype] = None) -> QuantReport:
    """Replace weights by QuantizedTensors, in place: the QAT convert and PTQ in one pass.

    Fake-quantised modules become plain nn.Linear / nn.Embedding holding a QuantizedTensor of their own
    scheme. If `scheme` is given, eligible plain Linears/Embeddings are quantised with it too (PTQ).
    dtype: logical/compute dtype of the quantised weights (default: each weight's own dtype).
    """
    filter_fqns = list(filter_fqns)
    report = QuantReport()
    for fqn, module in list(model.named_modules()):
        if isinstance(module.__dict__.get("_parameters", {}).get("weight"), QuantizedTensor):
            continue
        if isinstance(module, _FAKE_QUANT):
            use = module.scheme
        elif isinstance(module, (nn.Linear, nn.Embedding)) and scheme is not None:
            reason = skip_reason(module, fqn, scheme, filter_fqns)
            if reason is not None:
                report.skipped[fqn] = reason
                continue
            use = scheme
        else:
            continue
        w = _full(module.weight)
        learned = getattr(module, LEARNED_SCALE_NAME, None) if isinstance(module, _FAKE_QUANT) else None
        learned = None if learned is None else _full(learned)
        if learned is not None and bool((learned == 0).all()):
            learned = None  # never initialised (fake quantisation never ran): the weight's range decides
        qweight = nn.Parameter(QuantizedTensor.from_float(w, use, dtype=dtype or w.dtype, learned_scale=learned),
                               requires_grad=False)
        if isinstance(module, FakeQuantLinear):
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            new.bias = module.bias
        elif isinstance(module, FakeQuantEmbedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                               scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse, device="meta")
        else:
            new = module
        new.weight = qweight
        if new is not module:
            _set_submodule(model, fqn, new)
        report.converted[fqn] = use.name
    return report


def prepare_for_inference_(model: nn.Module) -> QuantReport:
    """Give every quantised Linear weight the fastest kernel for its device/dtype (layouts convert here).

    Call after the model is on its final device and dtype. Embedding tables keep the reference layout
    (a lookup gathers rows and dequantises them). converted: {fqn: kernel}; skipped: {fqn: why reference}.
    """
    report = QuantReport()
    for fqn, module in model.named_modules():
        w = module.__dict__.get("_parameters", {}).get("weight")
        if not isinstance(w, QuantizedTensor) or not isinstance(module, nn.Linear):
            continue
        kernel, why = choose_kernel(w)
        if kernel == "reference":
            report.skipped[fqn] = why
        else:
            module.weight = nn.Parameter(w.with_kernel(kernel), requires_grad=False)
            report.converted[fqn] = kernel
    return report


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes of all parameters, quantised ones at their stored size (the RoPE table etc. not counted)."""
    total = 0
    for p in model.parameters():
        total += p.nbytes_stored() if isinstance(p, QuantizedTensor) else p.numel() * p.element_size()
    return total
