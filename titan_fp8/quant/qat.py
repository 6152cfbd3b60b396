"""QAT fake-quantised modules and the model-level passes: prepare (QAT), quantise (PTQ / QAT convert),
pick kernels for inference, measure weight memory.

Which modules: every `nn.Linear` and `nn.Embedding` whose fully qualified name contains none of
`filter_fqns` and whose rows split into whole groups (`in_features % group_size == 0`). One rule,
`skip_reason`, serves QAT prepare and PTQ, so QAT trains exactly the modules export quantises.
Skipped modules are logged with the reason, never silently.

Fake quantisation (`FakeQuantLinear`, `FakeQuantEmbedding`) keeps the parameter names of the module it
replaces (`weight`, `bias`), so state_dict keys and checkpoints are unchanged; it adds no buffers.

    forward(x) = F.linear(fake_quantize(x, scheme.activation), fake_quantize(weight, scheme.weight), bias)

with `fake_quantize` = the serving format's dequantize(quantize(.)) and a straight-through gradient.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .primitives import fake_quantize
from .schemes import QuantScheme
from .tensor import QuantizedTensor, choose_kernel

__all__ = ["FakeQuantLinear", "FakeQuantEmbedding", "QuantReport", "skip_reason", "prepare_qat_",
           "set_fake_quant_", "quantize_", "prepare_for_inference_", "weight_memory_bytes"]

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


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose weight (and, for dynamic-activation schemes, input) pass through fake quantisation."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], scheme: QuantScheme):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.scheme = scheme
        self.fake_quant_enabled = True  # a plain attribute: not in the state dict

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> "FakeQuantLinear":
        return cls(linear.weight, linear.bias, scheme)  # the same Parameter objects: no copy, meta stays meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return F.linear(x, self.weight, self.bias)
        act = self.scheme.activation
        if act is not None:
            x = fake_quantize(x, act)
        return F.linear(x, fake_quantize(self.weight, self.scheme.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, group_size={self.scheme.group_size}, " \
               f"fake_quant={'on' if self.fake_quant_enabled else 'off'}"


class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose looked-up rows are fake-quantised with the scheme's weight format.

    Groups run along each row, so quantising the gathered rows equals quantising the table first.
    """

    def __init__(self, embedding: nn.Embedding, scheme: QuantScheme):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        self.scheme = scheme
        self.fake_quant_enabled = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)
        return fake_quantize(rows, self.scheme.weight) if self.fake_quant_enabled else rows

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name}, fake_quant={'on' if self.fake_quant_enabled else 'off'}"


_FAKE_QUANT = (FakeQuantLinear, FakeQuantEmbedding)


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------


def prepare_qat_(model: nn.Module, scheme: QuantScheme, filter_fqns: Iterable[str] = ()) -> QuantReport:
    """Swap eligible Linears/Embeddings for fake-quantised ones, in place (works on the meta device)."""
    filter_fqns = list(filter_fqns)
    report = QuantReport()
    for fqn, module in list(model.named_modules()):
        if isinstance(module, _FAKE_QUANT) or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        reason = skip_reason(module, fqn, scheme, filter_fqns)
        if reason is not None:
            report.skipped[fqn] = reason
            continue
        new = FakeQuantLinear.from_linear(module, scheme) if isinstance(module, nn.Linear) \
            else FakeQuantEmbedding(module, scheme)
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
        qweight = nn.Parameter(QuantizedTensor.from_float(w, use, dtype=dtype or w.dtype), requires_grad=False)
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
