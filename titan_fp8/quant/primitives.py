"""Quantise / dequantise math shared by QAT fake quantisation and the serving format.

Everything here works on the LAST dimension of a tensor, split into groups of `group_size` elements
(`group_size == 0`: the whole row — per-channel for a weight (N, K), per-token for activations (..., K)).
Each group has one scale (and, for asymmetric integer formats, one zero point):

    integer   q = clamp(round(x / scale) + zero_point, qmin, qmax)      x' = (q - zero_point) * scale
    float8    q = clamp(x / scale, -448, 448).to(float8_e4m3fn)         x' = q * scale

Scales are always *dequantisation* scales (x ~= q * scale), computed in fp32 from the group's range and
rounded to the format's `scale_dtype` BEFORE x is divided by them, so the stored scale is exactly the one
used to quantise. Dequantisation computes in fp32 and casts to the requested dtype once.

QAT (`fake_quantize`) and the serving tensor (`QuantizedTensor`) call these same functions, so a converted
model reproduces the fake-quantised forward bit for bit on the reference (dequantise) path.

Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["QuantFormat", "pack_int4", "unpack_int4", "fake_quantize", "fake_quantize_learned_scale", "SCALE_EPS",
           "FLOAT8_MAX"]

SCALE_EPS = 1e-12  # smallest scale: an all-zero group quantises to zeros instead of dividing by zero
FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448

_KINDS = {  # kind -> (qmin, qmax, storage dtype of the unpacked values)
    "int4": (-8, 7, torch.int8),  # symmetric range; asymmetric int4 uses [0, 15] (below)
    "int8": (-128, 127, torch.int8),
    "float8_e4m3": (-FLOAT8_MAX, FLOAT8_MAX, torch.float8_e4m3fn),
}


@dataclass(frozen=True)
class QuantFormat:
    """How one tensor is quantised along its last dimension.

    kind: "int4", "int8" or "float8_e4m3". symmetric: integer formats only (float8 is always symmetric);
    asymmetric int4 uses the unsigned range [0, 15] with a per-group zero point, asymmetric int8 the range
    [-128, 127] with a zero point in it. group_size: elements per scale along the last dim (0 = whole row).
    scale_dtype: storage dtype of the scales (scales are rounded to it before use).
    """

    kind: str
    symmetric: bool = True
    group_size: int = 0
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"QuantFormat.kind: expected one of {', '.join(_KINDS)}, got {self.kind!r}")
        if self.kind == "float8_e4m3" and not self.symmetric:
            raise ValueError("QuantFormat: float8 formats are symmetric")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(f"QuantFormat.group_size: expected an integer >= 0, got {self.group_size!r}")

    # -- ranges -----------------------------------------------------------------------------------------

    @property
    def is_float8(self) -> bool:
        return self.kind == "float8_e4m3"

    @property
    def qmin(self) -> float:
        if self.kind == "int4" and not self.symmetric:
            return 0
        return _KINDS[self.kind][0]

    @property
    def qmax(self) -> float:
        if self.kind == "int4" and not self.symmetric:
            return 15
        return _KINDS[self.kind][1]

    @property
    def qdtype(self) -> torch.dtype:
        """dtype of the unpacked quantised values (int4 values live in int8 until packed)."""
        return _KINDS[self.kind][2]

    def groups(self, k: int) -> int:
        """Number of groups in a row of length k (raises if k is not a multiple of group_size)."""
        g = self.group_size or k
        if k % g != 0:
            raise ValueError(f"last dimension {k} is not a multiple of group_size {g}")
        return k // g

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        return x.reshape(*x.shape[:-1], self.groups(k), self.group_size or k)  # (..., G, group)

    # -- the three functions ----------------------------------------------------------------------------

    def choose_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (..., K) -> scale (..., G) in scale_dtype, zero_point (..., G) fp32 holding integers, or None."""
        xg = self._grouped(x.detach().float())  # (..., G, group)
        if self.symmetric:
            amax = xg.abs().amax(dim=-1)  # (..., G)
            # Integer: map [-amax, amax] onto [qmin, qmax] (int4: amax / 7.5, as torchao); float8: amax / 448.
            half_range = FLOAT8_MAX if self.is_float8 else (self.qmax - self.qmin) / 2
            scale = round_to_dtype((amax / half_range).clamp(min=SCALE_EPS), self.scale_dtype)
            return scale, None
        lo = xg.amin(dim=-1).clamp(max=0.0)  # the range always holds 0, so 0 is exactly representable
        hi = xg.amax(dim=-1).clamp(min=0.0)
        scale = round_to_dtype(((hi - lo) / (self.qmax - self.qmin)).clamp(min=SCALE_EPS), self.scale_dtype)
        zero_point = (self.qmin - torch.round(lo / scale.float())).clamp(self.qmin, self.qmax)
        return scale, zero_point

    @property
    def supports_learned_scale(self) -> bool:
        """Range learning (a trained per-group scale) is defined for symmetric integer formats."""
        return self.symmetric and not self.is_float8

    def stored_scale(self, learned: torch.Tensor) -> torch.Tensor:
        """A learned (fp32, trainable) scale as the format stores and uses it: > 0, rounded to scale_dtype."""
        return round_to_dtype(learned.detach().float().clamp(min=SCALE_EPS), self.scale_dtype)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> torch.Tensor:
        """x (..., K) -> quantised values (..., K) in `qdtype` (int4 unpacked, one value per int8)."""
        xg = self._grouped(x.float())  # (..., G, group)
        s = scale.float().unsqueeze(-1)  # (..., G, 1)
        if self.is_float8:
            return (xg / s).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(self.qdtype).reshape(x.shape)
        q = torch.round(xg / s)
        if zero_point is not None:
            q = q + zero_point.float().unsqueeze(-1)
        return q.clamp(self.qmin, self.qmax).to(self.qdtype).reshape(x.shape)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
        """Quantised values (..., K) -> (..., K) in dtype, computed in fp32."""
        qg = self._grouped(q.float())  # (..., G, group)
        if zero_point is not None:
            qg = qg - zero_point.float().unsqueeze(-1)
        return (qg * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(x)) in x's dtype: the fake-quantised value (no gradient handling)."""
        scale, zero_point = self.choose_qparams(x)
        return self.dequantize(self.quantize(x, scale, zero_point), scale, zero_point, x.dtype)

    def describe(self) -> str:
        sym = "symmetric" if self.symmetric else "asymmetric"
        gran = f"group {self.group_size}" if self.group_size else "per row"
        return f"{self.kind} {sym}, {gran}, {str(self.scale_dtype).replace('torch.', '')} scales"


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x rounded (to nearest, ties to even) to dtype, with the same result eager and compiled.

    Inside one fused kernel inductor keeps bf16 intermediates in fp32 (its `emulate_precision_casts` is off
    by default), so `.to(torch.bfloat16)` followed by `.float()` does not round there: compiled QAT used
    unrounded scales and its forward differed from the exported model's (most weights of a group 32
    int4 fake quantisation, measured). Rounding with integer ops on the bits is exact in both.
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.float().view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000  # keep the high half, round to nearest even
    return bits.view(torch.float32).to(dtype)


