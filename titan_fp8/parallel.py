"""Process group, device mesh, activation checkpointing, per-block compile and FSDP2 — applied in that order.

The trainer builds the model on the meta device, lets the converters (float8, QAT) swap its Linears, then
calls `parallelize_llama`: `apply_ac` -> `apply_compile` -> `apply_fsdp`. Each `apply_*` takes narrow
arguments so it can be tested without a job config. After `to_empty`, `init_weights_like_unsharded` gives
every rank its shard of exactly the weights a 1-rank run initialises, and `RowStreamLoader` feeds each rank
its rows of a global batch that does not depend on the number of ranks — together they make an N-rank run
reproduce a 1-rank run with the same global batch, and let checkpoints resume at another rank count.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

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
    """Data-parallel degrees: `dp_shard` ranks shard each parameter (FSDP); `dp_replicate` groups of them
    hold replicas (HSDP when both > 1). Tensor/pipeline parallelism are not implemented, so data parallelism
    spans every rank."""

    dp_replicate: int
    dp_shard: int
    world_size: int

    @classmethod
    def resolve(cls, dp_shard: int, dp_replicate: int, world_size: int) -> "ParallelDims":
        """Check the `[parallelism]` degrees against the world size; -1 shard degree = all remaining ranks."""
        if world_size < 1:
            raise ParallelismError(f"world size must be >= 1, got {world_size}")
        if isinstance(dp_replicate, bool) or not isinstance(dp_replicate, int) or dp_replicate < 1:
            raise ParallelismError(f"parallelism.data_parallel_replicate_degree must be >= 1, got {dp_replicate}")
        if isinstance(dp_shard, bool) or not isinstance(dp_shard, int) or (dp_shard < 1 and dp_shard != -1):
            raise ParallelismError(f"parallelism.data_parallel_shard_degree must be -1 (all remaining ranks) "
                                   f"or >= 1, got {dp_shard}")
        if dp_shard == -1:
            if world_size % dp_replicate != 0:
                raise ParallelismError(
                    f"parallelism.data_parallel_replicate_degree={dp_replicate} does not divide the world size "
                    f"{world_size}")
            dp_shard = world_size // dp_replicate
        if dp_shard * dp_replicate != world_size:
            raise ParallelismError(
                f"parallelism.data_parallel_shard_degree ({dp_shard}) x data_parallel_replicate_degree "
                f"({dp_replicate}) = {dp_shard * dp_replicate}, but the world size is {world_size} "
                f"(use -1 for the shard degree to take all remaining ranks)")
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, world_size=world_size)

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.world_size > 1

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size).

    NCCL for CUDA tensors (plus gloo for CPU tensors, which async checkpointing and CPU-side collectives
    use), gloo alone on CPU. A plain `python train.py` runs as a world of one without a process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cuda:nccl,cpu:gloo")
        else:
            dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def build_mesh(dims: ParallelDims, device_type: str):
    """A 1-D ("dp_shard") mesh, or a 2-D ("dp_replicate", "dp_shard") mesh for HSDP; None for one rank."""
    if not dims.fsdp_enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != dims.world_size:
        raise ParallelismError(f"the process group has {dist.get_world_size()} ranks, the degrees expect "
                               f"{dims.world_size}")
    if dims.hsdp:
        return init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device_type, (dims.dp_shard,), mesh_dim_names=("dp_shard",))


def dp_process_group(mesh):
    """The process group spanning every data-parallel rank (delayed-scaling amax sync, logging), or None."""
    if mesh is None:
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    return mesh._flatten("dp").get_group()  # HSDP: replicate x shard as one group


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------------


def _op_sac_policy():
    """Selective AC by op: keep matmul, attention and fp8 amax outputs; recompute the cheap rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_mm.default,
            aten.max.default, aten.amax.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            save.add(getattr(aten, name).default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def parse_ac_option(mode: str, selective_ac_option: str) -> Optional[int]:
    """Validate `[activation_checkpoint]`; returns N for "every Nth block" (1 for full), None for op-SAC."""
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"activation_checkpoint.mode: expected none, full or selective, got {mode!r}")
    if mode == "full":
        return 1
    option = str(selective_ac_option).strip()
    if mode == "selective" and option == "op":
        return None
    try:
        every = int(option)
    except ValueError:
        every = 0
    if mode == "selective" and every < 1:
        raise ValueError(f"activation_checkpoint.selective_ac_option: expected 'op' or a positive integer N "
                         f"(checkpoint every Nth block), got {selective_ac_option!r}")
    return every


