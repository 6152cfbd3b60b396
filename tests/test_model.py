"""Llama 3 model: shapes, published sizes, attention/RoPE correctness, KV cache, init, compile."""

import ast
import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from titan_fp8.models import llama3
from titan_fp8.models.llama3 import (
    Attention,
    ModelArgs,
    Transformer,
    TransformerBlock,
    apply_rotary_emb,
    llama3_flavors,
    num_params,
    precompute_rope_cache,
    repeat_kv,
)

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)


def build(args: ModelArgs, seed: int = 0, device: str = "cpu") -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


# ---------------------------------------------------------------- published sizes


@pytest.mark.parametrize(
    "flavor, params, ffn_hidden",
    [
        ("8B", 8_030_261_248, 14336),
        ("70B", 70_553_706_496, 28672),
        ("405B", 405_853_388_800, 53248),
    ],
)
def test_published_sizes_on_meta(flavor, params, ffn_hidden):
    args = llama3_flavors[flavor]
    assert args.vocab_size == 128256 and args.rope_theta == 500000 and args.use_rope_scaling
    assert args.ffn_hidden_dim == ffn_hidden
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, max_seq_len=16))
    assert num_params(model) == params == args.num_params()
    # published: 8.03B, 70.6B, 405.9B (Llama 3.1 model card)
    assert round(params / 1e9, 1) == {"8B": 8.0, "70B": 70.6, "405B": 405.9}[flavor]
    n_emb = args.vocab_size * args.dim
    assert num_params(model, exclude_embedding=True) == params - n_emb == args.num_params(exclude_embedding=True)


def test_small_flavor_shape():
    # GPT-2-small's width and depth; the flavor comment and docs/qat.md quote 76M parameters in the blocks.
    args = llama3_flavors["small"]
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim) == (768, 12, 12, 4, 2048)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, vocab_size=4096))
    assert round(sum(p.numel() for p in model.layers.parameters()) / 1e6) == 76


def test_flops_per_token_is_torchtitan_formula():
    args = llama3_flavors["8B"]
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, max_seq_len=16))
    n = num_params(model, exclude_embedding=True)
    expected = 6 * n + 12 * 32 * 32 * 128 * 8192
    assert args.num_flops_per_token(8192) == expected
    assert isinstance(expected, int) and 5.7e10 < expected < 5.9e10


def test_fqns_are_stable():
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(llama3_flavors["8B"], n_layers=4, max_seq_len=16))
    names = dict(model.named_modules())
    for fqn in ["tok_embeddings", "norm", "output", "layers.0.attention.wq", "layers.0.attention.wk",
                "layers.0.attention.wv", "layers.0.attention.wo", "layers.3.feed_forward.w1",
                "layers.3.feed_forward.w2", "layers.3.feed_forward.w3", "layers.2.attention_norm",
                "layers.2.ffn_norm"]:
        assert fqn in names, fqn
    assert list(model.layers.keys()) == ["0", "1", "2", "3"]
    assert not any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in model.modules())


def _imported_modules(module) -> set:
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    return imported


def test_model_module_imports_only_torch():
    """The model (and the loss its output head computes) depend on torch and the standard library only."""
    import titan_fp8.loss

    stdlib = {"__future__", "contextlib", "math", "dataclasses", "typing", "functools"}
    model_imports = {m.split(".")[0] for m in _imported_modules(llama3) - {"titan_fp8.loss"}}
    assert model_imports <= stdlib | {"torch"}, model_imports
    loss_imports = {m.split(".")[0] for m in _imported_modules(titan_fp8.loss)}
    assert loss_imports <= stdlib | {"torch"}, loss_imports


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(dim=100, n_heads=8), "dim"),  # not divisible
        (dict(dim=24, n_heads=8), "dim"),  # head_dim 3 is odd
        (dict(n_kv_heads=3), "n_kv_heads"),  # 8 % 3
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dim=0), "dim"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(multiple_of=0), "multiple_of"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(ffn_dim_multiplier=-1.0), "ffn_dim_multiplier"),
        (dict(dim=256.0), "dim"),
        (dict(use_rope_scaling=1), "use_rope_scaling"),
        (dict(use_rope_scaling=True, rope_high_freq_factor=1.0), "rope_high_freq_factor"),
    ],
)
def test_model_args_validation(change, field):
    base = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=100)
    with pytest.raises(ValueError) as e:
        ModelArgs(**{**base, **change})
    msg = str(e.value)
    assert msg.startswith(f"ModelArgs.{field}=") and "\n" not in msg


def test_model_args_frozen_and_replace():
    args = llama3_flavors["debugmodel"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.vocab_size = 5  # type: ignore[misc]
    new = dataclasses.replace(args, vocab_size=5000, n_layers=2)
    assert (new.vocab_size, new.n_layers, args.vocab_size) == (5000, 2, 2048)
    with pytest.raises(ValueError, match="n_kv_heads"):
        dataclasses.replace(args, n_heads=2)  # 2 % 4 != 0: caught on replace too
    assert ModelArgs(dim=64, n_heads=4, n_kv_heads=None).num_kv_heads == 4


# ---------------------------------------------------------------- forward semantics


def test_debugmodel_forward_shape():
    args = dataclasses.replace(llama3_flavors["debugmodel"], vocab_size=300)
    model = build(args)
    tokens = torch.randint(0, 300, (2, 32))
    logits = model(tokens)
    assert logits.shape == (2, 32, 300) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert args.num_kv_heads < args.n_heads  # GQA exercised by the debug flavor
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, args.max_seq_len + 1, dtype=torch.long))


