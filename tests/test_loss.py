"""The fused output head + loss (titan_fp8.loss.linear_cross_entropy) against the unfused reference."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from titan_fp8.loss import IGNORE_INDEX, cross_entropy_loss, linear_cross_entropy
from titan_fp8.models import OutputHead, Transformer, llama3_flavors


def rel_err(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    return ((actual - ref).norm() / ref.norm()).item()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def make_inputs(dtype, n_tokens=(2, 96), dim=64, vocab=1000, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n_tokens, dim, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.2).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, n_tokens, generator=g).to(device)
    return h, w, labels


def reference(h, w, labels):
    loss = cross_entropy_loss(F.linear(h, w), labels)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss, gh, gw


# bf16: the loss math is fp32 in both; the logits' gradient is rounded to bf16 in both, the head's GEMMs
# are the same calls. Eager kernels compute softmax as exp(x - lse): up to one bf16 ulp per gradient element.
# On CUDA fp32 matmuls may run in TF32 in both paths alike; the comparison is of the loss kernels.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_matches_unfused_loss_and_gradients(dtype, tol, compiled, device):
    h, w, labels = make_inputs(dtype, device=device)
    labels[0, :5] = IGNORE_INDEX  # ignored positions count neither in the sum nor in the mean
    ref_loss, ref_gh, ref_gw = reference(h, w, labels)
    loss = linear_cross_entropy(h, w, labels, compiled=compiled)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel_err(ref_gh, gh) < tol and rel_err(ref_gw, gw) < tol
    assert ref_gh[0, :5].abs().max() == 0 and gh[0, :5].abs().max() == 0


def test_eager_kernels_work_on_row_blocks(monkeypatch):
    """The eager path splits rows so its fp32 temporaries stay bounded; blocks must not change the result."""
    import titan_fp8.loss as loss_mod

    h, w, labels = make_inputs(torch.float32, n_tokens=(3, 50))
    whole = linear_cross_entropy(h, w, labels)
    (whole_gh,) = torch.autograd.grad(whole, (h,))
    monkeypatch.setattr(loss_mod, "_EAGER_CHUNK_BYTES", 7 * 4 * w.shape[0])  # 7 rows per block: ragged tail
    blocked = linear_cross_entropy(h, w, labels)
    (blocked_gh,) = torch.autograd.grad(blocked, (h,))
    assert abs(blocked.item() - whole.item()) < 1e-6 and rel_err(whole_gh, blocked_gh) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_reuses_the_logits_buffer(compiled, device):
    """The memory saving itself: the saved logits tensor ends up holding the logits' gradient, i.e. backward
    allocated no second logits-sized tensor for it."""
    h, w, labels = make_inputs(torch.float32, device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(h, w, labels, compiled=compiled)
    n, v = labels.numel(), w.shape[0]
    (logits_buffer,) = [t for t in saved if t.shape == (n, v)]
    logits = F.linear(h, w).detach().reshape(n, v).requires_grad_()
    (expected_grad,) = torch.autograd.grad(cross_entropy_loss(logits.reshape(*labels.shape, v), labels), (logits,))
    assert not torch.allclose(logits_buffer, expected_grad)
    loss.backward()
    assert rel_err(expected_grad, logits_buffer) < 1e-6


def test_second_backward_is_refused():
    h, w, labels = make_inputs(torch.float32)
    loss = linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_bad_inputs_are_named():
    h, w, labels = make_inputs(torch.float32)
    with pytest.raises(TypeError, match="one dtype"):
        linear_cross_entropy(h, w.detach().bfloat16(), labels)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, labels[:, :-1])


def tiny_model(seed=0, vocab_size=300):
    args = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=2, vocab_size=vocab_size, max_seq_len=64)
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return model


def fused_vs_unfused(model) -> tuple[float, float]:
    """(|loss difference|, max relative gradient difference over the parameters) between model(tokens,
    labels=...) and cross_entropy_loss(model(tokens), labels) on one random batch."""
    vocab = model.args.vocab_size
    tokens = torch.randint(0, vocab, (2, 32))
    labels = torch.randint(0, vocab, (2, 32))
    ref = cross_entropy_loss(model(tokens), labels)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    loss = model(tokens, labels=labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return abs(loss.item() - ref.item()), max(rel_err(r, g) for r, g in zip(ref_grads, grads))


def test_model_with_labels_returns_the_loss_of_its_logits():
    model = tiny_model()
    assert isinstance(model.output, OutputHead) and model.fuses_loss
    loss_diff, grad_diff = fused_vs_unfused(model)
    assert loss_diff < 1e-5
    assert grad_diff < 1e-5


def test_model_under_autocast_matches_unfused():
    """Without FSDP the trainer runs fp32 weights under bf16 autocast: the fused head must compute its matmuls
    in bf16 as autocast would, and return fp32 gradients for the fp32 weights."""
    model = tiny_model()
    tokens = torch.randint(0, 300, (2, 32))
    labels = torch.randint(0, 300, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = cross_entropy_loss(model(tokens), labels)
    ref_gw = torch.autograd.grad(ref, model.output.weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=labels)
    gw = torch.autograd.grad(loss, model.output.weight)[0]
    assert gw.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item() and rel_err(ref_gw, gw) < 1e-2


def test_model_with_a_converted_head_refuses_labels():
    model = tiny_model()
    model.output = torch.nn.Linear(model.args.dim, model.args.vocab_size, bias=False)  # as float8's swap
    assert not model.fuses_loss
    with pytest.raises(ValueError, match="does not compute the loss"):
        model(torch.randint(0, 300, (1, 8)), labels=torch.randint(0, 300, (1, 8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_head_saves_one_logits_buffer_of_peak_memory_cuda():
    """Measured with the CUDA allocator: the unfused head + compiled loss holds the logits and their gradient
    together; the fused one peaks at least ~one logits buffer lower (same GEMMs, same weight gradient)."""
    n, dim, vocab = 4096, 256, 32000
    h, w, labels = make_inputs(torch.bfloat16, n_tokens=(1, n), dim=dim, vocab=vocab, device="cuda")
    compiled_ce = torch.compile(cross_entropy_loss, fullgraph=True)

    def unfused():
        logits = F.linear(h, w)
        loss = compiled_ce(logits, labels)
        del logits
        return loss

    peaks = {}
    for name, fn in (("unfused", unfused), ("fused", lambda: linear_cross_entropy(h, w, labels, compiled=True))):
        fn().backward()  # compile and warm up first
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated()
        h.grad = w.grad = None
    logits_bytes = n * vocab * 2
    assert peaks["unfused"] - peaks["fused"] >= 0.9 * logits_bytes, peaks


def test_float8_may_convert_the_head_and_the_model_falls_back():
    """OutputHead declares itself float8-convertible (as a plain nn.Linear head was): with a filter that
    takes every Linear the head becomes a Float8Linear, and training computes logits + loss instead."""
    from titan_fp8.float8 import Float8Linear, convert_to_float8_training

    model = tiny_model(vocab_size=320)  # _scaled_mm needs multiples of 16
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: True)
    assert isinstance(model.output, Float8Linear) and not model.fuses_loss
    tokens = torch.randint(0, 320, (2, 32))
    loss = cross_entropy_loss(model(tokens), tokens)
    loss.backward()
    assert torch.isfinite(loss) and model.output.weight.grad is not None


@pytest.mark.parametrize("fake_quant_on", [True, False], ids=["fake_quant_on", "before_start_step"])
def test_qat_head_computes_the_loss_of_its_fake_quantised_logits(fake_quant_on):
    """QAT's FakeQuantLinear head takes labels like OutputHead: the same loss and gradients as its logits + loss,
    with the fake-quantised input and weight (8da4w: int8 per-token activations, int4 group weights)."""
    from titan_fp8.quant import FakeQuantLinear, QuantScheme, prepare_qat_, set_fake_quant_

    model = tiny_model(vocab_size=320)
    prepare_qat_(model, QuantScheme.from_name("int8_dynamic_activation_int4_weight", group_size=32))
    assert isinstance(model.output, FakeQuantLinear) and model.fuses_loss
    set_fake_quant_(model, fake_quant_on)
    loss_diff, grad_diff = fused_vs_unfused(model)
    assert loss_diff < 1e-5
    assert grad_diff < 1e-5
