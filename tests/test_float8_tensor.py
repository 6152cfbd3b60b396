"""Float8TrainingTensor: supported ops keep data, scale and metadata consistent; others fail closed."""

import pytest
import torch

from titan_fp8.float8 import CastConfig, Float8TrainingTensor, Gemm, Operand, ScalingGranularity, cast_to_float8
from titan_fp8.float8.scaled_mm import MMConfig
from titan_fp8.float8.scaling import tensor_amax
from titan_fp8.float8.tensor import FLOAT8_OPS_TABLE

E4M3 = torch.float8_e4m3fn


def tensorwise(x, **kw):
    return cast_to_float8(x, CastConfig(target_dtype=E4M3), role=Operand.INPUT, gemm=Gemm.OUTPUT, **kw)


def rowwise(x, axis=1):
    cc = CastConfig(scaling_granularity=ScalingGranularity.AXISWISE, target_dtype=E4M3)
    return cast_to_float8(x, cc, role=Operand.WEIGHT, gemm=Gemm.OUTPUT, axis=axis)


def hp(t):
    return t.to_original_precision()


@pytest.mark.parametrize("shape", [(37,), (5, 37), (3, 5, 37)])
def test_tensor_amax_is_the_exact_max_abs_whatever_the_layout(shape):
    # The tensorwise amax is reduced per row first (so torch.compile can fuse it); a max is exact, so the
    # result must equal the flat max|x| bit for bit, for contiguous and transposed inputs alike.
    x = torch.randn(shape, dtype=torch.bfloat16) * 3
    x.view(-1)[17] = -40.0  # the extreme value is negative, away from the first row
    for t in (x, x.transpose(0, -1)):
        amax = tensor_amax(t)
        assert amax.dtype == torch.float32 and amax.shape == () and amax.item() == 40.0
    for poison, expect_nan in ((float("inf"), False), (float("nan"), True)):
        y = x.clone()
        y.view(-1)[-1] = poison
        amax = tensor_amax(y)
        assert torch.isnan(amax) if expect_nan else torch.isinf(amax)


