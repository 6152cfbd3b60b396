"""Float8 training: Float8Linear and the pieces it is made of.

Typical use::

    config = Float8LinearConfig.from_recipe_name("tensorwise")
    model = convert_to_float8_training(model, config=config)
    ...                                  # each step, after backward:
    sync_float8_amax_and_scale_history(model)       # delayed scaling only
    optimizer.step()
    precompute_float8_dynamic_scale_for_fsdp(model)  # FSDP2 fp8 all-gather only

This package imports only torch (and triton for kernels), never the rest of titan_fp8.
"""

from .casting import cast_to_float8
from .config import (
    CastConfig,
    Float8GemmConfig,
    Float8LinearConfig,
    Gemm,
    Operand,
    ScalingGranularity,
    ScalingType,
)
from .convert import convert_to_float8_training
from .delayed import sync_float8_amax_and_scale_history
from .fsdp import WeightWithFloat8AllGather, precompute_float8_dynamic_scale_for_fsdp
from .linear import Float8Linear
from .scaled_mm import ScaledMMContractError
from .tensor import Float8TrainingTensor

__all__ = [
    "CastConfig",
    "Float8GemmConfig",
    "Float8Linear",
    "Float8LinearConfig",
    "Float8TrainingTensor",
    "Gemm",
    "Operand",
    "ScaledMMContractError",
    "ScalingGranularity",
    "ScalingType",
    "WeightWithFloat8AllGather",
    "cast_to_float8",
    "convert_to_float8_training",
    "precompute_float8_dynamic_scale_for_fsdp",
    "sync_float8_amax_and_scale_history",
]
