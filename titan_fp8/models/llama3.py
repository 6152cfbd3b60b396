"""Llama 3 / 3.1 decoder-only Transformer, readable top to bottom.

Shapes: B batch, T sequence length (this call), S key length (T, or cache length when decoding),
D model dim, H query heads, Hkv key/value heads, Dh head dim (D // H), V vocab size.

Life cycle (as torchtitan):

    with torch.device("meta"):
        model = Transformer(args)                 # no memory allocated
    # ... float8 conversion, activation checkpointing, compile, FSDP2 on the meta model ...
    model.to_empty(device="cuda")                 # storage, uninitialised
    model.init_weights(buffer_device=None)        # parameters + RoPE table, deterministic under manual_seed

Submodule names are contracts (float8 filters, FSDP/AC wrapping and checkpoints use FQNs such as
`output`, `layers.0.attention.wq`, `layers.3.feed_forward.w2`): keep them.

This module imports only torch: never the trainer or config modules.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from titan_fp8.loss import head_loss

__all__ = [
    "ModelArgs",
    "llama3_flavors",
    "RMSNorm",
    "precompute_rope_cache",
    "apply_rotary_emb",
    "repeat_kv",
    "sdpa",
    "KVCache",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "OutputHead",
    "Transformer",
    "num_params",
]


# --------------------------------------------------------------------------------------------------
# Arguments and flavors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama 3 model. Frozen: derive variants with `dataclasses.replace(args, ...)`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (plain multi-head attention)
    vocab_size: int = 128256  # the trainer overwrites it with the tokenizer's
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_rope_scaling: bool = False  # Llama 3.1 long-context frequency scaling (below)
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 8192  # size of the RoPE table: longest sequence forward() accepts

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad field."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"ModelArgs.{name}={getattr(self, name)!r}: {why}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("n_kv_heads", "ffn_dim_multiplier") and v is None:
                continue
            if f.name == "use_rope_scaling":
                if not isinstance(v, bool):
                    bad(f.name, "must be a bool")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(f.name, "must be a number")
            if f.type in ("int", "Optional[int]") and not isinstance(v, int):
                bad(f.name, "must be an integer")
            if not v > 0:
                bad(f.name, "must be positive")
        if self.dim % self.n_heads != 0:
            bad("dim", f"must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2 != 0:
            bad("dim", f"head_dim = dim // n_heads = {self.head_dim} must be even for RoPE")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.use_rope_scaling and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            bad("rope_high_freq_factor", f"must exceed rope_low_freq_factor={self.rope_low_freq_factor}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        """n_kv_heads with None resolved to n_heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Llama rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count from the shapes alone (equals num_params(Transformer(self)))."""
        d, hd, kv = self.dim, self.head_dim, self.num_kv_heads
        attention = d * self.n_heads * hd + 2 * d * kv * hd + self.n_heads * hd * d  # wq, wk, wv, wo
        feed_forward = 3 * d * self.ffn_hidden_dim  # w1, w2, w3
        block = attention + feed_forward + 2 * d  # + attention_norm, ffn_norm
        total = self.n_layers * block + d + d * self.vocab_size  # + norm, output
        if not exclude_embedding:
            total += self.vocab_size * d  # tok_embeddings
        return total

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), torchtitan's formula:

        6 * (parameters without the embedding table; the output head counts) for the GEMMs, plus
        12 * n_layers * n_heads * head_dim * seq_len for the attention scores and values
        (full, not causal-halved, as torchtitan and the PaLM appendix count them).
        """
        return 6 * self.num_params(exclude_embedding=True) + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


# Published shapes (Llama 3.1 model card / torchtitan) plus two small ones. vocab_size of debugmodel and
# small is a placeholder: the trainer replaces it with the tokenizer's.
llama3_flavors: dict[str, ModelArgs] = {
    "debugmodel": ModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=256,
        rope_theta=500000.0, max_seq_len=2048,
    ),
    # Not a published Llama size: GPT-2-small's width and depth (76M parameters in the blocks), big
    # enough that 4-bit quantisation hurts measurably, small enough to train on one GPU in minutes
    # (configs/llama3_small.toml; the QAT experiment in docs/qat.md).
    "small": ModelArgs(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=4096, multiple_of=256,
        rope_theta=500000.0, max_seq_len=2048,
    ),
    "8B": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3, rope_theta=500000.0, use_rope_scaling=True, max_seq_len=131072,
    ),
    "70B": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
        ffn_dim_multiplier=1.3, rope_theta=500000.0, use_rope_scaling=True, max_seq_len=131072,
    ),
    "405B": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
        ffn_dim_multiplier=1.2, rope_theta=500000.0, use_rope_scaling=True, max_seq_len=131072,
    ),
}


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back to x's dtype (as Meta's reference)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., D)
        y = F.rms_norm(x.float(), (self.dim,), eps=self.eps).type_as(x)  # (..., D)
        return y * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# --------------------------------------------------------------------------------------------------
