"""CUDA kernels of the quantised format against the reference (dequantise) path. Skipped without CUDA.

Tolerance: bf16 activations, SQNR of kernel output vs reference >= 30 dB (bf16 rounding of the two paths
differs; the int4 kernel applies asymmetric zero points as float offsets).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from test_quant import compiled_qat_gradient_errors
from titan_fp8.quant import SCHEMES, QuantizedTensor, QuantScheme, choose_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

EXPECTED = {"int4_weight_only": "int4_tinygemm_cuda", "int8_weight_only": "int8_mm_rescale",
            "int8_dynamic_activation_int4_weight": "int4_tinygemm_cuda", "float8_dynamic": "scaled_mm_rowwise"}


def sqnr(ref, x):
    err = (ref.float() - x.float()).pow(2).mean()
    return math.inf if err == 0 else float(10 * torch.log10(ref.float().pow(2).mean() / err))


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("n,k", [(256, 512), (4096, 256), (128, 768)])
@pytest.mark.parametrize("m", [1, 17, 256])
def test_cuda_kernel_matches_reference(name, n, k, m):
    torch.manual_seed(0)
    scheme = QuantScheme.from_name(name, 32)
    w = torch.randn(n, k, device="cuda") * 0.05
    ref = QuantizedTensor.from_float(w, scheme, dtype=torch.bfloat16)
    kernel, why = choose_kernel(ref)
    if name == "float8_dynamic" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm89+")
    assert kernel == EXPECTED[name], why
    fast = ref.with_kernel(kernel)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y_ref, y_fast = F.linear(x, ref), F.linear(x, fast)
    assert y_fast.dtype == torch.bfloat16 and y_fast.shape == (m, n)
    assert sqnr(y_ref, y_fast) > 30
    assert sqnr(ref.dequantize(), fast.dequantize()) > 40


def test_quantized_tensor_moves_between_devices():
    scheme = QuantScheme.from_name("int4_weight_only", 32)
    qt = QuantizedTensor.from_float(torch.randn(64, 128), scheme)
    on_gpu = qt.to("cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.qdata.is_cuda and on_gpu.zero_point.is_cuda
    assert torch.equal(on_gpu.dequantize().cpu(), qt.dequantize())


def test_tiny_model_on_cuda_matches_reference():
    from titan_fp8.models import Transformer
    from titan_fp8.models.llama3 import ModelArgs
    from titan_fp8.quant import prepare_for_inference_, quantize_

    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=256, max_seq_len=64)
    for name in SCHEMES:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Transformer(args)
            model.init_weights()
        quantize_(model, QuantScheme.from_name(name, 32), dtype=torch.bfloat16)
        model.to(torch.bfloat16)
        tokens = torch.randint(0, 512, (2, 16), device="cuda")
        with torch.no_grad():
            ref = model(tokens)
            report = prepare_for_inference_(model)
            assert not report.skipped, report.skipped
            fast = model(tokens)
        assert sqnr(ref, fast) > 25, name


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("range_learning", [False, True], ids=["plain", "learned_scales"])
def test_compiled_qat_gradients_match_eager_cuda(range_learning, autocast_dtype):
    # The regression this guards: with torch 2.11 + CUDA, compiled blocks' weight gradients were ~0 under the
    # former autograd.Function straight-through estimator (QAT training silently degraded; error ~1.0).
    # Measured on an H200 (torch 2.11): fp32 2.0e-3, bf16 autocast 7.6e-3 (reassociated kernels, and inductor
    # keeps fused bf16 intermediates in fp32: activations differ in their last bits and an int8 activation
    # rounding may flip). Bounds 1e-2 / 3e-2.
    errors = compiled_qat_gradient_errors("cuda", range_learning, autocast_dtype)
    bound = 1e-2 if autocast_dtype is None else 3e-2
    assert max(errors.values()) < bound, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
