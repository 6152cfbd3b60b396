"""Float8 training: Float8Linear and the pieces it is made of.

Typical use::

    config = Float8LinearConfig.from_recipe_name("tensorwise")
    model = convert_to_float8_training(model, config=config)
    ...                                  # each step, after backward:
    sync_float8_amax_and_scale_history(model)       # delayed scaling only
    optimizer.step()
    precompute_float8_dynamic_scale_for_fsdp(model)  # FSDP2 fp8 all-gather only

Speed switches (Float8LinearConfig fields, off by default except where a recipe turns them on: rowwise
uses the first): ``cast_backend="triton"`` (fused cast kernels; ``"triton_inline"``: the same kernels
inlined by torch.compile, less host time per call), ``save_float8_for_backward`` (fp8
input saved for backward), ``reuse_float8_weight`` (with
``precompute_float8_weights(model)`` before a step's micro-batches and ``invalidate_float8_weights(model)``
after ``optimizer.step()``); and ``module_filter_fn=small_gemm_filter(config, tokens)`` keeps Linears
too small to gain in high precision.

This package imports only torch (and triton for kernels), never the rest of titan_fp8 except
titan_fp8.torch_support (torch-only capability probes).
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
from .filter import Float8PerfModel, SmallGemmFilter, small_gemm_filter
from .fsdp import WeightWithFloat8AllGather, precompute_float8_dynamic_scale_for_fsdp
from .linear import Float8Linear, invalidate_float8_weights, precompute_float8_weights
from .scaled_mm import ScaledMMContractError
from .tensor import Float8TrainingTensor

__all__ = [
    "CastConfig",
    "Float8GemmConfig",
    "Float8Linear",
    "Float8LinearConfig",
    "Float8PerfModel",
    "Float8TrainingTensor",
    "Gemm",
    "Operand",
    "ScaledMMContractError",
    "ScalingGranularity",
    "ScalingType",
    "SmallGemmFilter",
    "WeightWithFloat8AllGather",
    "cast_to_float8",
    "convert_to_float8_training",
    "invalidate_float8_weights",
    "precompute_float8_dynamic_scale_for_fsdp",
    "precompute_float8_weights",
    "small_gemm_filter",
    "sync_float8_amax_and_scale_history",
]
