"""Model definitions. Only torch (and titan_fp8.loss, torch only) is imported here: never the trainer or config
modules."""

from titan_fp8.models.llama3 import (
    Attention,
    FeedForward,
    KVCache,
    ModelArgs,
    OutputHead,
    RMSNorm,
    Transformer,
    TransformerBlock,
    apply_rotary_emb,
    llama3_flavors,
    num_params,
    precompute_rope_cache,
    repeat_kv,
    sdpa,
)

__all__ = [
    "Attention",
    "FeedForward",
    "KVCache",
    "ModelArgs",
    "OutputHead",
    "RMSNorm",
    "Transformer",
    "TransformerBlock",
    "apply_rotary_emb",
    "llama3_flavors",
    "num_params",
    "precompute_rope_cache",
    "repeat_kv",
    "sdpa",
]
