"""Float8LinearConfig: named recipes, derived defaults, and every validation error."""

import dataclasses

import pytest
import torch

from titan_fp8.float8 import (
    CastConfig,
    Float8GemmConfig,
    Float8Linear,
    Float8LinearConfig,
    Gemm,
    Operand,
    ScalingGranularity,
    ScalingType,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AXIS = ScalingGranularity.AXISWISE


def test_defaults_are_tensorwise_dynamic():
    c = Float8LinearConfig()
    assert c.cast_config(Operand.INPUT, Gemm.OUTPUT).target_dtype == E4M3
    assert c.cast_config(Operand.WEIGHT, Gemm.GRAD_INPUT).target_dtype == E4M3
    assert c.cast_config(Operand.GRAD_OUTPUT, Gemm.GRAD_WEIGHT).target_dtype == E5M2
    assert c.gemm_config_output.use_fast_accum and not c.gemm_config_grad_input.use_fast_accum
    assert c.recipe_name() == "tensorwise" and c.delayed_operands() == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.emulate = True


def test_recipes():
    tw = Float8LinearConfig.from_recipe_name("tensorwise")
    assert tw == Float8LinearConfig()

    rw = Float8LinearConfig.from_recipe_name("rowwise")
    assert rw.round_scales_to_power_of_2
    for (op, gemm) in [(o, g) for g in Gemm for o in Operand if (o, g) != (Operand.INPUT, Gemm.GRAD_INPUT)]:
        if (op, gemm) in [(Operand.GRAD_OUTPUT, Gemm.OUTPUT), (Operand.WEIGHT, Gemm.GRAD_WEIGHT)]:
            continue
        cc = rw.cast_config(op, gemm)
        assert cc.scaling_granularity is AXIS and cc.target_dtype == E4M3

    gw = Float8LinearConfig.from_recipe_name("rowwise_with_gw_hp")
    assert not gw.gemm_in_float8(Gemm.GRAD_WEIGHT)
    assert gw.gemm_in_float8(Gemm.OUTPUT) and gw.gemm_in_float8(Gemm.GRAD_INPUT)

    d = Float8LinearConfig.from_recipe_name("delayed")
    assert d.delayed_operands() == (Operand.INPUT, Operand.WEIGHT, Operand.GRAD_OUTPUT)
    assert d.cast_config(Operand.GRAD_OUTPUT, Gemm.GRAD_WEIGHT).scaling_type is ScalingType.DELAYED

    for name in ("tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed"):
        assert Float8LinearConfig.from_recipe_name(name).recipe_name() == name


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(ValueError, match="rowwise_with_gw_hp") as e:
        Float8LinearConfig.from_recipe_name("rowwize")
    assert "tensorwise" in str(e.value) and "delayed" in str(e.value) and "'rowwize'" in str(e.value)


def test_extra_repr_shows_recipe():
    f8 = Float8Linear.from_float(torch.nn.Linear(32, 16), Float8LinearConfig.from_recipe_name("rowwise"))
    assert "recipe=rowwise" in repr(f8)
    custom = Float8LinearConfig(cast_config_input=CastConfig(target_dtype=E5M2), cast_config_input_for_grad_weight=CastConfig())
    f8 = Float8Linear.from_float(torch.nn.Linear(32, 16), custom)
    assert "recipe=custom" in repr(f8) and "input=dynamic/tensorwise/e5m2" in repr(f8)


@pytest.mark.parametrize(
    "kwargs,fields",
    [
        (dict(amax_history_len=0), ["amax_history_len"]),
        (dict(amax_history_len=True), ["amax_history_len"]),
        (dict(margin=-1), ["margin"]),
        (dict(amax_compute_algo="mean"), ["amax_compute_algo"]),
        (dict(emulate="yes"), ["emulate"]),
        (dict(gemm_config_grad_weight=Float8GemmConfig(use_fast_accum=True)), ["gemm_config_grad_weight"]),
        (dict(gemm_config_grad_input=Float8GemmConfig(use_fast_accum=True)), ["gemm_config_grad_input"]),
        # one operand of a GEMM in high precision, the other in fp8
        (dict(cast_config_input_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED)),
         ["cast_config_grad_output_for_grad_weight", "cast_config_input_for_grad_weight"]),
        # tensorwise @ rowwise
        (dict(cast_config_input=CastConfig(scaling_granularity=AXIS)), ["cast_config_input", "cast_config_weight"]),
        # e5m2 @ e5m2
        (dict(cast_config_weight=CastConfig(target_dtype=E5M2)), ["cast_config_grad_output", "cast_config_weight_for_grad_input"]),
        # rowwise needs e4m3
        (dict(cast_config_input=CastConfig(scaling_granularity=AXIS, target_dtype=E5M2),
              cast_config_weight=CastConfig(scaling_granularity=AXIS)), ["cast_config_input", "cast_config_weight"]),
        # delayed needs the same config in both orientations
        (dict(cast_config_input=CastConfig(scaling_type=ScalingType.DELAYED),
              cast_config_input_for_grad_weight=CastConfig()), ["cast_config_input", "cast_config_input_for_grad_weight"]),
        # fp8 all-gather needs a tensorwise weight
        (dict(enable_fsdp_float8_all_gather=True,
              cast_config_input=CastConfig(scaling_granularity=AXIS),
              cast_config_weight=CastConfig(scaling_granularity=AXIS),
              cast_config_grad_output=CastConfig(scaling_granularity=AXIS, target_dtype=E4M3)),
         ["enable_fsdp_float8_all_gather", "cast_config_weight"]),
        (dict(save_float8_for_backward=True,
              cast_config_input_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED),
              cast_config_grad_output_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED)),
         ["save_float8_for_backward", "cast_config_input"]),
    ],
)
def test_invalid_combinations_name_the_fields(kwargs, fields):
    with pytest.raises(ValueError) as e:
        Float8LinearConfig(**kwargs)
    for f in fields:
        assert f in str(e.value), (f, str(e.value))


def test_cast_config_validation():
    with pytest.raises(ValueError, match="target_dtype"):
        CastConfig(target_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="DELAYED"):
        CastConfig(scaling_type=ScalingType.DELAYED, scaling_granularity=AXIS)
    with pytest.raises(ValueError, match="scaling_type"):
        CastConfig(scaling_type="dynamic")


def test_fsdp_all_gather_valid_for_tensorwise_and_delayed():
    for name in ("tensorwise", "delayed"):
        c = dataclasses.replace(Float8LinearConfig.from_recipe_name(name), enable_fsdp_float8_all_gather=True)
        assert c.enable_fsdp_float8_all_gather
    with pytest.raises(ValueError, match="enable_fsdp_float8_all_gather"):
        dataclasses.replace(Float8LinearConfig.from_recipe_name("rowwise"), enable_fsdp_float8_all_gather=True)


def test_float8_linear_rejects_non_config():
    with pytest.raises(ValueError, match="Float8LinearConfig"):
        Float8Linear.from_float(torch.nn.Linear(32, 16), config="tensorwise")
