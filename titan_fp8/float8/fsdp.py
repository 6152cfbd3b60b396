"""FSDP2 fp8 all-gather for tensorwise/delayed Float8Linear weights.

The weight Parameter wraps its high-precision tensor in WeightWithFloat8AllGather. To everything
but FSDP2 (optimizer, grad clipping, state_dict, DCP) it behaves as that plain tensor: every op is
run on the inner tensor and returns plain results, except the few layout/copy ops FSDP2 uses to
shard it, which keep the wrapper. FSDP2 finds ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``
on the sharded local tensor and all-gathers what they return instead of the bf16/fp32 shard:

    pre:  cast the local shard to fp8 with a scale of the WHOLE weight (precomputed after the
          optimizer step, the delayed-scaling scale, or an all-reduce(MAX) of shard amaxes), and
          hand over the bytes as uint8 (gloo cannot carry float8 dtypes; NCCL does not mind).
          With the precompute, every shard was already cast after the optimizer step, all of them in
          one batched pass, and the forward's gather and the backward's re-gather both reuse that
          cast (1 byte per local weight element held through the step)
    post: view the gathered bytes as fp8 and wrap them as a Float8TrainingTensor: the unsharded
          weight, which Float8Linear uses for both weight GEMMs without recasting.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map_only

from .config import Float8LinearConfig, Gemm, Operand, ScalingType
from .delayed import amax_buffer_name, record_amax, scale_buffer_name
from .kernels import cast_many_to_float8
from .scaled_mm import MMConfig
from .scaling import amax_to_scale, saturated_cast, tensor_amax
from .tensor import Float8TrainingTensor

aten = torch.ops.aten

# Ops FSDP2 (sharding, padding, to_empty, .to) applies to the parameter whose result must stay a
# wrapper; everything else (optimizer math, clipping, ...) gets plain tensors.
_PRESERVE_WRAPPER_OPS = {
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.slice.Tensor,
    aten.narrow.default,
    aten.copy_.default,
    aten.view.default,
    aten.as_strided.default,
    aten._to_copy.default,
    aten._pin_memory.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.clone.default,
    aten.detach.default,
    aten.alias.default,
}


class Precomputed(NamedTuple):
    """What ``precompute_float8_dynamic_scale_for_fsdp`` leaves on a weight shard for its next all-gathers."""

    scale: torch.Tensor  # the whole weight's scale (0-d fp32), identical on every rank
    param_ref: weakref.ref  # the Parameter the optimizer updates ...
    version: int  # ... and its _version then: an in-place update since makes the fields below stale
    data: Optional[torch.Tensor]  # the local shard cast with ``scale`` (fp8), or None: cast at the gather
    # Delayed scaling: the scale buffer ``scale`` was copied from and its _version then (a checkpoint load
    # since makes the copy stale); None for dynamic scaling.
    scale_buffer: Optional[torch.Tensor] = None
    scale_buffer_version: int = 0


class WeightWithFloat8AllGather(torch.Tensor):
    _tensor: torch.Tensor
    _config: Float8LinearConfig
    _module_ref: Optional[weakref.ref]  # the owning Float8Linear (delayed-scaling buffers)
    _precomputed: Optional[Precomputed]

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, config: Float8LinearConfig, module_ref: Optional[weakref.ref] = None):
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            tensor.size(),
            strides=tensor.stride(),
            storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype,
            layout=tensor.layout,
            device=tensor.device,
            requires_grad=tensor.requires_grad,
        )
        self._tensor = tensor
        self._config = config
        self._module_ref = module_ref
        self._precomputed = None
        return self

    def __repr__(self) -> str:
        return f"WeightWithFloat8AllGather({self._tensor!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        like: list[WeightWithFloat8AllGather] = []

        def unwrap(t):
            like.append(t)
            return t._tensor

        args, kwargs = tree_map_only(cls, unwrap, (args, kwargs))
        out = func(*args, **kwargs)
        if func not in _PRESERVE_WRAPPER_OPS:
            return out
        if func is aten.copy_.default:
            return like[0] if like and like[0]._tensor is args[0] else out
        meta = like[0]
        return tree_map_only(torch.Tensor, lambda t: cls(t, meta._config, meta._module_ref), out)

    def __tensor_flatten__(self):
        return ["_tensor"], (self._config, self._module_ref)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        config, module_ref = ctx
        return WeightWithFloat8AllGather(inner_tensors["_tensor"], config, module_ref)

    # ------------------------------------------------------------------ FSDP2 extension

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        cast_config = self._config.cast_config_weight
        precomputed = self._valid_precomputed()
        if precomputed is not None and precomputed.data is not None:
            # Cast after the optimizer step with the other shards (forward gather and backward re-gather).
            scale, data = precomputed.scale, precomputed.data.view(torch.uint8)
        else:
            # A fresh tensor: the scale may be a module buffer updated in place (delayed scaling), and the
            # unsharded weight keeps this one by reference (see fsdp_post_all_gather).
            scale = self._unsharded_scale(mesh, precomputed).clone()
            # Eager torch ops (four small kernels). The one-kernel Triton cast behind its custom op measured
            # slower here (4x H100, Llama3-8B: 1.11x against 1.17x bf16): ~450 calls a step, and each call's
            # dispatch costs more CPU than the kernels it saves, on a step whose GPU already waits for the CPU.
            data = saturated_cast(self._tensor, scale, cast_config.target_dtype).view(torch.uint8)
        # Uneven sharding: FSDP wants every rank's input at the padded (rank 0) shard size.
        padded_rows = math.ceil(outer_size[0] / mesh.size()) if len(outer_size) else 0
        if data.dim() and data.shape[0] < padded_rows:
            data = torch.nn.functional.pad(data, (0, 0) * (data.dim() - 1) + (0, padded_rows - data.shape[0]))
        return (data,), (scale,)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: Optional[torch.Tensor] = None,
    ):
        (data,) = all_gather_outputs
        (scale,) = metadata
        data = data.view(self._config.cast_config_weight.target_dtype)
        if scale.is_cuda:
            # The scale was made on FSDP's all-gather copy-in stream and is read on this one: without this,
            # the caching allocator may hand its memory to the next pre-all-gather while our GEMMs still
            # have to read it (seen as NaN losses on 2 H100s).
            scale.record_stream(torch.cuda.current_stream())
        if out is not None:
            # FSDP re-gathered into the same storage our fp8 view aliases; only the scale is new. Assign, not
            # copy_: tensors saved for backward may still hold the previous scale.
            if not isinstance(out, Float8TrainingTensor):
                raise RuntimeError(f"fsdp_post_all_gather: expected a Float8TrainingTensor out, got {type(out)}")
            out._scale = scale
            return
        mm_config = MMConfig(self._config.emulate, self._config.gemm_config_output.use_fast_accum)
        weight = Float8TrainingTensor(data, scale, param_dtype, Operand.WEIGHT, Gemm.OUTPUT, None, mm_config)
        return weight, (data,)

    def _valid_precomputed(self) -> Optional[Precomputed]:
        pre = self._precomputed
        if pre is None:
            return None
        param = pre.param_ref()
        # In-place updates (optimizer.step, a load) bump the versions: a stale scale or cast is not used.
        if param is None or param._version != pre.version:
            return None
        if pre.scale_buffer is not None and pre.scale_buffer._version != pre.scale_buffer_version:
            return None
        return pre

    def _unsharded_scale(self, mesh, precomputed: Optional[Precomputed]) -> torch.Tensor:
        """The scale of the whole weight, identical on every rank."""
        cast_config = self._config.cast_config_weight
        module = self._module_ref() if self._module_ref is not None else None
        if cast_config.scaling_type is ScalingType.DELAYED and module is not None:
            # Record the shard's amax; the step's sync all-reduces it into the weight's amax.
            record_amax(getattr(module, amax_buffer_name(Operand.WEIGHT)), tensor_amax(self._tensor))
            if module.float8_amax_initialized:
                return getattr(module, scale_buffer_name(Operand.WEIGHT))
        if precomputed is not None:
            return precomputed.scale
        # No valid precomputed scale (first step, or weights changed since): one all-reduce here.
        amax = tensor_amax(self._tensor)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        return amax_to_scale(
            amax, cast_config.target_dtype, round_scales_to_power_of_2=self._config.round_scales_to_power_of_2
        )


def wrap_weight_for_fsdp_float8_all_gather(module: nn.Module) -> None:
    """Replace ``module.weight`` by a Parameter wrapping it in WeightWithFloat8AllGather."""
    weight = module.weight
    if isinstance(weight, WeightWithFloat8AllGather):
        return
    wrapped = WeightWithFloat8AllGather(weight.detach(), module.config, weakref.ref(module))
    module.weight = nn.Parameter(wrapped, requires_grad=weight.requires_grad)
    module.register_state_dict_post_hook(_plain_weight_in_state_dict)


def _plain_weight_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # Checkpoints hold plain tensors (sharing storage, so in-place loads still reach the weight).
    key = prefix + "weight"
    state_dict[key] = _unwrap(state_dict[key])


def _unwrap(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, WeightWithFloat8AllGather):
        return t._tensor
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, WeightWithFloat8AllGather):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local._tensor, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    return t


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)


@torch.no_grad()
def precompute_float8_dynamic_scale_for_fsdp(model: nn.Module, *, cast: bool = True) -> None:
    """After ``optimizer.step()`` (and, with delayed scaling, after ``sync_float8_amax_and_scale_history``):
    fix the fp8 all-gather scale of every Float8Linear weight that FSDP2 gathers in fp8 — dynamic scaling: with
    ONE all-reduce(MAX) of the shards' amaxes, so the next all-gathers need no collective; delayed scaling:
    the scale the sync just computed (weights still without a history are left to the gathers).

    cast: also cast every local shard to fp8 now, all in one batched pass (one kernel launch per source
    dtype on CUDA), which the step's forward all-gathers and backward re-gathers then send as they are,
    instead of one cast per shard per gather. Costs 1 byte per local weight element until the next call.
    Delayed scaling records the shards' amaxes here, as those gathers would have.
    """
    from .linear import Float8Linear

    dynamic, delayed = [], []
    for m in model.modules():
        if not (isinstance(m, Float8Linear) and isinstance(_local(m.weight), WeightWithFloat8AllGather)):
            continue
        scaling = m.config.cast_config_weight.scaling_type
        if scaling is ScalingType.DYNAMIC:
            dynamic.append(m)
        elif scaling is ScalingType.DELAYED and cast and m.float8_amax_initialized:
            delayed.append(m)
    for w in [_local(m.weight) for m in dynamic + delayed]:
        w._precomputed = None  # last step's fp8 shards go before this step's are made, not after
    if dynamic:
        weights = [m.weight for m in dynamic]
        locals_ = [_local(w) for w in weights]
        amaxes = torch.stack(torch._foreach_norm([w._tensor for w in locals_], ord=math.inf)).to(torch.float32)
        shard_groups = {_shard_group(w) for w in weights if hasattr(w, "device_mesh")}
        if len(shard_groups) > 1:
            raise ValueError("precompute_float8_dynamic_scale_for_fsdp: weights are sharded over different meshes")
        if shard_groups and dist.is_initialized():
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=shard_groups.pop())
        # One scale computation (and one batched cast) per distinct (fp8 dtype, power-of-2 rounding): all of
        # them in practice, instead of a few tiny kernels per weight.
        by_setting = _indices_by(locals_, lambda w: (w._config.cast_config_weight.target_dtype,
                                                     w._config.round_scales_to_power_of_2))
        for (float8_dtype, round_pow2), idx in by_setting.items():
            group_amaxes = amaxes if len(idx) == len(weights) else torch.stack([amaxes[i] for i in idx])
            scales = amax_to_scale(group_amaxes, float8_dtype, round_scales_to_power_of_2=round_pow2)
            _set_precomputed([weights[i] for i in idx], scales, float8_dtype, cast)
    if delayed:
        weights = [m.weight for m in delayed]
        locals_ = [_local(w) for w in weights]
        shards = [w._tensor for w in locals_]
        # What each gather would record: the shard's amax, folded into the running max the next sync reduces.
        amax_bufs = [getattr(m, amax_buffer_name(Operand.WEIGHT)) for m in delayed]
        shard_amaxes = torch.stack(torch._foreach_norm(shards, ord=math.inf)).to(torch.float32)
        torch._foreach_copy_(amax_bufs, list(torch.maximum(torch.stack(amax_bufs), shard_amaxes).unbind(0)))
        scale_bufs = [getattr(m, scale_buffer_name(Operand.WEIGHT)) for m in delayed]
        by_dtype = _indices_by(locals_, lambda w: w._config.cast_config_weight.target_dtype)
        for float8_dtype, idx in by_dtype.items():
            _set_precomputed([weights[i] for i in idx], torch.stack([scale_bufs[i] for i in idx]), float8_dtype,
                             cast, [scale_bufs[i] for i in idx])


def _indices_by(items: list, key) -> dict:
    """Positions of ``items`` grouped by ``key(item)``, in first-seen order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups


