"""The training loss, shared by the trainer and the benchmarks (so that both measure the same thing).

Two forms of the same mean next-token cross-entropy, computed in fp32:

- `cross_entropy_loss(logits, labels)`: on logits a model already produced (validation, the fallback).
- `linear_cross_entropy(h, weight, labels)`: the output head and the loss in one autograd node. The
  logits (N x V: 3.9 GiB in bf16 at 16384 tokens x 128256 classes) are its only large buffer, and its
  backward overwrites them with their own gradient instead of allocating a second N x V tensor. With the
  separate head + loss, the logits and their gradient are live together at the loss's backward — the
  step's memory peak for a large vocabulary.

Imports only torch.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["cross_entropy_loss", "linear_cross_entropy", "head_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # as F.cross_entropy: such labels count neither in the sum nor in the mean
_EAGER_CHUNK_BYTES = 256 * 2**20  # eager kernels work on row blocks of at most this many fp32 bytes


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 over (B, T) positions.

    Compiled (`compile.components` holds "loss", the default) inductor fuses the fp32 upcast into the
    log-softmax and its backward, so neither the fp32 logits nor their fp32 gradient is ever materialised;
    eager, both are (2 x 4 bytes per logit: 15.7 GiB at 16384 tokens x 128256 classes).
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


# ------------------------------------------------------------------------------------------------------------
# The two loss kernels of linear_cross_entropy. Each exists as a plain function (compiled: inductor fuses it
# into one or two passes over the logits) and as an eager version over row blocks (bounded fp32 memory).
# ------------------------------------------------------------------------------------------------------------


def _ce_forward(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V), labels (N,) -> (logsumexp (N,) fp32, summed loss fp32, number of counted labels)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != IGNORE_INDEX
    picked = x.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    return lse, torch.where(valid, lse - picked, 0.0).sum(), valid.sum()


def _ce_backward_(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> None:
    """Overwrite logits (N, V) with d(scale * summed loss)/d(logits) = scale * (softmax - onehot), 0 on ignored rows."""
    x = logits.float()
    classes = torch.arange(logits.shape[1], device=logits.device)
    onehot = (classes.unsqueeze(0) == labels.unsqueeze(1)).float()
    valid = (labels != IGNORE_INDEX).unsqueeze(1)
    grad = torch.where(valid, (torch.exp(x - lse.unsqueeze(1)) - onehot) * scale, 0.0)
    logits.copy_(grad)


def _row_blocks(logits: torch.Tensor) -> int:
    return max(1, _EAGER_CHUNK_BYTES // (4 * logits.shape[1]))


def _ce_forward_eager(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = _row_blocks(logits)
    parts = [_ce_forward(logits[i:i + rows], labels[i:i + rows]) for i in range(0, logits.shape[0], rows)]
    lse = torch.cat([p[0] for p in parts])
    return lse, torch.stack([p[1] for p in parts]).sum(), torch.stack([p[2] for p in parts]).sum()


def _ce_backward_eager_(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> None:
    rows = _row_blocks(logits)
    for i in range(0, logits.shape[0], rows):
        _ce_backward_(logits[i:i + rows], lse[i:i + rows], labels[i:i + rows], scale)


@functools.lru_cache(maxsize=None)
def _kernels(compiled: bool) -> tuple[Callable, Callable]:
    if not compiled:
        return _ce_forward_eager, _ce_backward_eager_
    return (torch.compile(_ce_forward, fullgraph=True, dynamic=False),
            torch.compile(_ce_backward_, fullgraph=True, dynamic=False))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, compiled: bool) -> torch.Tensor:
        forward_kernel, _ = _kernels(compiled)
        logits = h @ weight.t()  # (N, V) in the compute dtype, the one large buffer
        lse, loss_sum, count = forward_kernel(logits, labels)
        ctx.save_for_backward(h, weight, logits, lse, labels, count)
        ctx.compiled = compiled
        ctx.logits_consumed = False
        return loss_sum / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.logits_consumed:
            raise RuntimeError("linear_cross_entropy: a second backward through the same loss (retain_graph) is "
                               "not supported: the first one overwrote the saved logits with their gradient")
        ctx.logits_consumed = True
        h, weight, logits, lse, labels, count = ctx.saved_tensors
        _, backward_kernel = _kernels(ctx.compiled)
        backward_kernel(logits, lse, labels, grad_loss.float() / count)
        grad_logits = logits  # now holds d loss / d logits, in the compute dtype (as the unfused loss's)
        grad_h = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         compiled: bool = False) -> torch.Tensor:
    """cross_entropy_loss(F.linear(h, weight), labels) without a second logits-sized buffer.

    h (..., D) and weight (V, D) in one dtype (the head's compute dtype), labels (...) int64 with
    IGNORE_INDEX for positions that do not count. Returns the fp32 mean over counted positions. The loss
    math runs in fp32 like cross_entropy_loss's, and the logits' gradient is rounded to the compute dtype
    as there; only fp32 summation order differs. compiled: the loss kernels are torch.compile'd (fused,
    no fp32 copy of the logits); otherwise they run eagerly over row blocks of at most 256 MiB of fp32.
    Supports one backward per forward (no retain_graph).
    """
    if h.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype}; expected one dtype")
    if h.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} do not match h {tuple(h.shape)}")
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), compiled)


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, compiled: bool = False) -> torch.Tensor:
    """What an output head called with labels returns: linear_cross_entropy with autocast applied by hand.

    Under autocast an nn.Linear's matmul runs in the autocast dtype; the fused loss is one autograd node,
    so h and the weight are cast here (the cast's backward returns the weight's gradient in its own dtype)
    and the node runs with autocast off.
    """
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(h.to(dtype), weight.to(dtype), labels, compiled=compiled)
    return linear_cross_entropy(h, weight, labels, compiled=compiled)
