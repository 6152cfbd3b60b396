"""Float8Linear numerics per recipe: SQNR against float64, casts against a plain reference,
saturation, what reaches torch._scaled_mm, and the _scaled_mm contract.

`python tests/test_float8_numerics.py` prints the SQNR table (dB) per recipe.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from titan_fp8.float8 import (
    CastConfig,
    Float8Linear,
    Float8LinearConfig,
    Float8TrainingTensor,
    Gemm,
    Operand,
    ScaledMMContractError,
    ScalingGranularity,
    cast_to_float8,
    sync_float8_amax_and_scale_history,
)
from titan_fp8.float8.scaled_mm import CPU_ROWWISE_SCALED_MM, MMConfig, float8_mm

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed"]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SQNR_MIN_DB = 20.0

# (input shape, out_features): 2-D, 3-D (B, T, K), and a token count that is not a multiple of 16
# (exercises the zero padding of grad_weight's contracted dim).
SHAPES = [((32, 64), 48), ((2, 24, 64), 32), ((17, 32), 16), ((64, 128), 96)]
DISTRIBUTIONS = ["normal", "uniform", "outlier_rows", "heavy_tail"]


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    return (20 * torch.log10(ref.norm() / (ref - actual).norm())).item()


def sample(shape, dist: str, gen: torch.Generator) -> torch.Tensor:
    if dist == "normal":
        return torch.randn(shape, generator=gen)
    if dist == "uniform":
        return torch.rand(shape, generator=gen) * 2 - 1
    if dist == "outlier_rows":
        x = torch.randn(shape, generator=gen)
        rows = x.reshape(-1, shape[-1])
        rows[:: max(1, rows.shape[0] // 3)] *= 1000.0  # a few tokens with huge activations
        return x
    if dist == "heavy_tail":
        return _student_t(shape, gen)
    raise ValueError(dist)


def _student_t(shape, gen):
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((2, *shape), generator=gen).pow(2).sum(0)
    return z / (chi2 / 2).sqrt()  # Student-t, 2 degrees of freedom


def run_linear(recipe: str, x_shape, n: int, dist: str, seed: int = 0, config=None):
    """SQNR (dB) of out, grad_input, grad_weight of a Float8Linear vs the float64 computation."""
    gen = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    linear = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / math.sqrt(k))
        linear.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    x = sample(x_shape, dist, gen)
    gy = sample((*x_shape[:-1], n), dist, gen) * 1e-3  # small gradients, as in training
    w64, b64, x64, gy64 = linear.weight.double(), linear.bias.double(), x.double(), gy.double()
    ref_out = x64 @ w64.t() + b64
    ref_gx = gy64 @ w64
    ref_gw = gy64.reshape(-1, n).t() @ x64.reshape(-1, k)

    config = config or Float8LinearConfig.from_recipe_name(recipe)
    f8 = Float8Linear.from_float(linear, config)
    if config.delayed_operands():
        # One step to fill the history from this data, then the measured step casts with it.
        xw = x.clone().requires_grad_()
        f8(xw).backward(gy)
        sync_float8_amax_and_scale_history(f8)
        f8.zero_grad()
    xr = x.clone().requires_grad_()
    out = f8(xr)
    out.backward(gy)
    return {
        "out": sqnr(ref_out, out.detach()),
        "grad_input": sqnr(ref_gx, xr.grad),
        "grad_weight": sqnr(ref_gw, f8.weight.grad),
    }


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("x_shape,n", SHAPES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_sqnr_vs_float64(recipe, x_shape, n, dist):
    result = run_linear(recipe, x_shape, n, dist)
    print(f"SQNR {recipe:20s} {str(x_shape):12s} N={n:<3d} {dist:12s} " + " ".join(f"{k}={v:.1f}" for k, v in result.items()))
    for name, value in result.items():
        assert value >= SQNR_MIN_DB, f"{recipe} {x_shape} {dist}: {name} SQNR {value:.1f} dB < {SQNR_MIN_DB}"


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("x_shape,n", [SHAPES[1], SHAPES[2]])
def test_sqnr_with_every_speed_switch(recipe, x_shape, n):
    # Fused casts (Triton custom ops; the same math in torch on CPU) + fp8 input saved for backward.
    overrides = dict(cast_backend="triton", save_float8_for_backward=recipe != "rowwise_with_gw_hp")
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), **overrides)
    result = run_linear(recipe, x_shape, n, "heavy_tail", config=config)
    for name, value in result.items():
        assert value >= SQNR_MIN_DB, f"{recipe}+switches {x_shape}: {name} SQNR {value:.1f} dB < {SQNR_MIN_DB}"


def test_rowwise_beats_tensorwise_on_outlier_rows():
    # Per-row scales isolate outlier tokens: the ordinary rows keep their precision.
    tw = run_linear("tensorwise", (64, 64), 32, "outlier_rows")
    rw = run_linear("rowwise", (64, 64), 32, "outlier_rows")
    assert rw["grad_input"] > tw["grad_input"]


def test_bf16_input_and_emulation_match_scaled_mm():
    cfg = Float8LinearConfig.from_recipe_name("tensorwise")
    real = run_linear("tensorwise", (32, 64), 48, "normal", config=cfg)
    emu = run_linear("tensorwise", (32, 64), 48, "normal", config=dataclasses.replace(cfg, emulate=True))
    for k in real:  # same fp8 operands, only the GEMM implementation differs
        assert abs(real[k] - emu[k]) < 0.5, (k, real[k], emu[k])

    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    f8 = Float8Linear.from_float(linear, cfg)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    out = f8(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and f8.weight.grad.dtype == torch.bfloat16
    assert sqnr(x.double() @ linear.weight.double().t() + linear.bias.double(), out) > SQNR_MIN_DB


# ---------------------------------------------------------------------- casting


def test_tensorwise_cast_matches_plain_reference():
    x = torch.randn(32, 64) * 3
    cc = CastConfig(target_dtype=E4M3)
    f8 = cast_to_float8(x, cc, role=Operand.INPUT, gemm=Gemm.OUTPUT)
    amax = x.abs().max().item()
    assert f8._scale.dtype == torch.float32 and f8._scale.dim() == 0
    torch.testing.assert_close(f8._scale, torch.tensor(448.0 / amax), rtol=1e-6, atol=0)
    ref = (x * (448.0 / amax)).clamp(-448, 448).to(E4M3)
    assert torch.equal(f8._data.view(torch.uint8), ref.view(torch.uint8))
    assert f8.dtype == torch.float32 and f8._data.dtype == E4M3
    # Dequantised error is within e4m3's half-ulp (2^-4 relative) for normal values.
    rel = ((f8.to_original_precision() - x).abs() / x.abs().clamp(min=amax / 448 * 2**-6)).max()
    assert rel <= 2**-4 + 1e-6


@pytest.mark.parametrize("axis", [0, 1])
def test_rowwise_cast_scales_along_axis_with_power_of_2(axis):
    # Slices (rows for axis=1, columns for axis=0) of very different magnitude: each gets its own scale.
    torch.manual_seed(0)
    mags = torch.logspace(-3, 3, 48 if axis == 1 else 32)
    x = torch.randn(48, 32) * (mags[:, None] if axis == 1 else mags[None, :])
    cc = CastConfig(scaling_granularity=ScalingGranularity.AXISWISE, target_dtype=E4M3)
    f8 = cast_to_float8(x, cc, role=Operand.INPUT, gemm=Gemm.OUTPUT, axis=axis, round_scales_to_power_of_2=True)
    amax = x.abs().amax(dim=axis, keepdim=True)
    ref_scale = torch.exp2(torch.floor(torch.log2(448.0 / amax)))
    assert f8._scale.shape == amax.shape and f8._axiswise_dim == axis
    torch.testing.assert_close(f8._scale, ref_scale, rtol=0, atol=0)
    assert torch.equal(f8._data.view(torch.uint8), (x * ref_scale).clamp(-448, 448).to(E4M3).view(torch.uint8))
    # Within e4m3's half-ulp (2^-4 relative) for values in e4m3's normal range of their slice (the power-of-2
    # scale puts a slice's amax in [224, 448]; below 2^-6 of fp8 range the absolute subnormal step applies).
    floor = 448.0 / ref_scale * 2**-6
    rel = ((f8.to_original_precision() - x).abs() / x.abs().clamp(min=floor)).max()
    assert rel <= 2**-4 + 1e-6


def test_zero_tensor_gives_finite_scale():
    f8 = cast_to_float8(torch.zeros(16, 16), CastConfig(target_dtype=E4M3), role=Operand.INPUT, gemm=Gemm.OUTPUT)
    assert torch.isfinite(f8._scale) and f8._scale > 0
    assert torch.equal(f8.to_original_precision(), torch.zeros(16, 16))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_saturation_never_produces_inf_or_nan(dtype):
    fmax = torch.finfo(dtype).max
    x = torch.tensor([[1e30, -1e30, 3.0, -2.0] * 4] * 16)
    # A (delayed-style) scale far too large for the data: values must saturate to +-fmax.
    f8 = cast_to_float8(x, CastConfig(target_dtype=dtype), role=Operand.GRAD_OUTPUT, gemm=Gemm.GRAD_INPUT,
                        scale=torch.tensor(1e6))
    data = f8._data.float()
    assert torch.isfinite(data).all()
    assert data.max() == fmax and data.min() == -fmax
    if dtype == E5M2:  # why the explicit clamp exists: the plain conversion overflows to inf on CPU
        assert torch.isinf((x * 1e6).to(E5M2).float()).any()


# ---------------------------------------------------------------------- what reaches _scaled_mm


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    calls = []
    real = torch._scaled_mm

    def recording(a, b, scale_a, scale_b, **kwargs):
        calls.append(dict(
            a=a.dtype, b=b.dtype, sa=tuple(scale_a.shape), sb=tuple(scale_b.shape), sdt=(scale_a.dtype, scale_b.dtype),
            a_row_major=a.stride(1) == 1, b_col_major=b.stride(0) == 1,
            out=kwargs.get("out_dtype"), fast=kwargs.get("use_fast_accum", False), shape=(tuple(a.shape), tuple(b.shape)),
        ))
        return real(a, b, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    return calls


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("recipe", RECIPES)
def test_dtypes_and_scales_reaching_scaled_mm(recipe, device, scaled_mm_calls):
    if device == "cuda" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip("needs a CUDA GPU with fp8 (sm89+)")
    if device == "cpu" and "rowwise" in recipe and not CPU_ROWWISE_SCALED_MM:
        pytest.skip("this torch's CPU _scaled_mm has no rowwise scales (rowwise GEMMs are emulated on CPU)")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    m, k, n = 32, 64, 48
    f8 = Float8Linear.from_float(torch.nn.Linear(k, n).to(device, dtype), Float8LinearConfig.from_recipe_name(recipe))
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    f8(x).sum().backward()
    # Order: output, grad_input, grad_weight.
    if recipe in ("tensorwise", "delayed"):
        expect = [(E4M3, E4M3, (), (), True), (E5M2, E4M3, (), (), False), (E5M2, E4M3, (), (), False)]
    elif recipe == "rowwise":
        expect = [(E4M3, E4M3, (m, 1), (1, n), True), (E4M3, E4M3, (m, 1), (1, k), False),
                  (E4M3, E4M3, (n, 1), (1, k), False)]
    else:  # rowwise_with_gw_hp: no fp8 grad_weight GEMM
        expect = [(E4M3, E4M3, (m, 1), (1, n), True), (E4M3, E4M3, (m, 1), (1, k), False)]
    got = [(c["a"], c["b"], c["sa"], c["sb"], c["fast"]) for c in scaled_mm_calls]
    assert got == expect
    for c in scaled_mm_calls:
        assert c["a_row_major"] and c["b_col_major"]
        assert c["sdt"] == (torch.float32, torch.float32) and c["out"] == dtype
    assert [c["shape"] for c in scaled_mm_calls][:2] == [((m, k), (k, n)), ((m, n), (n, k))]


def test_emulate_never_calls_scaled_mm(scaled_mm_calls):
    cfg = dataclasses.replace(Float8LinearConfig.from_recipe_name("rowwise"), emulate=True)
    f8 = Float8Linear.from_float(torch.nn.Linear(32, 16), cfg)
    f8(torch.randn(8, 32, requires_grad=True)).sum().backward()
    assert scaled_mm_calls == []


# ---------------------------------------------------------------------- the _scaled_mm contract


def _operands(m=32, k=64, n=48):
    a = torch.randn(m, k).to(E4M3)
    b = torch.randn(n, k).to(E4M3).t()  # (k, n) column-major
    return a, torch.tensor(1.0), b, torch.tensor(1.0)


@pytest.mark.parametrize("emulate", [False, True])
def test_contract_accepts_valid_call(emulate):
    a, sa, b, sb = _operands()
    out = float8_mm(a, sa, b, sb, out_dtype=torch.bfloat16, mm_config=MMConfig(emulate=emulate))
    assert out.shape == (32, 48) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("emulate", [False, True])
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, sa, b, sb: (a, sa, b.contiguous(), sb), "column-major"),  # CPU would accept this
        (lambda a, sa, b, sb: (a.t().contiguous().t(), sa, b, sb), "row-major"),
        (lambda a, sa, b, sb: (a[:, :40].contiguous(), sa, b[:40], sb), "multiples of 16"),
        (lambda a, sa, b, sb: (a, sa.double(), b, sb), "float32"),
        (lambda a, sa, b, sb: (a, torch.ones(32, 1), b, sb), "scalar"),
        (lambda a, sa, b, sb: (a.float().to(E5M2), sa, b.float().to(E5M2), sb), "e5m2"),
        (lambda a, sa, b, sb: (a.float(), sa, b, sb), "float8"),
    ],
)
def test_contract_violations_raise_clear_errors(emulate, mutate, match):
    args = mutate(*_operands())
    with pytest.raises(ScaledMMContractError, match=match):
        float8_mm(*args, out_dtype=torch.float32, mm_config=MMConfig(emulate=emulate))


def test_contract_n_not_multiple_of_16():
    a, sa, b, sb = _operands(n=40)
    with pytest.raises(ScaledMMContractError, match="N=40"):
        float8_mm(a, sa, b, sb, out_dtype=torch.float32, mm_config=MMConfig())


def test_float8_linear_rejects_unaligned_dims():
    with pytest.raises(ValueError, match="multiples of 16"):
        Float8Linear.from_float(torch.nn.Linear(20, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        Float8Linear(32, 24)


def test_mm_of_float8_tensors_equals_dequantised_product():
    x, w = torch.randn(32, 64), torch.randn(48, 64)
    cc = CastConfig(target_dtype=E4M3)
    xf = cast_to_float8(x, cc, role=Operand.INPUT, gemm=Gemm.OUTPUT)
    wf = cast_to_float8(w, cc, role=Operand.WEIGHT, gemm=Gemm.OUTPUT)
    out = torch.mm(xf, wf.t())
    ref = xf.to_original_precision() @ wf.to_original_precision().t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    assert isinstance(xf, Float8TrainingTensor) and not isinstance(out, Float8TrainingTensor)


if __name__ == "__main__":
    print(f"{'recipe':20s} {'out':>6s} {'gradin':>6s} {'gradw':>6s}   (min over shapes; per distribution)")
    for recipe in RECIPES:
        for dist in DISTRIBUTIONS:
            vals = [run_linear(recipe, s, n, dist) for s, n in SHAPES]
            mins = {k: min(v[k] for v in vals) for k in vals[0]}
            print(f"{recipe:20s} {dist:13s} " + " ".join(f"{mins[k]:6.1f}" for k in ("out", "grad_input", "grad_weight")))
