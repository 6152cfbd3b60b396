"""The one cast from high precision to Float8TrainingTensor, used by every recipe and GEMM."""

from __future__ import annotations

from typing import Optional

import torch

from .config import CastConfig, Gemm, Operand, ScalingGranularity
from .scaled_mm import MMConfig
from .scaling import amax_to_scale, saturated_cast, tensor_amax
from .tensor import Float8TrainingTensor


def cast_to_float8(
    tensor: torch.Tensor,
    cast_config: CastConfig,
    *,
    role: Operand,
    gemm: Gemm,
    axis: Optional[int] = None,
    scale: Optional[torch.Tensor] = None,
    round_scales_to_power_of_2: bool = False,
    mm_config: MMConfig = MMConfig(),
) -> Float8TrainingTensor:
    """Cast ``tensor`` for use as the ``role`` operand of ``gemm``.

    axis: the contracted dimension, required for AXISWISE scaling (one scale per slice along it).
    scale: a known scale (delayed scaling, FSDP precompute); computed from the tensor when None.
    """
    if not cast_config.enabled:
        raise ValueError(f"cast_to_float8: the cast config for {role.value}/{gemm.value} is DISABLED")
    axiswise = cast_config.scaling_granularity is ScalingGranularity.AXISWISE
    if axiswise:
        if axis is None:
            raise ValueError("cast_to_float8: AXISWISE scaling needs the contracted dimension as `axis`")
        axis = axis % tensor.dim()
    if scale is None:
        amax = tensor_amax(tensor, axis if axiswise else None)
        scale = amax_to_scale(amax, cast_config.target_dtype, round_scales_to_power_of_2=round_scales_to_power_of_2)
    data = saturated_cast(tensor, scale, cast_config.target_dtype)
    return Float8TrainingTensor(
        data, scale, tensor.dtype, role, gemm, axis if axiswise else None, mm_config
    )
