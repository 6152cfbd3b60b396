"""AdamW and the warmup -> stable -> decay learning-rate schedule."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: nn.Module, *, name: str, lr: float, eps: float, weight_decay: float,
                    betas: tuple[float, float], implementation: str,
                    lr_ratio_by_suffix: Optional[dict[str, float]] = None) -> torch.optim.Optimizer:
    """AdamW/Adam over all trainable parameters; `implementation` picks fused, foreach or the plain loop.

    lr_ratio_by_suffix: parameters whose name ends with a key train in their own group at lr x ratio and
    without weight decay (QAT's learned scales: decay would pull them to zero). The schedule scales every
    group alike.
    """
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[name]
    kwargs = dict(lr=lr, eps=eps, weight_decay=weight_decay, betas=tuple(betas))
    if implementation == "fused":
        kwargs["fused"] = True
    elif implementation == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    special = lr_ratio_by_suffix or {}
    groups: dict[Optional[str], list[nn.Parameter]] = {None: []}
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            suffix = next((k for k in special if param_name.endswith(k)), None)
            groups.setdefault(suffix, []).append(p)
    param_groups = [{"params": groups.pop(None)}]
    param_groups += [{"params": ps, "lr": lr * special[k], "weight_decay": 0.0} for k, ps in groups.items()]
    return cls(param_groups, **kwargs)


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
    return Schedule(optimizer, fn)


class Schedule(LambdaLR):
    """LambdaLR that resumes into a run with a different number of parameter groups.

    A resumed run may add a group (QAT range learning adds the learned scales to a run saved without
    them). The checkpoint's per-group base lrs then do not fit: this run's own base lrs (from the config)
    are kept and only the position in the schedule is restored.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict.get("base_lrs", self.base_lrs)) != len(self.base_lrs):
            factor = self.lr_lambdas[0](state_dict.get("last_epoch", 0))
            state_dict = {**state_dict, "base_lrs": list(self.base_lrs),
                          "_last_lr": [lr * factor for lr in self.base_lrs]}
        super().load_state_dict(state_dict)