def _shard_group(param: torch.Tensor):
    """The process group ``param`` is sharded over. FSDP2 shards on one mesh dimension: the only one, or with
    HSDP the last (replicas hold the same values, so the max over the shard group is the weight's)."""
    mesh = param.device_mesh
    if mesh.ndim == 1:
        return mesh.get_group()
    shard_dims = [i for i, p in enumerate(param.placements) if p.is_shard()]
    if len(shard_dims) != 1:
        raise ValueError(f"precompute_float8_dynamic_scale_for_fsdp: expected a weight sharded on one mesh dimension, "
                         f"got placements {param.placements}")
    return mesh.get_group(shard_dims[0])


def _set_precomputed(weights: list, scales: torch.Tensor, float8_dtype: torch.dtype, cast: bool,
                     scale_bufs: Optional[list] = None) -> None:
    locals_ = [_local(w) for w in weights]
    datas = cast_many_to_float8([w._tensor for w in locals_], scales, float8_dtype) if cast else [None] * len(weights)
    for i, (param, w, scale, data) in enumerate(zip(weights, locals_, scales.unbind(0), datas)):
        buf = scale_bufs[i] if scale_bufs is not None else None
        w._precomputed = Precomputed(scale, weakref.ref(param), param._version, data, buf,
                                     buf._version if buf is not None else 0)
