"""Casts from high precision to Float8TrainingTensor.

``cast_to_float8``: one tensor, one orientation (FSDP's fp8 all-gather, tests, generic use).
``cast_both_orientations``: what Float8Linear uses; a 2-D operand cast for both of the GEMMs it feeds with
one amax pass and one cast pass (see kernels.py for the passes and the two backends).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .config import CastConfig, Gemm, Operand, ScalingGranularity
from .kernels import amax_rows_cols, amax_tensorwise, cast_2d
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


class OperandCasts(NamedTuple):
    """The fp8 casts of one 2-D operand ``t`` (M, K), for the two GEMMs it feeds.

    main:   contracted dim 1 (the forward GEMM; grad_input for grad_output): row-major data (M, K).
    other:  contracted dim 0 (the backward GEMM): column-major data, i.e. a contiguous (K, M) copy seen
            as (M, K), which is the layout `_scaled_mm` wants for it (or its transpose).
    other_scale: the other orientation's scale, also when only the scale was asked for (the forward
            computes it in the same amax pass so that the backward needs a single cast pass).
    amax:   max|t| (tensorwise, fp32 0-d) when asked for: delayed scaling records it.
    """

    main: Optional[Float8TrainingTensor]
    other: Optional[Float8TrainingTensor]
    other_scale: Optional[torch.Tensor]
    amax: Optional[torch.Tensor]


def cast_both_orientations(
    t: torch.Tensor,
    main_config: Optional[CastConfig],
    other_config: Optional[CastConfig],
    *,
    role: Operand,
    main_gemm: Gemm,
    other_gemm: Gemm,
    main_mm: MMConfig = MMConfig(),
    other_mm: MMConfig = MMConfig(),
    write_other: bool = True,
    main_scale: Optional[torch.Tensor] = None,
    other_scale: Optional[torch.Tensor] = None,
    need_amax: bool = False,
    round_scales_to_power_of_2: bool = False,
    backend: str = "torch",
) -> OperandCasts:
    """Cast a 2-D ``t`` for its main GEMM (``main_config``; None = not wanted) and/or its other GEMM
    (``other_config``; None = not wanted, ``write_other=False`` = its scale only), reading ``t`` at most
    twice: one amax pass (none when the scales are known) and one cast pass writing both layouts.

    Known scales (delayed scaling, or scales the forward computed for the backward) skip the amax pass.
    """
    if t.dim() != 2:
        raise ValueError(f"cast_both_orientations takes a 2-D tensor, got shape {tuple(t.shape)}")
    for cc in (main_config, other_config):
        if cc is not None and not cc.enabled:
            raise ValueError(f"cast_both_orientations: the cast config for {role.value} is DISABLED")
    configs = [cc for cc in (main_config, other_config) if cc is not None]
    if not configs:
        return OperandCasts(None, None, None, tensor_amax(t) if need_amax else None)
    axiswise = {cc.scaling_granularity is ScalingGranularity.AXISWISE for cc in configs}
    dtypes = {cc.target_dtype for cc in configs}
    both_written = main_config is not None and other_config is not None and write_other
    if len(axiswise) > 1 or (both_written and len(dtypes) > 1):
        # Mixed granularity or dtypes (custom configs): one orientation at a time.
        a = cast_both_orientations(
            t, main_config, None, role=role, main_gemm=main_gemm, other_gemm=other_gemm, main_mm=main_mm,
            main_scale=main_scale, need_amax=need_amax, round_scales_to_power_of_2=round_scales_to_power_of_2,
            backend=backend,
        )
        b = cast_both_orientations(
            t, None, other_config, role=role, main_gemm=main_gemm, other_gemm=other_gemm, other_mm=other_mm,
            write_other=write_other, other_scale=other_scale, round_scales_to_power_of_2=round_scales_to_power_of_2,
            backend=backend,
        )
        return OperandCasts(a.main, b.other, b.other_scale, a.amax)

    write_main = main_config is not None
    write_col = other_config is not None and write_other
    amax = None
    if axiswise.pop():
        want_row, want_col = main_config is not None, other_config is not None
        row_amax, col_amax = amax_rows_cols(
            t, want_row and main_scale is None, want_col and other_scale is None, backend
        )
        row_scale, col_scale = main_scale, other_scale
        if row_amax is not None:
            row_scale = amax_to_scale(row_amax, main_config.target_dtype, round_scales_to_power_of_2=round_scales_to_power_of_2)
        if col_amax is not None:
            col_scale = amax_to_scale(col_amax, other_config.target_dtype, round_scales_to_power_of_2=round_scales_to_power_of_2)
        data, data_t, _ = cast_2d(
            t, row_scale, col_scale if write_col else None, configs[0].target_dtype,
            write_row=write_main, write_col=write_col, with_amax=False, backend=backend,
        )
        if need_amax:  # (delayed scaling is tensorwise; kept for completeness)
            amax = tensor_amax(t)
        main_axis, other_axis = 1, 0
    else:
        # Tensorwise: the two orientations share a scale unless their configs differ (then only the
        # dtype can differ, and only when not both are written, see above).
        same = main_config is None or other_config is None or main_config == other_config
        row_scale = main_scale if main_scale is not None else (other_scale if same else None)
        col_scale = other_scale if other_scale is not None else (main_scale if same else None)
        if (write_main and row_scale is None) or (other_config is not None and col_scale is None):
            amax = amax_tensorwise(t, backend)
            if write_main and row_scale is None:
                row_scale = amax_to_scale(amax, main_config.target_dtype, round_scales_to_power_of_2=round_scales_to_power_of_2)
            if other_config is not None and col_scale is None:
                col_scale = (
                    row_scale if same and row_scale is not None
                    else amax_to_scale(amax, other_config.target_dtype, round_scales_to_power_of_2=round_scales_to_power_of_2)
                )
        scale = row_scale if write_main else col_scale
        # Known scale(s) and delayed scaling: measure max|t| in the cast pass itself (one pass in all).
        data, data_t, kernel_amax = cast_2d(
            t, scale, None, configs[0].target_dtype,
            write_row=write_main, write_col=write_col, with_amax=need_amax and amax is None, backend=backend,
        )
        amax = amax if amax is not None else kernel_amax
        main_axis = other_axis = None
        if not need_amax:
            amax = None

    main = other = None
    if write_main:
        main = Float8TrainingTensor(data, row_scale, t.dtype, role, main_gemm, main_axis, main_mm)
    if write_col:
        other = Float8TrainingTensor(data_t.t(), col_scale, t.dtype, role, other_gemm, other_axis, other_mm)
    return OperandCasts(main, other, col_scale if other_config is not None else None, amax)