@pytest.mark.parametrize("rows", [16384, 8193, 70001])  # folded in 2 chunks, 2 ragged, 8 (then split)
def test_compiled_tensor_amax_folds_many_row_maxima_exactly(rows):
    # Compiled, more than 8192 row maxima are folded into <= 8 zero-padded chunks before the final max (one
    # reduction kernel instead of a split one). The result must still be the exact max|x|, and NaN must win.
    amax_compiled = torch.compile(tensor_amax, fullgraph=True, dynamic=False)
    x = torch.randn(rows, 4, dtype=torch.bfloat16) * 3
    x[rows - 1, 2] = -40.0  # in the last (padded) chunk
    assert amax_compiled(x).item() == 40.0
    x[rows // 2, 0] = 50.0
    assert amax_compiled(x).item() == 50.0
    x[1, 1] = float("nan")
    assert torch.isnan(amax_compiled(x))


def test_metadata_and_dtype():
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    f8 = tensorwise(x, mm_config=MMConfig(emulate=True, use_fast_accum=True))
    assert isinstance(f8, Float8TrainingTensor)
    assert f8.dtype == torch.bfloat16 and f8.shape == (32, 16) and f8._data.dtype == E4M3
    assert f8._orig_dtype == torch.bfloat16 and f8._role is Operand.INPUT and f8._gemm is Gemm.OUTPUT
    assert f8._axiswise_dim is None and f8._mm_config == MMConfig(True, True)
    assert "role=input" in repr(f8)
    torch.testing.assert_close(hp(f8), x, rtol=2**-4, atol=1e-2)


@pytest.mark.parametrize("make", [tensorwise, rowwise])
def test_layout_ops_commute_with_dequantisation(make):
    x = torch.randn(32, 16) * torch.logspace(-2, 2, 16)
    f8 = make(x)
    ref = hp(f8)
    torch.testing.assert_close(hp(f8.t()), ref.t())
    torch.testing.assert_close(hp(f8.transpose(0, 1).contiguous()), ref.t())
    assert f8.t().contiguous()._data.is_contiguous()
    torch.testing.assert_close(hp(f8.clone()), ref)
    torch.testing.assert_close(hp(f8.detach()), ref)
    torch.testing.assert_close(hp(f8[4:20]), ref[4:20])
    parts = f8.split(8, dim=0)
    assert all(isinstance(p, Float8TrainingTensor) for p in parts)
    torch.testing.assert_close(torch.cat([hp(p) for p in parts]), ref)
    torch.testing.assert_close(hp(torch.cat(list(parts))), ref)
    torch.testing.assert_close(hp(f8.chunk(2, dim=0)[1]), ref[16:])
    torch.testing.assert_close(hp(f8.view(2, 16, 16)), ref.view(2, 16, 16))
    torch.testing.assert_close(hp(f8.reshape(4, 8, 16)), ref.reshape(4, 8, 16))


def test_axiswise_transpose_tracks_the_scaled_dim():
    f8 = rowwise(torch.randn(32, 16), axis=1)
    assert f8._scale.shape == (32, 1)
    t = f8.t()
    assert t._axiswise_dim == 0 and t._scale.shape == (1, 32)


def test_axiswise_reshape_that_would_mix_scales_fails():
    f8 = rowwise(torch.randn(32, 16), axis=1)
    with pytest.raises(NotImplementedError, match="reshaped"):
        f8.view(16, 32)


def test_copy_and_to_copy():
    a, b = tensorwise(torch.randn(16, 16)), tensorwise(torch.randn(16, 16) * 5)
    a.copy_(b)
    torch.testing.assert_close(hp(a), hp(b))
    bf = a.to(torch.bfloat16)
    assert isinstance(bf, Float8TrainingTensor) and bf.dtype == torch.bfloat16 and bf._data.dtype == E4M3
    with pytest.raises(NotImplementedError, match="copy_"):
        a.copy_(torch.randn(16, 16))


def test_flatten_unflatten_round_trip():
    f8 = rowwise(torch.randn(32, 16))
    names, ctx = f8.__tensor_flatten__()
    assert names == ["_data", "_scale"]
    back = Float8TrainingTensor.__tensor_unflatten__({n: getattr(f8, n) for n in names}, ctx, f8.shape, f8.stride())
    assert back._axiswise_dim == f8._axiswise_dim and back._role is f8._role and back._gemm is f8._gemm
    assert torch.equal(hp(back), hp(f8))


@pytest.mark.parametrize(
    "op,name",
    [
        (lambda t: t + 1, "aten.add"),
        (lambda t: t.sum(), "aten.sum"),
        (lambda t: torch.relu(t), "aten.relu"),
        (lambda t: t * t, "aten.mul"),
        (lambda t: t.abs().max(), "aten.abs"),
        (lambda t: torch.nn.functional.gelu(t), "aten.gelu"),
    ],
)
def test_unsupported_ops_fail_closed_naming_the_op(op, name):
    f8 = tensorwise(torch.randn(16, 16))
    with pytest.raises(NotImplementedError, match=name):
        op(f8)


def test_mm_with_a_high_precision_operand_fails():
    f8 = tensorwise(torch.randn(16, 16))
    with pytest.raises(NotImplementedError, match="both operands"):
        torch.mm(f8, torch.randn(16, 16))


def test_op_table_lists_the_sharding_and_gemm_ops():
    aten = torch.ops.aten
    for op in [aten.mm.default, aten.addmm.default, aten.t.default, aten.transpose.int, aten.view.default,
               aten._unsafe_view.default, aten.clone.default, aten.detach.default, aten.split.Tensor, aten.cat.default,
               aten.slice.Tensor, aten.copy_.default, aten._to_copy.default]:
        assert op in FLOAT8_OPS_TABLE, op


def test_addmm_adds_high_precision_bias():
    x, w, bias = torch.randn(16, 32), torch.randn(16, 32), torch.randn(16)
    wt = cast_to_float8(w, CastConfig(target_dtype=E4M3), role=Operand.WEIGHT, gemm=Gemm.OUTPUT).t()
    out = torch.addmm(bias, tensorwise(x), wt)
    torch.testing.assert_close(out, hp(tensorwise(x)) @ hp(wt) + bias, rtol=1e-5, atol=1e-4)
