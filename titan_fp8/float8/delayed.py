"""Delayed scaling: per-tensor amax history buffers and the once-per-step sync.

Per delayed operand ``o`` (input, weight, grad_output) a Float8Linear registers three persistent
buffers (so they are in ``state_dict()`` and DCP checkpoints):

    float8_amax_<o>          max amax measured since the last sync (0-d; -1 = none yet), a running
                             max so that gradient-accumulation micro-batches all count
    float8_amax_history_<o>  (amax_history_len,), index 0 = most recent
    float8_scale_<o>         scale used by the next casts (0-d)

Step t casts with the scale computed from history up to step t-1 while it records the step's amax:
one pass over the data. ``sync_float8_amax_and_scale_history`` then all-reduces every recorded amax
of the model in one collective, rolls the histories, recomputes the scales and resets the amaxes.

Until the first sync (or a checkpoint load) there is no history, so the module casts with dynamic
scales; ``float8_amax_initialized`` (a Python bool, so compiled code specialises on it) says which.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from .config import Float8LinearConfig, Gemm, Operand
from .scaling import amax_to_scale

# Marks "no valid measurement this step": below every real amax, so MAX-reduction ignores it.
_INVALID_AMAX = -1.0


def amax_buffer_name(operand: Operand) -> str:
    return f"float8_amax_{operand.value}"


def history_buffer_name(operand: Operand) -> str:
    return f"float8_amax_history_{operand.value}"


def scale_buffer_name(operand: Operand) -> str:
    return f"float8_scale_{operand.value}"


def register_delayed_buffers(module: nn.Module, config: Float8LinearConfig, device: torch.device) -> None:
    for operand in config.delayed_operands():
        module.register_buffer(
            amax_buffer_name(operand), torch.full((), _INVALID_AMAX, dtype=torch.float32, device=device)
        )
        module.register_buffer(
            history_buffer_name(operand), torch.zeros(config.amax_history_len, dtype=torch.float32, device=device)
        )
        module.register_buffer(scale_buffer_name(operand), torch.ones((), dtype=torch.float32, device=device))
    module.float8_amax_initialized = False
    if config.delayed_operands():
        module.register_load_state_dict_post_hook(_mark_initialized_after_load)


@torch.no_grad()
def reset_delayed_buffers(module: nn.Module) -> None:
    """Zero amaxes and histories, scales to 1, back to dynamic scaling until the next sync. For
    buffers materialised from the meta device (``to_empty`` leaves them uninitialised)."""
    for operand in module.config.delayed_operands():
        getattr(module, amax_buffer_name(operand)).fill_(_INVALID_AMAX)
        getattr(module, history_buffer_name(operand)).zero_()
        getattr(module, scale_buffer_name(operand)).fill_(1.0)
    module.float8_amax_initialized = False


def record_amax(buffer: torch.Tensor, amax: torch.Tensor) -> None:
    """Fold ``amax`` into the running max since the last sync (NaN propagates and is then skipped)."""
    buffer.copy_(torch.maximum(buffer, amax.detach().to(buffer.dtype)))


def _mark_initialized_after_load(module: nn.Module, incompatible_keys) -> None:
    # A loaded history is a valid history (eager, at load time: the .item() sync is fine here).
    ops = module.config.delayed_operands()
    module.float8_amax_initialized = any(
        bool(getattr(module, history_buffer_name(op)).max().item() > 0) for op in ops
    )


def scale_from_history(history: torch.Tensor, float8_dtype: torch.dtype, config: Float8LinearConfig) -> torch.Tensor:
    """Scale from a (..., H) history: amax over it ("max") or its newest entry ("most_recent")."""
    amax = history.amax(dim=-1) if config.amax_compute_algo == "max" else history[..., 0]
    return amax_to_scale(
        amax, float8_dtype, round_scales_to_power_of_2=config.round_scales_to_power_of_2, margin=config.margin
    )


def _main_cast_config(config: Float8LinearConfig, operand: Operand):
    gemm = Gemm.GRAD_INPUT if operand is Operand.GRAD_OUTPUT else Gemm.OUTPUT
    return config.cast_config(operand, gemm)


@torch.no_grad()
def sync_float8_amax_and_scale_history(model: nn.Module, process_group=None) -> None:
    """Reduce every delayed-scaling amax of ``model`` across ranks with ONE all_reduce(MAX), roll the
    histories and recompute the scales. Call once per step, after backward, on every rank.

    Non-finite amaxes (an overflowed step) and operands not measured since the last sync never
    enter a history: that history keeps its old values for this step.
    """
    entries = [
        (module, operand)
        for module in model.modules()
        if getattr(module, "config", None) is not None and isinstance(module.config, Float8LinearConfig)
        for operand in module.config.delayed_operands()
    ]
    if not entries:
        return
    amaxes = torch.stack([getattr(m, amax_buffer_name(op)) for m, op in entries])
    amaxes = torch.where(torch.isfinite(amaxes), amaxes, torch.full_like(amaxes, _INVALID_AMAX))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=process_group)
    # Per entry as 0-d views: indexing a CUDA tensor with a Python list of indices would copy the list
    # to the GPU from pageable memory, i.e. stall the CPU until the GPU has drained its queue.
    amax_rows = amaxes.unbind(0)

    # Batch the history/scale arithmetic over entries that share the settings it depends on.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (m, op) in enumerate(entries):
        c = m.config
        key = (c.amax_history_len, c.amax_compute_algo, c.margin, c.round_scales_to_power_of_2,
               _main_cast_config(c, op).target_dtype)
        groups[key].append(i)
    for (_, _, _, _, float8_dtype), idx in groups.items():
        config = entries[idx[0]][0].config
        members = [entries[i] for i in idx]
        history_bufs = [getattr(m, history_buffer_name(op)) for m, op in members]
        histories = torch.stack(history_bufs)
        # A module's first sync starts a fresh history (whatever the buffers held before). Only then is a
        # mask built: a host-to-device copy every step would stall the CPU on the GPU's queue.
        fresh = [not m.float8_amax_initialized for m, _ in members]
        if any(fresh):
            fresh_mask = torch.tensor(fresh).to(histories.device)
            histories = torch.where(fresh_mask.unsqueeze(1), torch.zeros_like(histories), histories)
        new = torch.stack([amax_rows[i] for i in idx]).unsqueeze(1)  # (n, 1)
        rolled = torch.cat([new, histories[:, :-1]], dim=1)
        histories = torch.where(new >= 0, rolled, histories)  # invalid (skipped) amaxes were set < 0
        scales = scale_from_history(histories, float8_dtype, config)
        # One multi-tensor copy per buffer kind, not three small kernels per operand (an 8B layer has 21
        # delayed operands; per-operand copies cost ~250 launches per step for 4 layers).
        consumed = torch.full((len(idx),), _INVALID_AMAX, dtype=amaxes.dtype, device=amaxes.device)
        # Consumed: the next step measures afresh (and every rank holds the same state).
        torch._foreach_copy_([getattr(m, amax_buffer_name(op)) for m, op in members], list(consumed.unbind(0)))
        torch._foreach_copy_(history_bufs, list(histories.unbind(0)))
        torch._foreach_copy_([getattr(m, scale_buffer_name(op)) for m, op in members], list(scales.unbind(0)))
    for module, _ in entries:
        module.float8_amax_initialized = True