def test_causal():
    model = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % TINY.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def _reference_attention(attn: Attention, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Explicit GQA: repeat kv heads, softmax(q k^T / sqrt(d) + causal mask) v, no SDPA."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, attn.n_heads, attn.head_dim)
    k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)
    q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    n_rep = attn.n_heads // attn.n_kv_heads
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("native_gqa", [True, False])
def test_gqa_matches_repeat_kv_reference(monkeypatch, native_gqa):
    monkeypatch.setattr(llama3, "_native_gqa_ok", lambda q, mask: native_gqa)
    model = build(TINY)
    attn = model.layers["0"].attention
    assert attn.n_heads == 2 * attn.n_kv_heads
    x = torch.randn(3, 17, TINY.dim)
    rope = model.rope_cache[:17]
    torch.testing.assert_close(attn(x, rope), _reference_attention(attn, x, rope), rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_formulation():
    """Same pairing as Meta's view_as_complex RoPE, so their checkpoints' wq/wk layouts apply unchanged."""
    args = ModelArgs(dim=64, n_heads=4, max_seq_len=32)
    rope = precompute_rope_cache(args)  # (32, 8, 2)
    freqs_cis = torch.polar(torch.ones(32, 8), torch.outer(torch.arange(32.0), 1.0 / (500000.0 ** (torch.arange(0, 16, 2) / 16))))
    x = torch.randn(2, 32, 3, 16)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 32, 3, 8, 2)) * freqs_cis[None, :, None]).flatten(3)
    torch.testing.assert_close(apply_rotary_emb(x, rope), ref, rtol=1e-5, atol=1e-5)
    assert apply_rotary_emb(x.bfloat16(), rope).dtype == torch.bfloat16


def _meta_reference_scaled_freqs(freqs: list[float]) -> list[float]:
    """Llama 3.1 `apply_scaling`, written as in Meta's reference (scalar loop)."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return out


def test_rope_scaling_matches_llama31_reference():
    args = dataclasses.replace(llama3_flavors["8B"], max_seq_len=1024)
    hd = args.head_dim
    base = [1.0 / (500000.0 ** (i / hd)) for i in range(0, hd, 2)]
    ref = torch.tensor(_meta_reference_scaled_freqs(base), dtype=torch.float64)
    t = torch.arange(1024, dtype=torch.float64)
    angles = torch.outer(t, ref)
    expected = torch.stack([angles.cos(), angles.sin()], -1).float()
    got = precompute_rope_cache(args)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # all three regimes occur for head_dim 128: kept, interpolated, divided by 8
    ratios = ref / torch.tensor(base, dtype=torch.float64)
    assert (ratios == 1).any() and (ratios == 0.125).any() and ((ratios > 0.125) & (ratios < 1)).any()
    unscaled = precompute_rope_cache(dataclasses.replace(args, use_rope_scaling=False))
    assert not torch.allclose(got, unscaled)


# ---------------------------------------------------------------- generation


def test_kv_cache_decode_matches_full_forward():
    """fp32, tolerance 1e-5: prefill 7 tokens, one 3-token chunk at start_pos 7, then 1 token at a time."""
    model = build(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_kv_cache(batch_size=2, max_seq_len=16)
        pieces = [model(tokens[:, :7], start_pos=0, kv_cache=cache)]
        pieces.append(model(tokens[:, 7:10], start_pos=7, kv_cache=cache))
        for pos in range(10, 16):
            pieces.append(model(tokens[:, pos:pos + 1], start_pos=pos, kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KVCache"):
        model(tokens[:, :1], start_pos=16, kv_cache=cache)
    assert not any("cache" in k for k in model.state_dict())


# ---------------------------------------------------------------- init


def test_meta_init_is_deterministic_and_torchtitan_like():
    args = dataclasses.replace(llama3_flavors["debugmodel"], vocab_size=512)
    a, b = build(args, seed=3), build(args, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert "rope_cache" not in sa and sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["output.weight"], build(args, seed=4).state_dict()["output.weight"])
    torch.testing.assert_close(a.rope_cache, precompute_rope_cache(args))
    assert not any(p.is_meta for p in a.parameters()) and not a.rope_cache.is_meta

    def std(name):
        return sa[name].std().item()

    assert abs(std("tok_embeddings.weight") - 1.0) < 0.05
    assert abs(std("layers.0.attention.wq.weight") - 0.02) < 0.002
    assert abs(std("layers.0.feed_forward.w1.weight") - 0.02) < 0.002
    for i in range(args.n_layers):
        depth_std = 0.02 / math.sqrt(2 * (i + 1))
        for name in (f"layers.{i}.attention.wo.weight", f"layers.{i}.feed_forward.w2.weight",
                     f"layers.{i}.feed_forward.w3.weight"):
            assert abs(std(name) / depth_std - 1) < 0.1, name
    out_std = args.dim ** -0.5
    assert sa["output.weight"].abs().max() <= 3 * out_std
    assert torch.equal(sa["norm.weight"], torch.ones(args.dim))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(TINY.vocab_size) - 1
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_forward_backward():
    model = build(TINY).to(torch.bfloat16)
    model.init_weights()  # recompute rope_cache in fp32 after the dtype cast
    assert model.rope_cache.dtype == torch.float32
    logits = model(torch.randint(0, TINY.vocab_size, (2, 16)))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- compile


def test_compile_block_fullgraph_no_graph_breaks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build(TINY)
    block: TransformerBlock = model.layers["1"]
    rope = model.rope_cache[:16]
    x = torch.randn(2, 16, TINY.dim, requires_grad=True)

    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, rope)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    x_grad = x.grad.clone()

    block.zero_grad()
    x.grad = None
    ref = block(x, rope)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, block.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()
