"""The fp8 GEMM: torch._scaled_mm (or its emulation) behind one contract check.

CPU `_scaled_mm` accepts layouts and shapes CUDA rejects, so code that passes on CPU could fail on
an H100. We check the CUDA contract ourselves, on every backend and in emulation, so both fail the
same way with a message that says what to fix.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from titan_fp8.torch_support import cpu_rowwise_scaled_mm_works

from .config import FLOAT8_DTYPES

HIGH_PRECISION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# torch 2.11's CPU (oneDNN) _scaled_mm takes per-tensor scales only; later versions take rowwise.
# Probed once at import (a 16x16 GEMM), never inside a compiled region.
CPU_ROWWISE_SCALED_MM = cpu_rowwise_scaled_mm_works()
if not CPU_ROWWISE_SCALED_MM:
    logging.getLogger(__name__).info(
        "float8: this torch's CPU _scaled_mm takes per-tensor scales only; rowwise fp8 GEMMs on CPU are emulated"
    )


class ScaledMMContractError(RuntimeError):
    """An fp8 GEMM was called with operands CUDA's torch._scaled_mm would reject."""


class MMConfig(NamedTuple):
    """What the GEMM an fp8 operand feeds needs to know (carried on Float8TrainingTensor)."""

    emulate: bool = False
    use_fast_accum: bool = False


def check_scaled_mm_contract(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> None:
    """Raise ScaledMMContractError unless ``a @ b`` is a valid CUDA torch._scaled_mm call.

    a: (M, K) row-major fp8; b: (K, N) column-major fp8; K and N multiples of 16; fp32 scales,
    either both scalar (tensorwise) or a_scale (M, 1) and b_scale (1, N) (rowwise).
    """
    if a.dim() != 2 or b.dim() != 2:
        raise ScaledMMContractError(f"fp8 GEMM takes 2-D operands, got {tuple(a.shape)} @ {tuple(b.shape)}")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ScaledMMContractError(f"fp8 GEMM shape mismatch: {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype not in FLOAT8_DTYPES or b.dtype not in FLOAT8_DTYPES:
        raise ScaledMMContractError(f"fp8 GEMM operands must be float8, got {a.dtype} @ {b.dtype}")
    if a.dtype == b.dtype == torch.float8_e5m2:
        raise ScaledMMContractError("torch._scaled_mm does not support float8_e5m2 @ float8_e5m2")
    if out_dtype not in HIGH_PRECISION_DTYPES:
        raise ScaledMMContractError(f"fp8 GEMM output dtype must be one of {HIGH_PRECISION_DTYPES}, got {out_dtype}")
    if k % 16 or n % 16:
        raise ScaledMMContractError(
            f"fp8 GEMM {m}x{k} @ {k}x{n}: K={k} and N={n} must be multiples of 16 (torch._scaled_mm on CUDA)"
        )
    if not (a.stride(1) == 1 and (m <= 1 or a.stride(0) >= k)):
        raise ScaledMMContractError(
            f"fp8 GEMM: first operand must be row-major, got shape {tuple(a.shape)} stride {a.stride()} "
            "(use .contiguous())"
        )
    if not (b.stride(0) == 1 and (n <= 1 or b.stride(1) >= k)):
        raise ScaledMMContractError(
            f"fp8 GEMM: second operand must be column-major, got shape {tuple(b.shape)} stride {b.stride()} "
            "(use .t().contiguous().t())"
        )
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ScaledMMContractError(f"fp8 GEMM scales must be float32, got {a_scale.dtype} and {b_scale.dtype}")
    tensorwise = a_scale.numel() == 1 and b_scale.numel() == 1 and a_scale.dim() <= 1 and b_scale.dim() <= 1
    rowwise = tuple(a_scale.shape) == (m, 1) and tuple(b_scale.shape) == (1, n)
    if not (tensorwise or rowwise):
        raise ScaledMMContractError(
            f"fp8 GEMM {m}x{k} @ {k}x{n}: scales must be both scalar (tensorwise) or ({m}, 1) and (1, {n}) "
            f"(rowwise), got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )


def float8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    mm_config: MMConfig,
) -> torch.Tensor:
    """(a / a_scale) @ (b / b_scale) in ``out_dtype``; scales are the cast multipliers."""
    check_scaled_mm_contract(a, a_scale, b, b_scale, out_dtype)
    a_inv, b_inv = a_scale.reciprocal(), b_scale.reciprocal()
    rowwise = a_inv.numel() != 1
    # Without a rowwise CPU kernel the same fp8 operands are multiplied by emulation: identical
    # inputs, a different GEMM implementation (precision is unchanged, it is not a bf16 fallback).
    if mm_config.emulate or (rowwise and a.device.type == "cpu" and not CPU_ROWWISE_SCALED_MM):
        # Same fp8-rounded operands, high-precision product: what a GPU without fp8 GEMMs can do.
        out = (a.to(torch.float32) * a_inv) @ (b.to(torch.float32) * b_inv)
        return out.to(out_dtype)
    if rowwise and a.is_cuda and out_dtype != torch.bfloat16:
        # CUDA's rowwise kernels write bf16 only.
        out = torch._scaled_mm(
            a, b, scale_a=a_inv, scale_b=b_inv.contiguous(), out_dtype=torch.bfloat16,
            use_fast_accum=mm_config.use_fast_accum,
        )
        return out.to(out_dtype)
    return torch._scaled_mm(
        a, b, scale_a=a_inv, scale_b=b_inv.contiguous(), out_dtype=out_dtype, use_fast_accum=mm_config.use_fast_accum
    )