def apply_ac(blocks: nn.ModuleDict, mode: str, selective_ac_option: str = "op") -> None:
    """Wrap transformer blocks in place: mode none | full | selective ('op' or every Nth block).

    full: every block recomputes its forward in backward. selective N: blocks N-1, 2N-1, ... do (as
    torchtitan counts). selective op: every block saves the outputs of matmuls, attention and fp8 amax
    reductions and recomputes only the cheap elementwise ops.
    """
    every = parse_ac_option(mode, selective_ac_option)
    if mode == "none":
        return
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if every is None:
        policy = _op_sac_policy()
        wrap = partial(checkpoint_wrapper, context_fn=lambda: create_selective_checkpoint_contexts(policy),
                       preserve_rng_state=False)
        every = 1
    else:
        wrap = partial(checkpoint_wrapper, preserve_rng_state=False)

    wrapped = 0
    for i, (name, block) in enumerate(list(blocks.items())):
        if (i + 1) % every == 0:
            blocks[name] = wrap(block)
            wrapped += 1
    logger.info("activation checkpointing: %s (%s): %d of %d blocks", mode,
                selective_ac_option if mode == "selective" else "all", wrapped, len(blocks))


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

RESHARD_POLICIES = ("default", "always", "never")


def reshard_after_forward_flags(policy: str, n_blocks: int) -> dict[str, bool]:
    """Whether each FSDP group frees its gathered parameters after forward.

    default: everything except the groups backward needs first — the last block and norm + output — which
    would be re-gathered right away (torchtitan's default without pipelining). always: every group (least
    memory). never: none (ZeRO-2-like: most memory, no re-gather in backward).
    """
    if policy not in RESHARD_POLICIES:
        raise ValueError(f"parallelism.fsdp_reshard_after_forward: expected one of {', '.join(RESHARD_POLICIES)}, "
                         f"got {policy!r}")
    flags = {"tok_embeddings": policy != "never"}
    for i in range(n_blocks):
        flags[f"layers.{i}"] = policy == "always" or (policy == "default" and i < n_blocks - 1)
    flags["norm+output"] = policy == "always"
    flags["root"] = policy == "always"
    return flags


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: str = "default", cpu_offload: bool = False) -> None:
    """fully_shard the embedding, each block, norm + output as one group, and the root.

    MixedPrecisionPolicy: parameters are all-gathered (and compute) in `param_dtype`, gradients are
    reduce-scattered in `reduce_dtype`; the sharded fp32 master weights stay what the optimizer updates.
    Float8Linear weights wrapped for the fp8 all-gather (`float8.enable_fsdp_float8_all_gather`) need
    nothing here: FSDP2 finds `fsdp_pre_all_gather` / `fsdp_post_all_gather` on them.
    A 2-D mesh gives HSDP (replicate across "dp_replicate", shard within "dp_shard").
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    flags = reshard_after_forward_flags(reshard_after_forward, len(model.layers))
    kwargs: dict[str, Any] = {"mesh": mesh,
                              "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if cpu_offload:
        if mesh.device_type != "cuda":
            raise ParallelismError("parallelism.fsdp_cpu_offload needs CUDA: on CPU the parameters already live "
                                   "in host memory")
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)

    fully_shard(model.tok_embeddings, reshard_after_forward=flags["tok_embeddings"], **kwargs)
    for i, block in enumerate(model.layers.values()):
        fully_shard(block, reshard_after_forward=flags[f"layers.{i}"], **kwargs)
    fully_shard([model.norm, model.output], reshard_after_forward=flags["norm+output"], **kwargs)
    fully_shard(model, reshard_after_forward=flags["root"], **kwargs)
    logger.info("FSDP2 over mesh %s: param %s, reduce %s, reshard_after_forward=%s%s", tuple(mesh.shape),
                param_dtype, reduce_dtype, reshard_after_forward, ", CPU offload" if cpu_offload else "")


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


# ----------------------------------------------------------------------------------------------------
# Initialisation identical to the unsharded model
# ----------------------------------------------------------------------------------------------------


def _param_slots(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    return [(m, name, p) for m in model.modules() for name, p in m._parameters.items() if p is not None]


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _memory_budget(device: torch.device) -> int:
    """Bytes of full-size parameters one init pass may hold: half of what is free now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62
    return avail // (2 * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@torch.no_grad()
