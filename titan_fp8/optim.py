"""AdamW and the warmup -> stable -> decay learning-rate schedule."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: nn.Module, *, name: str, lr: float, eps: float, weight_decay: float,
                    betas: tuple[float, float], implementation: str) -> torch.optim.Optimizer:
    """AdamW/Adam over all trainable parameters; `implementation` picks fused, foreach or the plain loop."""
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[name]
    kwargs = dict(lr=lr, eps=eps, weight_decay=weight_decay, betas=tuple(betas))
    if implementation == "fused":
        kwargs["fused"] = True
    elif implementation == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay_type: str, decay_ratio: Optional[float],
              min_lr_factor: float) -> float:
    """Multiplier of the peak lr at scheduler step `step` (0-based: the lr used by training step step+1)."""
    if step < warmup_steps:
        # Start at lr/(warmup+1), never at 0, so the first step already learns.
        return (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - warmup_steps
    if decay_ratio is not None:
        decay_steps = round(decay_steps * decay_ratio)
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps <= 0:
        return 1.0
    progress = min((step - decay_start) / decay_steps, 1.0)
    if decay_type == "linear":
        remaining = 1.0 - progress
    elif decay_type == "sqrt":
        remaining = 1.0 - math.sqrt(progress)
    elif decay_type == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"lr_scheduler.decay_type: expected linear, cosine or sqrt, got {decay_type!r}")
    return min_lr_factor + (1.0 - min_lr_factor) * remaining


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       decay_type: str, decay_ratio: Optional[float], min_lr_factor: float) -> LambdaLR:
    fn = partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, decay_type=decay_type,
                 decay_ratio=decay_ratio, min_lr_factor=min_lr_factor)
    return LambdaLR(optimizer, fn)
