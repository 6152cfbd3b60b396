"""The small-GEMM auto filter: the fitted roofline against the measured shapes, the module_filter_fn, the
conversion log, and its wiring into the trainer config."""

from __future__ import annotations

import logging

import pytest
from torch import nn

from titan_fp8.float8 import Float8Linear, Float8LinearConfig, Float8PerfModel, SmallGemmFilter, convert_to_float8_training
from titan_fp8.float8 import small_gemm_filter
from titan_fp8.float8.filter import MEASURED_M, MEASURED_SPEEDUPS, recipe_class

LOGGER = "titan_fp8.float8.convert"


@pytest.mark.parametrize("key", sorted(MEASURED_SPEEDUPS))
def test_model_reproduces_every_measured_win_and_loss(key):
    recipe, k, n = key
    measured = MEASURED_SPEEDUPS[key]
    predicted = Float8PerfModel().speedup(MEASURED_M, k, n, recipe)
    assert (predicted >= 1.0) == (measured >= 1.0), (key, predicted, measured)
    assert abs(predicted - measured) < 0.08, (key, predicted, measured)


def test_speedup_grows_with_tokens_and_size():
    m = Float8PerfModel()
    for recipe in ("tensorwise", "rowwise"):
        assert m.speedup(8192, 4096, 4096, recipe) < m.speedup(16384, 4096, 4096, recipe) < m.speedup(65536, 4096, 4096, recipe)
        assert m.speedup(16384, 4096, 1024, recipe) < m.speedup(16384, 4096, 4096, recipe) < m.speedup(16384, 8192, 8192, recipe)
    assert recipe_class("delayed") == "tensorwise" and recipe_class("rowwise_with_gw_hp") == "rowwise"
    with pytest.raises(ValueError, match="recipe"):
        m.float8_ms(16, 16, 16, "delayed")


class Block(nn.Module):
    """The Linears of one Llama3-8B layer (no weights allocated: meta device)."""

    def __init__(self):
        super().__init__()
        dim, kv, ffn = 4096, 1024, 14336
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, d, bias=False) for d in (dim, kv, kv, dim))
        self.w1, self.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.output = nn.Linear(dim, 128256, bias=False)
        self.odd = nn.Linear(dim, 20, bias=False)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_filter_keeps_the_8b_wk_wv_in_high_precision_and_logs_why(recipe, caplog):
    import torch

    with torch.device("meta"):
        block = Block()
    config = Float8LinearConfig.from_recipe_name(recipe)
    filt = small_gemm_filter(config, 2 * 8192, filter_fqns=["output"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        convert_to_float8_training(block, config=config, module_filter_fn=filt)
    converted = {n for n, m in block.named_children() if isinstance(m, Float8Linear)}
    assert converted == {"wq", "wo", "w1", "w3", "w2"}
    text = caplog.text
    assert "skipped wk" in text and "predicted fp8 speedup 0.7" in text and "K=4096 N=1024" in text
    assert "skipped output" in text and "filter_fqns" in text
    assert "skipped odd" in text and "multiples of 16" in text


def test_filter_threshold_and_token_count_matter():
    lin = nn.Linear(4096, 4096, device="meta")
    assert SmallGemmFilter("tensorwise", 16384)(lin, "wq")
    assert not SmallGemmFilter("tensorwise", 16384, min_speedup=1.5)(lin, "wq")
    assert not SmallGemmFilter("tensorwise", 2048)(lin, "wq")  # few tokens: casts and fixed costs dominate
    assert SmallGemmFilter("tensorwise", 16384)(nn.Linear(4096, 1024, device="meta"), "wk") is False
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tokens"):
            SmallGemmFilter("tensorwise", bad)
    with pytest.raises(ValueError, match="min_speedup"):
        SmallGemmFilter("tensorwise", 16, min_speedup=0)


def test_trainer_config_wires_every_switch():
    from titan_fp8.config import load_config
    from titan_fp8.converters import build_converters

    cfg = load_config(["--float8.enable", "--float8.filter_small_gemms", "--float8.cast_backend", "triton",
                       "--float8.save_float8_for_backward", "--float8.reuse_float8_weight",
                       "--training.local_batch_size", "2", "--training.seq_len", "8192"])
    (conv,) = build_converters(cfg)
    assert conv.config.cast_backend == "triton" and conv.config.save_float8_for_backward
    assert conv.config.reuse_float8_weight and conv.filter_small_gemms and conv.tokens_per_microbatch == 16384
    with pytest.raises(ValueError, match="reuse_float8_weight"):
        build_converters(cfg, fsdp_enabled=True)

    import torch

    with torch.device("meta"):
        block = Block()
    conv.convert(block)
    assert type(block.wk) is nn.Linear and isinstance(block.wq, Float8Linear)
    assert type(block.output) is nn.Linear  # filter_fqns still applies

    default = build_converters(load_config(["--float8.enable"]))[0].config
    assert default.cast_backend == "torch" and not default.save_float8_for_backward and not default.reuse_float8_weight
    # Unset keys keep the recipe's choice: rowwise runs the Triton casts (not the saved fp8 input)...
    rowwise = build_converters(load_config(["--float8.enable", "--float8.recipe_name", "rowwise"]))[0].config
    assert rowwise.cast_backend == "triton" and not rowwise.save_float8_for_backward
    # ...and set keys override it.
    plain = build_converters(load_config(["--float8.enable", "--float8.recipe_name", "rowwise", "--float8.cast_backend",
                                          "torch", "--float8.save_float8_for_backward", "false"]))[0].config
    assert plain.cast_backend == "torch" and not plain.save_float8_for_backward
    saving = build_converters(load_config(["--float8.enable", "--float8.recipe_name", "rowwise",
                                           "--float8.save_float8_for_backward"]))[0].config
    assert saving.cast_backend == "triton" and saving.save_float8_for_backward
