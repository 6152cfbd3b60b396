"""`QuantizedTensor`: a quantised weight that `F.linear` / `F.embedding` accept in place of a float one.

Fields (the serialised ones are `qdata`, `scale`, `zero_point`; the rest is metadata):

    qdata        int4: uint8 (N, K/2), two unsigned nibbles per byte, byte = u[2i] << 4 | u[2i+1], where
                 u = q + 8 for symmetric int4 (q in [-8, 7]) and u = q for asymmetric int4 (q in [0, 15]);
                 int8: int8 (N, K); float8: float8_e4m3fn (N, K)
    scale        (N, K / group) dequantisation scales (x ~= (q - zero_point) * scale), in the format's
                 scale dtype; per-channel formats have one group per row: (N, 1)
    zero_point   uint8 (N, K / group) for asymmetric int4, else None
    block_size   (1, group) -- the elements one scale covers
    shape, dtype the logical (dequantised) shape and dtype; `dtype` is also the compute dtype
    scheme       a `QuantScheme` (weight format + optional dynamic activation format)
    kernel       which matmul `F.linear` runs (below); "reference" until `with_kernel` picks another

Kernels (`choose_kernel` decides from device, dtype and shape; `F.linear` never falls back silently):

    reference            dequantise (and fake-quantise activations with the same functions as QAT) + F.linear:
                         bit-identical to the QAT fake-quantised forward
    int4_tinygemm_cpu    torch._weight_int4pack_mm_for_cpu (CPU int4 packed layout, N % 16 == 0)
    int4_tinygemm_cuda   torch._weight_int4pack_mm (tensor-core layout; bf16, N % 8 == 0, K % 32 == 0, sm80+)
    int8pack_cpu         torch._weight_int8pack_mm (int8 weight x float activation, per-channel scale)
    int8_mm_rescale      CUDA: (x @ q.T) * scale, the int8 weight read as exact bf16 values
    scaled_mm_rowwise    torch._scaled_mm, e4m3 x e4m3 with per-token and per-channel scales (K, N % 16 == 0;
                         CUDA: bf16 output, sm89+)

For 8da4w the activations are quantised to int8 per token and dequantised with the QAT function, then
multiplied by the packed int4 weight through the int4 kernel: torch ships no int8 x int4 GEMM for x86
or CUDA (its `_dyn_quant_matmul_4bit` is KleidiAI, Arm only), so the int8 activation step is simulated
exactly while the weight stays 4-bit in memory and in the GEMM.

Ops: a fail-closed table. `__torch_function__` handles `F.linear` and `F.embedding`; `__torch_dispatch__`
handles detach/alias/clone/_to_copy; any other op raises NotImplementedError naming it (call
`dequantize()` first).

Imports only torch (and titan_fp8.torch_support, torch only).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from titan_fp8.torch_support import cpu_rowwise_scaled_mm_works

from .primitives import pack_int4, unpack_int4
from .schemes import QuantScheme

__all__ = ["QuantizedTensor", "choose_kernel", "KERNELS"]

aten = torch.ops.aten

KERNELS = ("reference", "int4_tinygemm_cpu", "int4_tinygemm_cuda", "int8pack_cpu", "int8_mm_rescale",
           "scaled_mm_rowwise")
_INNER = ("qdata", "scale", "zero_point", "scale_and_zero")

_FUNCTION_TABLE: dict[Callable, Callable] = {}
_ATEN_TABLE: dict[Callable, Callable] = {}


def _implements(table: dict, funcs: list):
    def register(handler):
        for f in funcs:
            table[f] = handler
        return handler

    return register


class QuantizedTensor(torch.Tensor):
    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    scale_and_zero: Optional[torch.Tensor]  # int4 tinygemm kernels only: (K/group, N, 2) scales and float zeros
    scheme: QuantScheme
    kernel: str

    @staticmethod
    def __new__(cls, qdata, scale, zero_point=None, *, scheme: QuantScheme, shape, dtype: torch.dtype,
                kernel: str = "reference", scale_and_zero=None):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype, device=qdata.device,
                                                   requires_grad=False)

    def __init__(self, qdata, scale, zero_point=None, *, scheme: QuantScheme, shape, dtype: torch.dtype,
                 kernel: str = "reference", scale_and_zero=None):
        self.qdata, self.scale, self.zero_point = qdata, scale, zero_point
        self.scheme, self.kernel, self.scale_and_zero = scheme, kernel, scale_and_zero

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_float(cls, weight: torch.Tensor, scheme: QuantScheme, dtype: Optional[torch.dtype] = None, *,
                   learned_scale: Optional[torch.Tensor] = None) -> "QuantizedTensor":
        """Quantise a float (N, K) weight; `dtype` (default: the weight's) is the logical/compute dtype.

        learned_scale: (N, groups) scales trained by QAT range learning, used instead of the weight's range
        (symmetric integer formats).
        """
        if weight.dim() != 2:
            raise ValueError(f"QuantizedTensor: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise ValueError(f"QuantizedTensor: expected a floating-point weight, got {weight.dtype}")
        fmt = scheme.weight
        weight = weight.detach()
        if learned_scale is None:
            scale, zero_point = fmt.choose_qparams(weight)
        else:
            if not fmt.supports_learned_scale:
                raise ValueError(f"QuantizedTensor: learned scales need a symmetric integer format, not {scheme.name}")
            want = (weight.shape[0], fmt.groups(weight.shape[1]))
            if tuple(learned_scale.shape) != want:
                raise ValueError(f"QuantizedTensor: learned scale has shape {tuple(learned_scale.shape)}, expected {want}")
            scale, zero_point = fmt.stored_scale(learned_scale), None
        q = fmt.quantize(weight, scale, zero_point)
        if fmt.kind == "int4":
            offset = 8 if fmt.symmetric else 0
            qdata = pack_int4((q.to(torch.int16) + offset).to(torch.uint8))
        else:
            qdata = q
        if zero_point is not None:
            zero_point = zero_point.to(torch.uint8)
        return cls(qdata, scale, zero_point, scheme=scheme, shape=weight.shape, dtype=dtype or weight.dtype)

    @classmethod
    def from_tensors(cls, qdata: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], *,
                     scheme: QuantScheme, shape, dtype: torch.dtype) -> "QuantizedTensor":
        """Rebuild from serialised fields, checking every dtype and shape (ValueError naming the field)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"logical shape must be 2-D, got {shape}")
        n, k = shape
        fmt = scheme.weight
        groups = fmt.groups(k)
        if fmt.kind == "int4":
            want_q = (torch.uint8, (n, k // 2))
        else:
            want_q = (fmt.qdtype, (n, k))
        expect = {"qdata": want_q, "scale": (fmt.scale_dtype, (n, groups))}
        if fmt.kind == "int4" and not fmt.symmetric:
            expect["zero_point"] = (torch.uint8, (n, groups))
        elif zero_point is not None:
            raise ValueError(f"zero_point given but scheme {scheme.name} is symmetric")
        got = {"qdata": qdata, "scale": scale, "zero_point": zero_point}
        for field, (want_dtype, want_shape) in expect.items():
            t = got[field]
            if t is None:
                raise ValueError(f"missing field {field}")
            if t.dtype != want_dtype:
                raise ValueError(f"{field} has dtype {t.dtype}, expected {want_dtype}")
            if tuple(t.shape) != want_shape:
                raise ValueError(f"{field} has shape {tuple(t.shape)}, expected {want_shape} for logical shape {shape}")
        if zero_point is not None and int(zero_point.max()) > 15:
            raise ValueError("zero_point values must lie in [0, 15]")
        return cls(qdata, scale, zero_point, scheme=scheme, shape=shape, dtype=dtype)

    def fields(self) -> dict[str, torch.Tensor]:
        """The serialised fields (reference layout only)."""
        if self.kernel not in ("reference", "int8pack_cpu", "int8_mm_rescale", "scaled_mm_rowwise"):
            raise ValueError(f"QuantizedTensor with kernel {self.kernel} holds a device-specific layout; "
                             "serialise the tensor before with_kernel()")
        out = {"qdata": self.qdata, "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        return out

    # -- metadata --------------------------------------------------------------------------------------

    @property
    def block_size(self) -> tuple[int, int]:
        return (1, self.scheme.weight.group_size or self.shape[-1])

    def nbytes_stored(self) -> int:
        """Bytes held by this tensor's inner tensors (its real memory)."""
        return sum(t.numel() * t.element_size() for t in self._inner().values())

    def _inner(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _INNER if getattr(self, name) is not None}

    def __repr__(self) -> str:
        return (f"QuantizedTensor(scheme={self.scheme.name}, shape={tuple(self.shape)}, block_size={self.block_size}, "
                f"dtype={self.dtype}, device={self.device}, kernel={self.kernel})")

    # -- dequantise --------------------------------------------------------------------------------------

    def int_data(self) -> torch.Tensor:
        """The quantised values, unpacked: int8 (N, K) (int4 as [-8, 7] or [0, 15]), or float8 (N, K)."""
        if self.kernel in ("int4_tinygemm_cpu", "int4_tinygemm_cuda"):
            raise ValueError("int_data() needs the reference layout")
        return _unpack_values(self.qdata, self.scheme.weight)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight (N, K) in `dtype` (default: the logical dtype)."""
        dtype = dtype or self.dtype
        if self.kernel in ("int4_tinygemm_cpu", "int4_tinygemm_cuda"):
            return _dequantize_tinygemm(self, dtype)
        zp = self.zero_point
        return self.scheme.weight.dequantize(self.int_data(), self.scale, zp, dtype)

    # -- kernels -----------------------------------------------------------------------------------------

    def with_kernel(self, kernel: Optional[str] = None) -> "QuantizedTensor":
        """A tensor that runs `kernel` (default: `choose_kernel(self)`), converting the layout if needed."""
        kernel = kernel or choose_kernel(self)[0]
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
        if kernel == self.kernel:
            return self
        if self.kernel != "reference":
            raise ValueError(f"cannot switch kernel {self.kernel} -> {kernel}: start from the reference layout")
        if kernel == "int4_tinygemm_cpu":
            qdata = aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qdata).to(torch.int32), 1)
            return QuantizedTensor(qdata, self.scale, self.zero_point, scheme=self.scheme, shape=self.shape,
                                   dtype=self.dtype, kernel=kernel, scale_and_zero=_scale_and_zero(self, self.dtype))
        if kernel == "int4_tinygemm_cuda":
            k = self.shape[1]
            inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            qdata = aten._convert_weight_to_int4pack(self.qdata.contiguous(), inner_k_tiles)
            return QuantizedTensor(qdata, self.scale, self.zero_point, scheme=self.scheme, shape=self.shape,
                                   dtype=self.dtype, kernel=kernel,
                                   scale_and_zero=_scale_and_zero(self, torch.bfloat16))
        return QuantizedTensor(self.qdata, self.scale, self.zero_point, scheme=self.scheme, shape=self.shape,
                               dtype=self.dtype, kernel=kernel)

    # -- torch.compile support -------------------------------------------------------------------------

    def __tensor_flatten__(self):
        return list(self._inner()), (self.scheme, self.kernel, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        scheme, kernel, dtype = ctx
        return QuantizedTensor(inner["qdata"], inner["scale"], inner.get("zero_point"), scheme=scheme,
                               shape=outer_size, dtype=dtype, kernel=kernel, scale_and_zero=inner.get("scale_and_zero"))

    # -- op tables -------------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _FUNCTION_TABLE.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _ATEN_TABLE.get(func)
        if handler is None:
            raise NotImplementedError(f"QuantizedTensor does not support {func}; call .dequantize() first")
        return handler(*args, **(kwargs or {}))


def _unpack_values(qdata: torch.Tensor, fmt) -> torch.Tensor:
    """Stored qdata (..., K/2 packed int4 | K) -> quantised values (..., K) in the format's qdtype."""
    if fmt.kind != "int4":
        return qdata
    u = unpack_int4(qdata).to(torch.int8)
    return u - 8 if fmt.symmetric else u


def _map_inner(t: QuantizedTensor, fn, dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
    inner = {name: fn(v) for name, v in t._inner().items()}
    dtype = dtype or t.dtype
    if "scale_and_zero" in inner and t.kernel == "int4_tinygemm_cpu":
        inner["scale_and_zero"] = inner["scale_and_zero"].to(dtype)  # the CPU kernel wants the activation dtype
    return QuantizedTensor(inner["qdata"], inner["scale"], inner.get("zero_point"), scheme=t.scheme, shape=t.shape,
                           dtype=dtype, kernel=t.kernel, scale_and_zero=inner.get("scale_and_zero"))


@_implements(_ATEN_TABLE, [aten.detach.default, aten.alias.default])
def _detach(t, *args, **kwargs):
    return _map_inner(t, lambda v: v)


@_implements(_ATEN_TABLE, [aten.clone.default])
def _clone(t, *args, **kwargs):
    return _map_inner(t, lambda v: v.clone())


@_implements(_ATEN_TABLE, [aten._to_copy.default])
def _to_copy(t, *, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False, memory_format=None):
    """.to(device) moves every inner tensor; .to(dtype) changes the logical/compute dtype only."""
    if dtype is not None and not dtype.is_floating_point:
        raise NotImplementedError(f"QuantizedTensor cannot be cast to {dtype}")
    if device is not None and torch.device(device).type != t.device.type and t.kernel != "reference" \
            and t.kernel.startswith("int4"):
        raise ValueError(f"QuantizedTensor with kernel {t.kernel} is tied to its device; move the reference layout")
    return _map_inner(t, lambda v: v.to(device=device, non_blocking=non_blocking) if device is not None else v, dtype)


# --------------------------------------------------------------------------------------------------
# Kernel choice and the int4 tinygemm layout
# --------------------------------------------------------------------------------------------------


def choose_kernel(t: QuantizedTensor) -> tuple[str, str]:
    """(kernel, why) for a Linear weight on its current device and dtype."""
    n, k = t.shape
    fmt, dev = t.scheme.weight, t.device.type
    cap = torch.cuda.get_device_capability(t.device) if dev == "cuda" else (0, 0)
    if fmt.kind == "int4":
        if dev == "cpu":
            if n % 16 == 0:
                return "int4_tinygemm_cpu", "int4 packed CPU kernel"
            return "reference", f"out_features {n} not a multiple of 16 (CPU int4 kernel)"
        if dev == "cuda":
            if t.dtype != torch.bfloat16:
                return "reference", f"CUDA int4 kernel needs bfloat16, model dtype is {t.dtype}"
            if cap < (8, 0) or n % 8 != 0 or k % 32 != 0:
                return "reference", f"CUDA int4 kernel needs sm80+, N % 8 == 0, K % 32 == 0 (sm{cap[0]}{cap[1]}, N={n}, K={k})"
            return "int4_tinygemm_cuda", "int4 tensor-core kernel"
    if fmt.kind == "int8":
        if dev == "cpu":
            return "int8pack_cpu", "int8 weight-only CPU kernel"
        if dev == "cuda":
            return "int8_mm_rescale", "int8 weight read as bf16 values, per-channel scale on the output"
    if fmt.kind == "float8_e4m3":
        if k % 16 != 0 or n % 16 != 0:
            return "reference", f"_scaled_mm needs K and N multiples of 16 (K={k}, N={n})"
        if dev == "cpu":
            if not cpu_rowwise_scaled_mm_works():
                return "reference", f"this torch's ({torch.__version__}) CPU _scaled_mm has no rowwise scales"
            return "scaled_mm_rowwise", "float8 _scaled_mm (CPU)"
        if dev == "cuda":
            if t.dtype != torch.bfloat16 or cap < (8, 9):
                return "reference", f"CUDA rowwise _scaled_mm needs bfloat16 output and sm89+ ({t.dtype}, sm{cap[0]}{cap[1]})"
            return "scaled_mm_rowwise", "float8 rowwise _scaled_mm"
    return "reference", f"no kernel for {fmt.kind} on {dev}"


def _scale_and_zero(t: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """tinygemm's (K/group, N, 2) scales and float zeros: w = (u - 8) * scale + zero for nibble u."""
    scale = t.scale.float()  # (N, G)
    if t.zero_point is None:  # symmetric: u = q + 8, so w = (u - 8) * scale
        zero = torch.zeros_like(scale)
    else:  # asymmetric: w = (u - zp) * scale = (u - 8) * scale + (8 - zp) * scale
        zero = (8.0 - t.zero_point.float()) * scale
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (G, N, 2)


def _int4_mm(x2: torch.Tensor, t: QuantizedTensor) -> torch.Tensor:
    gs = t.scheme.weight.group_size
    if t.kernel == "int4_tinygemm_cpu":
        sz = t.scale_and_zero if t.scale_and_zero.dtype == x2.dtype else t.scale_and_zero.to(x2.dtype)
        return aten._weight_int4pack_mm_for_cpu(x2, t.qdata, gs, sz)
    if x2.dtype != torch.bfloat16:
        raise ValueError(f"int4_tinygemm_cuda needs bfloat16 activations, got {x2.dtype}")
    return aten._weight_int4pack_mm(x2, t.qdata, gs, t.scale_and_zero)


def _dequantize_tinygemm(t: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    # The kernel's own view of the weight: identity @ W^T, in row chunks (as torchao's tensor-core layout does).
    k = t.shape[1]
    compute = torch.bfloat16 if t.kernel == "int4_tinygemm_cuda" else torch.float32
    cols = []
    for start in range(0, k, 1024):
        eye = torch.eye(k, dtype=compute, device=t.device)[start:start + 1024].contiguous()
        cols.append(_int4_mm(eye, t))  # (chunk, N)
    return torch.cat(cols).t().contiguous().to(dtype)  # (N, K)


# --------------------------------------------------------------------------------------------------
# F.linear and F.embedding
# --------------------------------------------------------------------------------------------------


@_implements(_FUNCTION_TABLE, [F.linear])
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(x, QuantizedTensor) or isinstance(bias, QuantizedTensor) or not isinstance(weight, QuantizedTensor):
        raise NotImplementedError("F.linear supports a QuantizedTensor as the weight only")
    w = weight
    act = w.scheme.activation
    if w.kernel == "reference":  # exactly the fake-quantised forward of QAT
        xq = act.quantize_dequantize(x) if act is not None else x
        return F.linear(xq, w.dequantize(x.dtype), bias)

    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    if w.kernel in ("int4_tinygemm_cpu", "int4_tinygemm_cuda"):
        if act is not None:  # 8da4w: int8 per-token activation quantisation, same function as QAT
            x2 = act.quantize_dequantize(x2)
        y = _int4_mm(x2, w)
    elif w.kernel == "int8pack_cpu":
        y = aten._weight_int8pack_mm(x2, w.qdata, w.scale.reshape(n).to(x2.dtype))
    elif w.kernel == "int8_mm_rescale":
        y = torch.mm(x2, w.qdata.to(x2.dtype).t()) * w.scale.reshape(1, n).to(x2.dtype)
    elif w.kernel == "scaled_mm_rowwise":
        x_scale, _ = act.choose_qparams(x2)  # (M, 1) fp32
        xq = act.quantize(x2, x_scale, None)  # (M, K) e4m3, row-major
        out_dtype = x2.dtype
        y = torch._scaled_mm(xq, w.qdata.t(), scale_a=x_scale.float().contiguous(),
                             scale_b=w.scale.float().reshape(1, n).contiguous(), out_dtype=out_dtype,
                             use_fast_accum=x2.is_cuda)
    else:  # pragma: no cover - KERNELS is closed
        raise NotImplementedError(f"kernel {w.kernel}")
    y = y.to(x.dtype).reshape(*lead, n)
    return y + bias if bias is not None else y


@_implements(_FUNCTION_TABLE, [F.embedding])
def _embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False) -> torch.Tensor:
    if not isinstance(weight, QuantizedTensor) or isinstance(input, QuantizedTensor):
        raise NotImplementedError("F.embedding supports a QuantizedTensor as the weight only")
    if max_norm is not None:
        raise NotImplementedError("F.embedding with max_norm renormalises the table in place: not supported "
                                  "on a QuantizedTensor")
    if weight.kernel != "reference":
        return F.embedding(input, weight.dequantize(), padding_idx)
    # Groups lie along the row, so gathering rows first and dequantising them equals dequantising the table.
    fmt = weight.scheme.weight
    q = _unpack_values(weight.qdata[input], fmt)  # (..., D)
    zp = weight.zero_point[input] if weight.zero_point is not None else None
    return fmt.dequantize(q, weight.scale[input], zp, weight.dtype)
