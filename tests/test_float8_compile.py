"""torch.compile(fullgraph=True) of Float8Linear MLPs, forward + backward, with zero graph breaks.

The tensorwise and rowwise cases run the full inductor stack (fused casts); the others use the
aot_eager backend, which traces the same graph (dynamo + AOTAutograd through the tensor subclass
and the autograd.Function) without the slow CPU codegen. Graph breaks are a dynamo property, so
both backends check the same thing.
"""

import dataclasses

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from titan_fp8.float8 import (
    Float8LinearConfig,
    convert_to_float8_training,
    invalidate_float8_weights,
    precompute_float8_weights,
    sync_float8_amax_and_scale_history,
)


def mlp(dim=32, hidden=64, dtype=torch.float32, device="cpu"):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)).to(device=device, dtype=dtype)


def compiled_steps(recipe: str, backend: str, steps: int = 3, device="cpu", dtype=torch.float32, x_shape=(2, 24, 32),
                   **overrides):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), **overrides)
    eager = convert_to_float8_training(mlp(dtype=dtype, device=device), config=config)
    model = convert_to_float8_training(mlp(dtype=dtype, device=device), config=config)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(steps):
        x = torch.randn(*x_shape, device=device, dtype=dtype)
        for m in (eager, compiled):
            plain = model if m is compiled else eager
            if config.reuse_float8_weight:
                precompute_float8_weights(plain)
            xi = x.clone().requires_grad_()
            m(xi).float().pow(2).mean().backward()
            sync_float8_amax_and_scale_history(plain)
            invalidate_float8_weights(plain)
    return eager, model, counters


# The speed switches: custom-op casts (triton backend), fp8 input saved for backward, fp8 weight reuse.
FAST = dict(cast_backend="triton", save_float8_for_backward=True)
# The plain path (torch ops for every cast), for recipes whose default uses the switches (rowwise).
PLAIN = dict(cast_backend="torch", save_float8_for_backward=False)


@pytest.mark.parametrize(
    "recipe,backend,overrides",
    [
        ("tensorwise", "inductor", {}),
        ("rowwise", "inductor", {}),
        ("rowwise_with_gw_hp", "aot_eager", {}),
        ("delayed", "aot_eager", {}),
        ("tensorwise", "inductor", FAST),
        ("rowwise", "inductor", PLAIN),
        ("delayed", "aot_eager", {**FAST, "reuse_float8_weight": True}),
        ("rowwise", "inductor", {"cast_backend": "triton_inline"}),
    ],
    ids=["tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed", "tensorwise-fast", "rowwise-torch-casts",
         "delayed-fast-reuse", "rowwise-inline-casts"],
)
def test_compiled_mlp_forward_backward_has_no_graph_breaks(recipe, backend, overrides):
    eager, model, c = compiled_steps(recipe, backend, **overrides)
    assert sum(c["graph_break"].values()) == 0, dict(c["graph_break"])
    # delayed compiles twice: before and after its history exists (a Python flag), not a break
    assert c["stats"]["unique_graphs"] == (2 if recipe == "delayed" else 1)
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    for (n, b), q in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, q, msg=n)


def test_explain_reports_one_graph():
    torch.manual_seed(0)
    model = convert_to_float8_training(mlp())
    explanation = torch._dynamo.explain(model)(torch.randn(16, 32, requires_grad=True))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp8 _scaled_mm on sm89+)")
@pytest.mark.parametrize("casts", ["default", "torch", "triton-save8", "triton_inline"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed"])
def test_cuda_compiled_float8_linear_uses_scaled_mm(recipe, casts):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 _scaled_mm needs sm89+")
    overrides = {"default": {}, "torch": PLAIN,
                 "triton-save8": dict(cast_backend="triton", save_float8_for_backward=recipe != "rowwise_with_gw_hp"),
                 "triton_inline": dict(cast_backend="triton_inline")}[casts]
    eager, model, c = compiled_steps(recipe, "inductor", device="cuda", dtype=torch.bfloat16, x_shape=(4, 256, 32),
                                     **overrides)
    assert sum(c["graph_break"].values()) == 0, dict(c["graph_break"])
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.isfinite(p.grad).all()
        sq = 20 * torch.log10(q.grad.float().norm() / (p.grad.float() - q.grad.float()).norm().clamp(min=1e-30))
        assert sq > 20, sq
    # The compiled graph really runs fp8 GEMMs.
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(4, 256, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    _, code = run_and_get_code(lambda: compiled(x).float().sum().backward())
    assert any("_scaled_mm" in c for c in code)
    backend = _cast_backend(model)
    if backend == "triton":  # opaque custom ops, called from the compiled code
        assert any("titan_fp8.cast_2d" in c for c in code)
    elif backend == "triton_inline":  # triton_ops: inductor launches the kernels itself, no op call
        assert any("_cast_2d_kernel" in c for c in code)
        assert not any("titan_fp8.cast_2d" in c or "titan_fp8.amax" in c for c in code)


def _cast_backend(model) -> str:
    return next(m.config.cast_backend for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "cast_backend"))


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_compiled_block_saves_no_fp8_activations(recipe):
    """Under torch.compile a Llama3 block's Linears keep no fp8 copy of their inputs for backward: the
    partitioner recomputes the casts from bf16 tensors the backward reads anyway. Delayed scaling once
    saved three (wq/wk/wv cast one input with three scale buffers; the backward's recast was merged into
    the forward's cast, which the partitioner would not recompute): +192 MiB per 8B layer at 16k tokens."""
    from titan_fp8.models import Transformer, llama3_flavors

    torch._dynamo.reset()
    torch.manual_seed(0)
    args = dataclasses.replace(llama3_flavors["debugmodel"], dim=128, n_heads=2, n_kv_heads=1, n_layers=1,
                               vocab_size=256, max_seq_len=64)
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    model.to(torch.bfloat16)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda m, fqn: "output" not in fqn)
    block, tokens = model.layers["0"], torch.randint(0, 256, (2, 64))
    rope = model.rope_cache[:64]
    if recipe == "delayed":  # a history first: otherwise delayed casts with dynamic scales
        block(model.tok_embeddings(tokens), rope).float().sum().backward()
        sync_float8_amax_and_scale_history(model)
    block.compile(fullgraph=True, dynamic=False)
    saved_dtypes = []
    h = model.tok_embeddings(tokens).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_dtypes.append(t.dtype) or t, lambda t: t):
        out = block(h, rope)
    out.float().sum().backward()
    assert torch.bfloat16 in saved_dtypes  # the hooks saw the compiled block's saved tensors
    fp8 = [d for d in saved_dtypes if d in (torch.float8_e4m3fn, torch.float8_e5m2)]
    assert fp8 == [], f"{recipe}: the compiled block saved {len(fp8)} fp8 tensors for backward"
