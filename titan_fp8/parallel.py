"""Device mesh, activation checkpointing, per-block compile and FSDP2 — applied in that order.

Each `apply_*` takes narrow arguments so it can be tested without a job config; `parallelize_llama`
is the thin orchestrator the trainer calls.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

logger = logging.getLogger(__name__)


class ParallelismError(ValueError):
    """Parallel degrees that do not fit the world size (one-line message naming the keys)."""


# ----------------------------------------------------------------------------------------------------
# Process group and mesh
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int

    @classmethod
    def resolve(cls, dp_shard: int, dp_replicate: int, world_size: int) -> "ParallelDims":
        if dp_shard == -1:
            if world_size % dp_replicate != 0:
                raise ParallelismError(
                    f"parallelism.data_parallel_replicate_degree={dp_replicate} does not divide the world size "
                    f"{world_size}")
            dp_shard = world_size // dp_replicate
        if dp_shard * dp_replicate != world_size:
            raise ParallelismError(
                f"parallelism.data_parallel_shard_degree ({dp_shard}) x data_parallel_replicate_degree "
                f"({dp_replicate}) = {dp_shard * dp_replicate}, but the world size is {world_size}")
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, world_size=world_size)

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size).

    NCCL on CUDA, gloo on CPU. A plain `python train.py` runs as a world of one without a process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def build_mesh(dims: ParallelDims, device_type: str):
    """A 1-D ("dp_shard") mesh, or a 2-D ("dp_replicate", "dp_shard") mesh for HSDP; None for one rank."""
    if not dims.fsdp_enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if dims.dp_replicate > 1:
        return init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device_type, (dims.dp_shard,), mesh_dim_names=("dp_shard",))


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------------


def _op_sac_policy():
    """Selective AC by op: keep matmul, attention and fp8 amax outputs; recompute the cheap rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten._scaled_mm.default,
            aten.max.default, aten.amax.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            save.add(getattr(aten, name).default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_ac(blocks: nn.ModuleDict, mode: str, selective_ac_option: str = "op") -> None:
    """Wrap transformer blocks in place: mode none | full | selective ('op' or every Nth block)."""
    if mode == "none":
        return
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if mode == "selective" and selective_ac_option == "op":
        policy = _op_sac_policy()
        wrap = partial(checkpoint_wrapper, context_fn=lambda: create_selective_checkpoint_contexts(policy),
                       preserve_rng_state=False)
    elif mode in ("full", "selective"):
        wrap = partial(checkpoint_wrapper, preserve_rng_state=False)
    else:
        raise ValueError(f"activation_checkpoint.mode: expected none, full or selective, got {mode!r}")

    every = 1 if mode == "full" or selective_ac_option == "op" else int(selective_ac_option)
    for i, (name, block) in enumerate(list(blocks.items())):
        if i % every == 0:
            blocks[name] = wrap(block)
    logger.info("activation checkpointing: %s (%s)", mode, selective_ac_option if mode == "selective" else "all")


# ----------------------------------------------------------------------------------------------------
# Compile
# ----------------------------------------------------------------------------------------------------


def apply_compile(blocks: nn.ModuleDict) -> None:
    """Compile each transformer block in place (fullgraph): repeated blocks reuse one compiled graph."""
    for block in blocks.values():
        block.compile(fullgraph=True)
    logger.info("compiled %d transformer blocks with torch.compile(fullgraph=True)", len(blocks))


# ----------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: str = "default", cpu_offload: bool = False) -> None:
    """fully_shard the embedding, each block, norm + output as one group, and the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = {"mesh": mesh, "mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()

    def reshard(is_last: bool) -> bool:
        if reshard_after_forward == "always":
            return True
        if reshard_after_forward == "never":
            return False
        # default: the root's last group is needed again right away in backward, so keep it gathered.
        return not is_last

    fully_shard(model.tok_embeddings, reshard_after_forward=reshard(False), **kwargs)
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard(False), **kwargs)
    fully_shard([model.norm, model.output], reshard_after_forward=reshard(True), **kwargs)
    fully_shard(model, reshard_after_forward=reshard(True), **kwargs)


def parallelize_llama(model: nn.Module, *, mesh, ac_mode: str, selective_ac_option: str, compile_model: bool,
                      param_dtype: torch.dtype, reduce_dtype: torch.dtype, reshard_after_forward: str,
                      cpu_offload: bool) -> nn.Module:
    """AC -> compile -> FSDP on a (meta-device) model whose converters have already run."""
    apply_ac(model.layers, ac_mode, selective_ac_option)
    if compile_model:
        apply_compile(model.layers)
    if mesh is not None:
        apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                   reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    return model


def dist_mean(value: torch.Tensor, mesh) -> torch.Tensor:
    """Mean of a scalar over data-parallel ranks (for logging only)."""
    if mesh is None:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
    return value if value.is_cuda else value / dist.get_world_size()


def dist_max(value: float, device: torch.device, mesh) -> float:
    if mesh is None:
        return value
    t = torch.tensor(value, device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def maybe_barrier(mesh: Optional[object]) -> None:
    if mesh is not None and dist.is_initialized():
        dist.barrier()