# Rotary position embedding (real-valued cos/sin; same pairing as Meta's complex formulation, so
# Meta/torchtitan checkpoints load unchanged)
# --------------------------------------------------------------------------------------------------


def _llama31_scale_freqs(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Llama 3.1 rule: keep high frequencies, divide low ones by `factor`, interpolate between."""
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_len = args.rope_original_max_seq_len
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_rope_cache(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """cos and sin of position * frequency, fp32: (max_seq_len, head_dim // 2, 2) as [..., (cos, sin)]."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float64) / hd))  # (Dh/2,)
    if args.use_rope_scaling:
        freqs = _llama31_scale_freqs(freqs, args)
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.float64)  # (max_seq_len,)
    angles = torch.outer(t, freqs)  # (max_seq_len, Dh/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (max_seq_len, Dh/2, 2)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of the head dim by its position's angle, in fp32.

    x: (B, T, heads, Dh); rope: (T, Dh/2, 2) cos/sin for x's positions. Returns x's shape and dtype.
    """
    B, T, nh, hd = x.shape
    xp = x.float().reshape(B, T, nh, hd // 2, 2)  # (B, T, heads, Dh/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]  # (B, T, heads, Dh/2)
    cos = rope[..., 0].view(1, T, 1, hd // 2)  # (1, T, 1, Dh/2)
    sin = rope[..., 1].view(1, T, 1, hd // 2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, T, heads, Dh/2, 2)
    return out.flatten(3).type_as(x)  # (B, T, heads, Dh)


# --------------------------------------------------------------------------------------------------
# Attention (grouped-query) with an optional KV cache for generation
# --------------------------------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, Dh) -> (B, Hkv * n_rep, S, Dh), each kv head repeated for its n_rep query heads."""
    if n_rep == 1:
        return x
    B, hkv, S, hd = x.shape
    return x[:, :, None].expand(B, hkv, n_rep, S, hd).reshape(B, hkv * n_rep, S, hd)


def _native_gqa_ok(q: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether SDPA's enable_gqa reaches a fused kernel. On CUDA only the flash backend broadcasts kv
    heads (bf16/fp16, no mask, head_dim <= 256); elsewhere enable_gqa silently runs the slow math
    backend, so we expand K/V ourselves. CPU's flash kernel handles GQA with or without a mask."""
    if q.device.type == "cpu":
        return True
    return q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and mask is None and q.shape[-1] <= 256


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
         is_causal: bool = False) -> torch.Tensor:
    """Attention with kv heads shared by groups of query heads.

    q: (B, H, T, Dh); k, v: (B, Hkv, S, Dh); mask: None or bool (T, S), True = may attend. -> (B, H, T, Dh)
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not _native_gqa_ok(q, mask):
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, Dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _no_cudnn_attention(q: torch.Tensor):
    """Keep KV-cache attention off cuDNN's SDPA backend on CUDA. cuDNN builds an execution plan for each
    new key length, and decoding grows the key length by one every token: on an H100 (torch 2.11) that
    plan build made each decoded token of the debug model take ~60 ms instead of ~1 ms. Flash,
    memory-efficient and math attention have no per-shape setup."""
    if q.device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class KVCache:
    """Keys and values of past positions for every layer, for token-by-token decoding.

    Not a module and not in the state dict: the model stays stateless and the training path never
    sees it. Build with `model.make_kv_cache(batch_size, max_seq_len)`, then call
    `model(prompt, start_pos=0, kv_cache=cache)` followed by `model(next_tok, start_pos=n, kv_cache=cache)`.
    """

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, max_seq_len, Dh)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    def update(self, layer_id: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, T, Dh) at positions [start_pos, start_pos+T); return all keys and values
        so far, (B, Hkv, start_pos+T, Dh)."""
        B, _, T, _ = k.shape
        end = start_pos + T
        if B > self.batch_size or end > self.max_seq_len:
            raise ValueError(f"KVCache holds batch {self.batch_size} x {self.max_seq_len} positions, "
                             f"got batch {B} up to position {end}")
        self.k[layer_id][:B, :, start_pos:end] = k
        self.v[layer_id][:B, :, start_pos:end] = v
        return self.k[layer_id][:B, :, :end], self.v[layer_id][:B, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.num_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, layer_id: int = 0, start_pos: int = 0,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape  # x: (B, T, D)
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)

        if kv_cache is None:  # training: plain causal attention
            y = sdpa(q, k, v, is_causal=True)
        else:  # generation: attend to the cached positions [0, start_pos) and causally within this chunk
            k, v = kv_cache.update(layer_id, start_pos, k, v)  # (B, Hkv, S, Dh), S = start_pos + T
            mask = None
            if T > 1:  # query i sits at position start_pos + i and sees keys 0..start_pos + i
                S = k.shape[2]
                mask = torch.arange(S, device=q.device)[None, :] <= start_pos + torch.arange(T, device=q.device)[:, None]  # (T, S)
            with _no_cudnn_attention(q):
                y = sdpa(q, k, v, mask=mask)
        # y: (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * Dh)
        return self.wo(y)  # (B, T, D)

    def init_weights(self, init_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)


# --------------------------------------------------------------------------------------------------
# SwiGLU feed-forward
# --------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) -> (B, T, D)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for lin in (self.w2, self.w3):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=init_std)


# --------------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5  # depth-scaled, for the residual outputs

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int = 0,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:  # x: (B, T, D)
        h = x + self.attention(self.attention_norm(x), rope, self.layer_id, start_pos, kv_cache)  # (B, T, D)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, T, D)

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        self.feed_forward.init_weights(self.init_std)


class OutputHead(nn.Linear):
    """The vocabulary projection (an nn.Linear: same parameter, same checkpoint key).

    Called with labels it returns the mean fp32 cross-entropy through `linear_cross_entropy`, which keeps
    one logits-sized buffer instead of two (the logits and then their gradient); without labels, the logits.
    A converter may replace it: QAT's FakeQuantLinear accepts labels the same way (on its fake-quantised
    operands); a Float8Linear (float8 without the usual "output" filter) does not, and the model then
    computes logits and the loss separately.
    """

    accepts_labels = True  # forward(h, labels=...) returns the loss (QAT's FakeQuantLinear has the same)
    compile_loss: bool = False  # the trainer sets it when it compiles the loss: the loss kernels get compiled
    float8_convertible = True  # float8 may swap it for a Float8Linear (the model then falls back to logits + loss)

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)  # (B, T, V)
        return head_loss(h, self.weight, labels, compiled=self.compile_loss)  # () fp32


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = OutputHead(args.dim, args.vocab_size, bias=False)
        # cos/sin table, recomputed by init_weights; not persistent, so not in checkpoints
        self.register_buffer("rope_cache", torch.empty(args.max_seq_len, args.head_dim // 2, 2), persistent=False)

    @property
    def fuses_loss(self) -> bool:
        """Whether model(tokens, labels=...) is available: the output head computes the loss itself."""
        return getattr(self.output, "accepts_labels", False)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, kv_cache: Optional[KVCache] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, V) in the compute dtype (cast to fp32 for the loss); with
        labels (B, T) (requires `fuses_loss`): the mean fp32 cross-entropy, the logits never returned.

        start_pos and kv_cache are for generation only; training calls model(tokens, labels=labels).
        """
        if labels is not None and not self.fuses_loss:
            raise ValueError(f"Transformer: labels given but the output head ({type(self.output).__name__}) does "
                             f"not compute the loss; compute logits and the loss separately")
        B, T = tokens.shape
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence end {start_pos + T} exceeds ModelArgs.max_seq_len={self.args.max_seq_len}")
        rope = self.rope_cache[start_pos:start_pos + T]  # (T, Dh/2, 2)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers.values():
            h = layer(h, rope, start_pos, kv_cache)  # (B, T, D)
        h = self.norm(h)  # (B, T, D)
        if labels is not None:
            return self.output(h, labels=labels)  # () fp32
        return self.output(h)  # (B, T, V)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Materialise everything after `to_empty`: parameters (torchtitan's init) and the RoPE table.

        buffer_device: where to compute the RoPE table (default: where the buffer already lives).
        Deterministic under torch.manual_seed.
        """
        buffer_device = buffer_device or self.rope_cache.device
        self.rope_cache = precompute_rope_cache(self.args, device=buffer_device)
        nn.init.normal_(self.tok_embeddings.weight)  # std 1, as torchtitan
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.reset_parameters()
        std = self.args.dim ** -0.5
        nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def make_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None,
                      dtype: Optional[torch.dtype] = None, device: torch.device | str | None = None) -> KVCache:
        """A KVCache for generation, by default in the dtype and on the device of the parameters."""
        p = self.output.weight
        return KVCache(self.args.n_layers, batch_size, max_seq_len or self.args.max_seq_len,
                       self.args.num_kv_heads, self.args.head_dim, dtype or p.dtype, device or p.device)


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Number of parameters (meta tensors count too); optionally without nn.Embedding tables."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        n -= sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return n
