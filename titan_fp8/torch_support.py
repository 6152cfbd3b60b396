"""What this torch build can do, where its version number does not say it: probed once, on first use.

Imports only torch, so the float8 and quant packages can both ask without importing each other.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_rowwise_scaled_mm_works() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes rowwise (per-row / per-column) scales.

    torch 2.13's does; torch 2.11's CPU (oneDNN) path asserts per-tensor scales. Probed with a 16 x 16 call
    rather than read off the version, so a build that has it is used and one that lacks it is not."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    ones = torch.ones(16, 1)
    try:
        y = torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.all(y == 16.0))
