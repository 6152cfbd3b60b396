"""convert_to_float8_training: in place, same Parameters, logged skips, no silent fallback."""

import logging

import pytest
import torch
from torch import nn

from titan_fp8.float8 import Float8Linear, Float8LinearConfig, convert_to_float8_training

LOGGER = "titan_fp8.float8.convert"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)])
        self.odd = nn.Linear(32, 20)  # out_features not a multiple of 16
        self.output = nn.Linear(20, 16, bias=False)
        self.attn = nn.MultiheadAttention(32, 2)  # out_proj is an nn.Linear subclass

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.output(self.odd(x))


def test_converts_in_place_keeping_parameters(caplog):
    torch.manual_seed(0)
    model = Net()
    params_before = dict(model.named_parameters())
    ids_before = {n: id(p) for n, p in params_before.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE conversion
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    assert out is model
    assert isinstance(model.blocks[0][0], Float8Linear) and isinstance(model.blocks[1][2], Float8Linear)
    assert type(model.odd) is nn.Linear and type(model.output) is nn.Linear
    assert {n: id(p) for n, p in model.named_parameters()} == ids_before

    # The pre-existing optimizer still trains the converted layers.
    w = model.blocks[0][0].weight
    before = w.detach().clone()
    model(torch.randn(8, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before, w.detach())

    text = caplog.text
    assert "converted 4 Linear" in text and "blocks.0.0" in text
    assert "skipped odd" in text and "multiples of 16" in text
    assert "skipped output" in text
    assert "skipped attn.out_proj" in text and "subclass" in text


def test_module_filter_fn_chooses_and_errors_loudly():
    model = Net()
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn.startswith("blocks.0"))
    assert isinstance(model.blocks[0][0], Float8Linear) and type(model.blocks[1][0]) is nn.Linear

    with pytest.raises(ValueError, match="odd"):
        convert_to_float8_training(Net(), module_filter_fn=lambda m, fqn: True)


def test_converts_root_linear_and_preserves_device_dtype_mode():
    lin = nn.Linear(32, 48).to(torch.bfloat16).eval()
    f8 = convert_to_float8_training(lin)
    assert isinstance(f8, Float8Linear) and f8.weight is lin.weight and f8.bias is lin.bias
    assert f8.weight.dtype == torch.bfloat16 and not f8.training


def test_converted_model_is_idempotent_and_repr_shows_recipe():
    model = convert_to_float8_training(Net(), config=Float8LinearConfig.from_recipe_name("delayed"))
    again = convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    assert "recipe=delayed" in repr(again.blocks[0][0])


def test_meta_device_conversion_then_materialise():
    with torch.device("meta"):
        model = Net()
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("delayed"))
    model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, Float8Linear):
            m.reset_float8_buffers()
            nn.init.normal_(m.weight, std=0.02)
            assert m.float8_amax_history_input.abs().sum() == 0 and m.float8_scale_weight == 1
