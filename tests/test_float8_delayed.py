"""Delayed scaling on one process: buffers, history rolling, scale formula, non-finite amaxes,
state_dict round trip."""

import math

import pytest
import torch
from torch import nn

from titan_fp8.float8 import Float8Linear, Float8LinearConfig, convert_to_float8_training, sync_float8_amax_and_scale_history

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
OPS = ("input", "weight", "grad_output")


def delayed(**kw):
    import dataclasses

    return dataclasses.replace(Float8LinearConfig.from_recipe_name("delayed"), **kw)


def step(m: nn.Module, x: torch.Tensor, gy_scale: float = 1.0):
    x = x.clone().requires_grad_()
    out = m(x)
    out.backward(torch.ones_like(out) * gy_scale)
    return out.detach()


def test_buffers_are_registered_and_in_state_dict():
    m = Float8Linear.from_float(nn.Linear(32, 16), delayed(amax_history_len=7))
    sd = m.state_dict()
    for op in OPS:
        assert sd[f"float8_amax_history_{op}"].shape == (7,)
        assert sd[f"float8_amax_{op}"].shape == () and sd[f"float8_scale_{op}"].shape == ()
    # Dynamic recipes carry no delayed state.
    assert set(Float8Linear.from_float(nn.Linear(32, 16)).state_dict()) == {"weight", "bias"}


def test_first_step_is_dynamic_then_history_drives_the_scale():
    torch.manual_seed(0)
    m = Float8Linear.from_float(nn.Linear(32, 16, bias=False), delayed())
    x = torch.randn(8, 32)
    assert not m.float8_amax_initialized
    step(m, x, gy_scale=0.5)
    assert m.float8_amax_input == x.abs().max()
    assert m.float8_amax_weight == m.weight.abs().max()
    assert m.float8_amax_grad_output == 0.5  # recorded in backward
    sync_float8_amax_and_scale_history(m)
    assert m.float8_amax_initialized
    assert m.float8_amax_history_input[0] == x.abs().max() and (m.float8_amax_history_input[1:] == 0).all()
    torch.testing.assert_close(m.float8_scale_input, E4M3_MAX / x.abs().max())
    torch.testing.assert_close(m.float8_scale_grad_output, torch.tensor(E5M2_MAX / 0.5))


def test_cast_uses_the_history_scale(monkeypatch):
    torch.manual_seed(0)
    m = Float8Linear.from_float(nn.Linear(32, 16, bias=False), delayed())
    step(m, torch.randn(8, 32))
    sync_float8_amax_and_scale_history(m)
    seen = []
    real = torch._scaled_mm

    def recording(a, b, scale_a, scale_b, **kw):
        seen.append((scale_a, scale_b))
        return real(a, b, scale_a, scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    step(m, torch.randn(8, 32) * 10)  # data grew 10x: the delayed scale (from the history) must still be used
    torch.testing.assert_close(seen[0][0], 1 / m.float8_scale_input)
    torch.testing.assert_close(seen[0][1], 1 / m.float8_scale_weight)
    torch.testing.assert_close(seen[1][0], 1 / m.float8_scale_grad_output)


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 2])
def test_history_rolls_and_scale_follows_algo_and_margin(algo, margin):
    torch.manual_seed(0)
    m = Float8Linear.from_float(nn.Linear(32, 16), delayed(amax_history_len=3, amax_compute_algo=algo, margin=margin))
    base = torch.randn(8, 32)
    amaxes = []
    for factor in (4.0, 1.0, 2.0, 0.5):
        x = base / base.abs().max() * factor  # amax exactly `factor`
        step(m, x)
        sync_float8_amax_and_scale_history(m)
        amaxes.append(factor)
    hist = m.float8_amax_history_input.tolist()
    assert hist == [0.5, 2.0, 1.0]  # newest first, length 3: the 4.0 rolled out
    expected_amax = max(hist) if algo == "max" else hist[0]
    torch.testing.assert_close(m.float8_scale_input, torch.tensor(E4M3_MAX / expected_amax / 2**margin))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_amax_never_enters_history(bad):
    torch.manual_seed(0)
    m = Float8Linear.from_float(nn.Linear(32, 16), delayed())
    step(m, torch.randn(8, 32))
    sync_float8_amax_and_scale_history(m)
    hist, scale = m.float8_amax_history_input.clone(), m.float8_scale_input.clone()

    x = torch.randn(8, 32)
    x[0, 0] = bad
    step(m, x)  # overflowed step: the recorded amax is not finite
    assert not torch.isfinite(m.float8_amax_input)
    sync_float8_amax_and_scale_history(m)
    assert torch.equal(m.float8_amax_history_input, hist)
    assert torch.equal(m.float8_scale_input, scale)
    for op in OPS:
        s = getattr(m, f"float8_scale_{op}")
        assert torch.isfinite(s) and s > 0


def test_scales_never_inf_or_zero_at_extremes():
    m = Float8Linear.from_float(nn.Linear(32, 16), delayed(margin=64))
    step(m, torch.zeros(8, 32))  # amax 0 -> eps floor
    sync_float8_amax_and_scale_history(m)
    for op in OPS:
        s = getattr(m, f"float8_scale_{op}")
        assert torch.isfinite(s) and s > 0
    m.float8_amax_input.fill_(torch.finfo(torch.float32).max)
    sync_float8_amax_and_scale_history(m)
    assert torch.isfinite(m.float8_scale_input) and m.float8_scale_input > 0


def test_state_dict_round_trip_restores_history_and_outputs():
    torch.manual_seed(0)
    model = convert_to_float8_training(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)), config=delayed())
    for i in range(3):
        step(model, torch.randn(8, 32) * (i + 1))
        sync_float8_amax_and_scale_history(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert "0.float8_amax_history_grad_output" in sd and sd["0.float8_amax_history_input"][2] > 0

    torch.manual_seed(1)
    fresh = convert_to_float8_training(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)), config=delayed())
    assert not fresh[0].float8_amax_initialized
    fresh.load_state_dict(sd)
    assert fresh[0].float8_amax_initialized and fresh[2].float8_amax_initialized
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(8, 32) * 5
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_amax_is_a_running_max_over_micro_batches_and_reset_by_sync():
    torch.manual_seed(0)
    m = Float8Linear.from_float(nn.Linear(32, 16), delayed())
    x = torch.randn(8, 32)
    step(m, x * 3)  # gradient accumulation: two micro-batches, one sync
    step(m, x)
    assert m.float8_amax_input == (x * 3).abs().max()
    sync_float8_amax_and_scale_history(m)
    assert m.float8_amax_history_input[0] == (x * 3).abs().max()
    assert m.float8_amax_input == -1  # consumed

    # A step where the layer did not run measures nothing: its history must not roll.
    hist = m.float8_amax_history_input.clone()
    sync_float8_amax_and_scale_history(m)
    assert torch.equal(m.float8_amax_history_input, hist)
