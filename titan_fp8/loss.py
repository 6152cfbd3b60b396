"""The training loss, shared by the trainer and the benchmarks (so that both measure the same thing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy_loss"]


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 over (B, T) positions.

    Compiled (`compile.components` holds "loss", the default) inductor fuses the fp32 upcast into the
    log-softmax and its backward, so neither the fp32 logits nor their fp32 gradient is ever materialised;
    eager, both are (2 x 4 bytes per logit: 15.7 GiB at 16384 tokens x 128256 classes).
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