# --------------------------------------------------------------------------------------------------
# int4 packing: two values per byte
# --------------------------------------------------------------------------------------------------


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values (..., K) in [0, 15], K even -> uint8 (..., K/2); byte = u[2i] << 4 | u[2i+1].

    (High nibble first: the byte order `torch._convert_weight_to_int4pack` on CUDA expects.)
    """
    if u.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4: last dimension must be even, got {u.shape[-1]}")
    u = u.to(torch.uint8)
    return (u[..., 0::2] << 4) | u[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K/2) -> uint8 (..., K) with values in [0, 15]; inverse of pack_int4."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8, got {packed.dtype}")
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# --------------------------------------------------------------------------------------------------
# Fake quantisation with a straight-through gradient
# --------------------------------------------------------------------------------------------------


# Both functions below are written with detach() rather than as torch.autograd.Function: compiled on CUDA
# with torch 2.11, the straight-through Function (backward = the incoming gradient, returned as is) lost
# the gradients of the weights it fed (a compiled 8da4w block's weight gradients came out ~0 and its
# activations were not saved; eager, and CPU with torch 2.13, were right). Plain autograd ops compile
# everywhere. Each returns `exact + (surrogate - surrogate.detach())`: the value is the serving format's
# dequantize(quantize(.)) bit for bit (the second term is +0 wherever the input is finite), the gradient
# is the surrogate's.


def fake_quantize(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Quantise and dequantise x in its own dtype; gradients pass straight through (identity)."""
    return fmt.quantize_dequantize(x.detach()) + (x - x.detach())


def fake_quantize_learned_scale(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Fake-quantise x (..., K) with a trainable per-group scale (..., K // group) (range learning).

    Symmetric integer formats only. The forward equals the serving format's dequantize(quantize(x)) with
    `fmt.stored_scale(scale)` as its stored scale, bit for bit. The backward is LSQ (Esser et al., 2019):
    with v = x / s and q = clamp(round(v), qmin, qmax),

        d out / d x = 1 where qmin <= v <= qmax, else 0
        d out / d s = q - v where qmin <= v <= qmax, else q      (summed over the group)

    which is what autograd gives for clamp(v) with its rounding straight through, times s. The gradient
    reaches the fp32 master scale straight through its rounding to scale_dtype.
    """
    if not fmt.supports_learned_scale:
        raise ValueError(f"learned scales need a symmetric integer format, got {fmt.describe()}")
    stored = fmt.stored_scale(scale)  # detached
    exact = fmt.dequantize(fmt.quantize(x.detach(), stored, None), stored, None, x.dtype)
    s = (scale.float() + (stored.float() - scale.float()).detach()).unsqueeze(-1)  # value: stored; grad: 1
    v = (fmt._grouped(x.float()) / s).clamp(fmt.qmin, fmt.qmax)  # (..., G, group)
    surrogate = ((v + (torch.round(v) - v).detach()) * s).reshape(x.shape)
    return exact + (surrogate - surrogate.detach()).to(x.dtype)
