"""Scale arithmetic: amax, amax -> scale, and the saturating fp8 cast of raw data.

Convention: ``x_fp8 = saturate(x * scale)`` and ``x ~= x_fp8 / scale``; torch._scaled_mm wants the
reciprocal (the dequantisation factor), computed at the GEMM call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# Floor for amax: an all-zero tensor must give a finite scale.
EPS = 1e-12


def float8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def tensor_amax(x: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """max(|x|) over the whole tensor (axis=None, 0-d result) or along ``axis`` (keepdim).

    Returned in fp32: a max is exact in the input dtype, and fp32 is what the scale arithmetic and
    torch._scaled_mm need.
    """
    if axis is None and x.numel() == 0:  # e.g. an FSDP rank holding no rows of a small weight
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if axis is not None:
        amax = torch.linalg.vector_norm(x, ord=math.inf, dim=axis, keepdim=True)
    elif x.dim() >= 2:
        # Max of the per-row maxima, not one flat reduction: the same value (a max is exact), but under
        # torch.compile a row reduction has the loop shape of the producer's pointwise/row kernels, so
        # inductor fuses the amax into the kernel that writes the fp8 cast (delayed scaling: one pass
        # instead of two; H100, 4 Llama3-8B layers: 3.6 ms less cast time per step, docs/performance.md).
        # A flat reduction is split into chunks of arbitrary shape and always runs as its own kernel.
        # vector_norm(inf) rather than abs().amax(): no |x| intermediate in eager.
        amax = _max_of_row_maxima(torch.linalg.vector_norm(x, ord=math.inf, dim=-1).flatten())
    else:
        amax = torch.linalg.vector_norm(x, ord=math.inf)
    return amax.to(torch.float32)


# Inductor (torch 2.11-2.13, sm_90) runs a full reduction of more than 8192 elements as two kernels (a split
# reduction), and unrolls a reduction of at most 8 elements into pointwise code.
_UNSPLIT_REDUCTION = 8192
_UNROLLED_REDUCTION = 8


def _max_of_row_maxima(row_max: torch.Tensor) -> torch.Tensor:
    """max over a 1-D tensor of row maxima, written so that inductor reduces it in one kernel.

    Compiled, more than 8192 row maxima (16384 tokens) would be a split reduction: two more small kernels
    after the row reduction, where a flat amax of the whole tensor takes two in all (a lone H100 Linear
    16384 x 4096 -> 14336 ran 21 kernels against torchao's 18, ~0.08 ms of 5.1). Folding the vector into
    k <= 8 chunks first (an elementwise max of the chunks, which inductor unrolls into the final kernel's
    loads) leaves one reduction of at most 8192 elements. Zero padding cannot change a max of |x|; NaN
    still propagates. Eager runs the plain max: there every op is a kernel launch.
    """
    n = row_max.shape[0]
    if torch.compiler.is_compiling() and isinstance(n, int) and n > _UNSPLIT_REDUCTION:
        chunks = min(-(-n // _UNSPLIT_REDUCTION), _UNROLLED_REDUCTION)
        chunk = -(-n // chunks)
        padded = torch.nn.functional.pad(row_max, (0, chunks * chunk - n))
        row_max = padded.view(chunks, chunk).amax(dim=0)
    return row_max.amax()


def amax_to_scale(
    amax: torch.Tensor,
    float8_dtype: torch.dtype,
    *,
    round_scales_to_power_of_2: bool = False,
    margin: int = 0,
) -> torch.Tensor:
    """scale = fp8_max / clamp(amax, eps) / 2**margin, optionally rounded down to a power of 2.

    Never 0 or inf for finite amax: the eps floor bounds it above, the tiny floor below.
    """
    amax = amax.to(torch.float32)
    scale = float8_max(float8_dtype) / torch.clamp(amax, min=EPS)
    if margin:
        scale = scale / (2.0**margin)
    if round_scales_to_power_of_2:
        # Rounding down keeps |x * scale| <= fp8_max; a power of 2 makes the scaling itself exact.
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return torch.clamp(scale, min=torch.finfo(torch.float32).tiny)


def saturated_cast(x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    """Raw fp8 data of ``x * scale``, clamped to +-fp8_max before the conversion.

    The explicit clamp matters: backends disagree on overflow (CPU e4m3fn saturates, e5m2 -> inf).
    """
    fmax = float8_max(float8_dtype)
    scaled = x.to(torch.float32) * scale
    return scaled.clamp(min=-fmax, max=fmax).to(float8_dtype)