def init_weights_like_unsharded(model: nn.Module, init_fn: Callable[[], None],
                                budget_bytes: Optional[int] = None) -> int:
    """Run `init_fn` (e.g. `model.init_weights`) so every rank holds its shard of exactly the weights the
    unsharded (1-rank) model gets from the same seed. Returns the number of passes.

    Random init on DTensor shards does not do that: on CPU each rank draws its shard from the start of the
    same generator (so the shards repeat each other), on CUDA the offset-based tracker lays the stream out
    differently from the plain op. Here every rank runs `init_fn` on full-size plain tensors with the same
    RNG stream as the unsharded run and keeps its own slice. Parameters are materialised in groups that fit
    `budget_bytes` (default: half the free memory); the others point at one scratch buffer meanwhile, so the
    RNG is consumed exactly as in the unsharded run, and it is rewound before each pass. The generator ends
    where one unsharded init leaves it. Without DTensor parameters this is just `init_fn()`.
    """
    slots = _param_slots(model)
    sharded = [s for s in slots if _is_dtensor(s[2])]
    if not sharded:
        init_fn()
        return 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    device = sharded[0][2].device
    budget = _memory_budget(device) if budget_bytes is None else budget_bytes
    # Distinct parameters (tied weights share one full tensor) in init order, grouped under the budget.
    unique: dict[int, torch.Tensor] = {}
    for _, _, p in sharded:
        unique.setdefault(id(p), p)
    groups: list[list[int]] = [[]]
    used = 0
    for pid, p in unique.items():
        nbytes = p.numel() * p.element_size()
        if groups[-1] and used + nbytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(pid)
        used += nbytes
    scratch_numel: dict[torch.dtype, int] = {}
    for p in unique.values():
        scratch_numel[p.dtype] = max(scratch_numel.get(p.dtype, 0), p.numel())
    scratch = ({dt: torch.empty(n, dtype=dt, device=device) for dt, n in scratch_numel.items()}
               if len(groups) > 1 else {})
    plain_scratch = {id(p): torch.empty_like(p) for _, _, p in slots if not _is_dtensor(p)} if len(groups) > 1 else {}

    devices = [device] if device.type == "cuda" else []
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if devices else None
    for g, group in enumerate(groups):
        torch.set_rng_state(cpu_state)
        if devices:
            torch.cuda.set_rng_state(cuda_state, device)
        active = set(group)
        full: dict[int, torch.Tensor] = {}
        for pid in group:
            p = unique[pid]
            full[pid] = torch.empty(p.shape, dtype=p.dtype, device=device)
        originals = []
        try:
            for module, name, p in slots:
                if _is_dtensor(p):
                    t = full[id(p)] if id(p) in active else scratch[p.dtype][:p.numel()].view(p.shape)
                elif g == 0:
                    continue  # plain parameters are initialised in place by the first pass
                else:
                    t = plain_scratch[id(p)]
                originals.append((module, name, p))
                module._parameters[name] = t
            init_fn()
        finally:
            for module, name, p in originals:
                module._parameters[name] = p
        for pid in group:
            p = unique[pid]
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = full[pid][tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            p.to_local().copy_(local)
        del full
    if len(groups) > 1:
        logger.info("initialised %d sharded parameters in %d passes (budget %.1f GiB)", len(unique), len(groups),
                    budget / 2**30)
    return len(groups)


# ----------------------------------------------------------------------------------------------------
# Data: a global batch that does not depend on the number of ranks
# ----------------------------------------------------------------------------------------------------


class RowStreamLoader:
    """This rank's micro-batches of a global batch whose every row is its own token stream.

    Row j of the global batch (j < `global_batch`) always comes from stream j, a dataset that reads the
    documents j, j + B, j + 2B, ... of the split (B = global batch rows) with its own shuffle buffer. Rank r of
    W data-parallel ranks with `local_batch` rows and A = B / (W * local_batch) accumulation micro-batches
    owns rows (a * W + r) * local_batch + i, i < local_batch, for micro-batch a. So every step trains on the
    same B windows whatever W and A are: an N-rank run sees the data of a 1-rank run with the same global
    batch (and, with local_batch equal, each rank's micro-batch equals one of the 1-rank run's accumulation
    micro-batches), and a checkpoint resumes at any rank count that divides the same global batch. State is
    kept per row (`row_{j}` keys), so DCP reshards it like any other sharded state. Changing the global batch
    size itself cannot re-split the streams: loading then fails with a one-line error.

    `make_stream(j, B)` builds stream j of B: an iterable of (input_ids, labels) pairs of shape (1, T) or (T,)
    with `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, make_stream: Callable[[int, int], Any], *, global_batch: int, local_batch: int,
                 dp_rank: int, dp_degree: int):
        if global_batch % (local_batch * dp_degree) != 0:
            raise ValueError(f"global batch {global_batch} is not a multiple of local batch {local_batch} x "
                             f"data-parallel degree {dp_degree}")
        self.global_batch, self.local_batch = global_batch, local_batch
        self.accum = global_batch // (local_batch * dp_degree)
        self.rows = [[(a * dp_degree + dp_rank) * local_batch + i for i in range(local_batch)]
                     for a in range(self.accum)]
        self.streams = {j: make_stream(j, global_batch) for rows in self.rows for j in rows}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        iters = {j: iter(s) for j, s in self.streams.items()}
        while True:
            for rows in self.rows:
                pairs = [next(iters[j]) for j in rows]
                inputs = torch.cat([x.reshape(1, -1) for x, _ in pairs])  # (local_batch, T)
                labels = torch.cat([y.reshape(1, -1) for _, y in pairs])  # (local_batch, T)
                yield inputs, labels

    def state_dict(self) -> dict[str, bytes]:
        out = {}
        for j, s in self.streams.items():
            buffer = io.BytesIO()
            torch.save(s.state_dict(), buffer)
            out[f"row_{j}"] = buffer.getvalue()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for j, s in self.streams.items():
            blob = state_dict[f"row_{j}"]
            if isinstance(blob, io.BytesIO):
                blob = blob.getvalue()
            s.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))


# ----------------------------------------------------------------------------------------------------
# Small collectives for logging and control flow
# ----------------------------------------------------------------------------------------------------


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
    return float(dist_max_on_device(value, device))


def dist_max_on_device(value: float, device: torch.device) -> torch.Tensor:
    """The maximum of `value` over all ranks, as a device tensor: reading it waits for the device."""
    t = torch.tensor(value, device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def dist_all(flag: bool, device: torch.device, mesh) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    return not dist_max(float(not flag), device, mesh)


def maybe_barrier(mesh: Optional[object]) -> None:
    if mesh is not None and dist.is_initialized():
        dist.barrier()
