"""Float8TrainingTensor: fp8 data + scale + GEMM-role metadata, and its fail-closed op table.

The tensor looks like a tensor of its original dtype (``dtype`` = ``_orig_dtype``) so autograd and
FSDP treat it as the weight/activation it stands for. Only the ops in FLOAT8_OPS_TABLE are allowed;
anything else raises NotImplementedError naming the op, because silently dequantising (or worse,
running an op on raw fp8 bytes) hides precision bugs.

Scale layout: tensorwise scales are 0-d; axiswise scales have the data's shape with a 1 at the
scaled (contracted) dimension, so they broadcast against ``_data`` and follow it through
transposes and slices.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .config import Gemm, Operand
from .scaled_mm import MMConfig, float8_mm

aten = torch.ops.aten

FLOAT8_OPS_TABLE: dict[Any, Callable] = {}


def implements(aten_ops: list) -> Callable:
    """Register one handler for the listed aten ops."""

    def decorator(fn: Callable) -> Callable:
        for op in aten_ops:
            FLOAT8_OPS_TABLE[op] = fn
        return fn

    return decorator


class Float8TrainingTensor(torch.Tensor):
    _data: torch.Tensor
    _scale: torch.Tensor
    _orig_dtype: torch.dtype
    _role: Operand
    _gemm: Gemm
    _axiswise_dim: Optional[int]
    _mm_config: MMConfig

    @staticmethod
    def __new__(
        cls,
        data: torch.Tensor,
        scale: torch.Tensor,
        orig_dtype: torch.dtype,
        role: Operand,
        gemm: Gemm,
        axiswise_dim: Optional[int] = None,
        mm_config: MMConfig = MMConfig(),
    ):
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            data.size(),
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=orig_dtype,
            layout=data.layout,
            requires_grad=False,
            device=data.device,
        )
        self._data = data
        self._scale = scale
        self._orig_dtype = orig_dtype
        self._role = role
        self._gemm = gemm
        self._axiswise_dim = axiswise_dim
        self._mm_config = mm_config
        return self

    def __repr__(self) -> str:
        return (
            f"Float8TrainingTensor(role={self._role.value}, gemm={self._gemm.value}, "
            f"axiswise_dim={self._axiswise_dim}, orig_dtype={self._orig_dtype}, shape={tuple(self.shape)}, "
            f"fp8={self._data.dtype}, scale={self._scale.shape})"
        )

    def to_original_precision(self) -> torch.Tensor:
        return (self._data.to(torch.float32) / self._scale).to(self._orig_dtype)

    def _with(self, data: torch.Tensor, scale: torch.Tensor, **meta) -> "Float8TrainingTensor":
        """A new tensor with this one's metadata, overridden by ``meta``."""
        return Float8TrainingTensor(
            data,
            scale,
            meta.get("orig_dtype", self._orig_dtype),
            meta.get("role", self._role),
            meta.get("gemm", self._gemm),
            meta.get("axiswise_dim", self._axiswise_dim),
            meta.get("mm_config", self._mm_config),
        )

    def __tensor_flatten__(self):
        ctx = (self._orig_dtype, self._role, self._gemm, self._axiswise_dim, self._mm_config)
        return ["_data", "_scale"], ctx

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        orig_dtype, role, gemm, axiswise_dim, mm_config = ctx
        return Float8TrainingTensor(
            inner_tensors["_data"], inner_tensors["_scale"], orig_dtype, role, gemm, axiswise_dim, mm_config
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = FLOAT8_OPS_TABLE.get(func)
        if handler is None:
            raise NotImplementedError(
                f"Float8TrainingTensor does not support {func}; supported ops: "
                f"{sorted(str(op) for op in FLOAT8_OPS_TABLE)}. Call .to_original_precision() first if a "
                "high-precision result is intended."
            )
        return handler(func, args, kwargs or {})

    # Everything goes to __torch_dispatch__, where the op table decides.
    __torch_function__ = torch._C._disabled_torch_function_impl


def _is_f8(t: Any) -> bool:
    return isinstance(t, Float8TrainingTensor)


def _tensorwise(t: Float8TrainingTensor) -> bool:
    return t._axiswise_dim is None


# ---------------------------------------------------------------------- GEMMs


@implements([aten.mm.default])
def _mm(func, args, kwargs):
    a, b = args[0], args[1]
    if not (_is_f8(a) and _is_f8(b)):
        raise NotImplementedError(
            f"{func}: both operands must be Float8TrainingTensor, got {type(a).__name__} @ {type(b).__name__}"
        )
    if (a._axiswise_dim, b._axiswise_dim) not in ((None, None), (1, 0)):
        raise NotImplementedError(
            f"{func}: operands must both be tensorwise, or scaled along the contracted dimension "
            f"(axiswise_dim 1 @ axiswise_dim 0), got {a._axiswise_dim} @ {b._axiswise_dim}"
        )
    a_scale = a._scale if _tensorwise(a) else a._scale.reshape(a.shape[0], 1)  # (M, 1)
    b_scale = b._scale if _tensorwise(b) else b._scale.reshape(1, b.shape[1])  # (1, N)
    # The output takes the first operand's precision and GEMM settings.
    return float8_mm(a._data, a_scale, b._data, b_scale, out_dtype=a._orig_dtype, mm_config=a._mm_config)


@implements([aten.addmm.default])
def _addmm(func, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or _is_f8(bias):
        raise NotImplementedError(f"{func}: only beta=1, alpha=1 and a high-precision bias are supported")
    return _mm(aten.mm.default, (a, b), {}) + bias


# ---------------------------------------------------------------------- layout / views


@implements([aten.t.default])
def _t(func, args, kwargs):
    return _transpose(aten.transpose.int, (args[0], 0, 1), {})


@implements([aten.transpose.int])
def _transpose(func, args, kwargs):
    t, d0, d1 = args[0], args[1], args[2]
    d0, d1 = d0 % t.dim(), d1 % t.dim()
    axis = t._axiswise_dim
    if axis is not None:
        axis = d1 if axis == d0 else d0 if axis == d1 else axis
    scale = t._scale if _tensorwise(t) else t._scale.transpose(d0, d1)
    return t._with(t._data.transpose(d0, d1), scale, axiswise_dim=axis)


@implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _view(func, args, kwargs):
    t, shape = args[0], list(args[1])
    if _tensorwise(t):
        return t._with(func(t._data, shape), t._scale)
    # Axiswise: only reshapes that keep the scaled dim as the last dim and its size, so every
    # scale keeps describing the same elements.
    last = t.dim() - 1
    if t._axiswise_dim != last or shape[-1] not in (t.shape[-1], -1):
        raise NotImplementedError(
            f"{func}: axiswise Float8TrainingTensor can only be reshaped keeping its scaled last dim, "
            f"got {tuple(t.shape)} (axiswise_dim={t._axiswise_dim}) -> {shape}"
        )
    data = func(t._data, shape)
    scale = t._scale.reshape(*data.shape[:-1], 1)
    return t._with(data, scale, axiswise_dim=data.dim() - 1)


@implements([aten.as_strided.default])
def _as_strided(func, args, kwargs):
    # FSDP2 views the all-gathered weight with as_strided to its original size.
    t = args[0]
    if not _tensorwise(t):
        raise NotImplementedError(f"{func} is only supported for tensorwise Float8TrainingTensor")
    return t._with(func(t._data, *args[1:], **kwargs), t._scale)


@implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    t = args[0]
    return t._with(func(t._data), t._scale)


@implements([aten.clone.default])
def _clone(func, args, kwargs):
    t = args[0]
    return t._with(func(t._data, **kwargs), t._scale.clone())


@implements([aten._to_copy.default])
def _to_copy(func, args, kwargs):
    # dtype= changes the precision the tensor stands for (e.g. autocast); the fp8 bytes stay fp8.
    t = args[0]
    kwargs = dict(kwargs)
    orig_dtype = kwargs.pop("dtype", None) or t._orig_dtype
    if orig_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise NotImplementedError(f"{func}: Float8TrainingTensor can stand for bf16/fp16/fp32, not {orig_dtype}")
    data = func(t._data, **kwargs)
    scale = func(t._scale, **{k: v for k, v in kwargs.items() if k in ("device", "non_blocking")})
    return t._with(data, scale, orig_dtype=orig_dtype)


@implements([aten.copy_.default])
def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if not (_is_f8(dst) and _is_f8(src)) or dst._data.dtype != src._data.dtype:
        raise NotImplementedError(
            f"{func}: only Float8TrainingTensor -> Float8TrainingTensor of the same fp8 dtype is supported "
            "(casting high precision into an existing fp8 tensor would need its scale)"
        )
    if dst._axiswise_dim != src._axiswise_dim:
        raise NotImplementedError(f"{func}: scaling layouts differ ({src._axiswise_dim} -> {dst._axiswise_dim})")
    dst._data.copy_(src._data)
    dst._scale.copy_(src._scale)
    return dst


@implements([aten.constant_pad_nd.default])
def _pad(func, args, kwargs):
    # Zero padding of the contracted dim keeps a GEMM exact; used to round M up to a multiple of 16.
    t, pad = args[0], list(args[1])
    value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    if value != 0:
        raise NotImplementedError(f"{func}: only zero padding is supported, got value={value}")
    padded_dims = {t.dim() - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    if not _tensorwise(t) and padded_dims - {t._axiswise_dim}:
        raise NotImplementedError(f"{func}: axiswise tensors can only be padded along the scaled dim")
    return t._with(func(t._data, pad, 0.0), t._scale)


# ---------------------------------------------------------------------- sharding: split / slice / cat


def _scale_along(t: Float8TrainingTensor, dim: int) -> bool:
    """Whether an op along ``dim`` must be applied to the scale too (axiswise, other dim)."""
    return not _tensorwise(t) and dim % t.dim() != t._axiswise_dim


@implements([aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default])
def _split(func, args, kwargs):
    t, sizes = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    datas = func(t._data, sizes, dim)
    scales = func(t._scale, sizes, dim) if _scale_along(t, dim) else [t._scale] * len(datas)
    return [t._with(d, s) for d, s in zip(datas, scales)]


@implements([aten.slice.Tensor])
def _slice(func, args, kwargs):
    t = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    data = func(t._data, *args[1:], **kwargs)
    scale = func(t._scale, *args[1:], **kwargs) if _scale_along(t, dim) else t._scale
    return t._with(data, scale)


@implements([aten.cat.default])
def _cat(func, args, kwargs):
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    first = tensors[0]
    if not all(_is_f8(t) and t._data.dtype == first._data.dtype for t in tensors):
        raise NotImplementedError(f"{func}: all inputs must be Float8TrainingTensor of the same fp8 dtype")
    if any(t._axiswise_dim != first._axiswise_dim for t in tensors):
        raise NotImplementedError(f"{func}: inputs have different scaling layouts")
    data = func([t._data for t in tensors], dim)
    if _scale_along(first, dim):
        return first._with(data, func([t._scale for t in tensors], dim))
    # Concatenating along a dimension the scale does not vary with needs one shared scale.
    if not all(t._scale is first._scale or torch.equal(t._scale, first._scale) for t in tensors[1:]):
        raise NotImplementedError(f"{func}: inputs have different scales; dequantise first")
    return first._with(data, first._scale)


@implements([aten.is_same_size.default])
def _is_same_size(func, args, kwargs):
    return args[0].shape == args[1].shape


__all__ = ["Float8TrainingTensor", "FLOAT8_OPS_TABLE", "implements"]
