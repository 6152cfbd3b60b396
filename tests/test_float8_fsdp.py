"""The fp8 all-gather weight wrapper on one process: transparent to training, optimizer and
state_dict; its FSDP2 hooks produce fp8 bytes and rebuild the weight. (Two-rank FSDP2 runs are in
test_float8_distributed.py.)"""

import dataclasses

import pytest
import torch
from torch import nn

from titan_fp8.float8 import (
    Float8Linear,
    Float8LinearConfig,
    Float8TrainingTensor,
    WeightWithFloat8AllGather,
    convert_to_float8_training,
    precompute_float8_dynamic_scale_for_fsdp,
)
from titan_fp8.float8.scaling import saturated_cast

FSDP_TENSORWISE = dataclasses.replace(Float8LinearConfig.from_recipe_name("tensorwise"), enable_fsdp_float8_all_gather=True)


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def test_wrapper_is_transparent_without_fsdp():
    torch.manual_seed(0)
    base = mlp()
    plain = convert_to_float8_training(mlp(), config=Float8LinearConfig.from_recipe_name("tensorwise"))
    plain.load_state_dict(base.state_dict())
    wrapped = convert_to_float8_training(base, config=FSDP_TENSORWISE)
    assert isinstance(wrapped[0].weight, nn.Parameter) and isinstance(wrapped[0].weight, WeightWithFloat8AllGather)

    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, wrapped)]
    for _ in range(3):
        x = torch.randn(8, 32)
        for m, opt in zip((plain, wrapped), opts):
            m(x).pow(2).mean().backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            opt.step()
            opt.zero_grad()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    # The optimizer's state and the checkpoint hold plain tensors.
    assert all(type(s["exp_avg"]) is torch.Tensor for s in opts[1].state.values())
    sd = wrapped.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values())
    # Loading writes through to the wrapped weight.
    new_sd = {k: torch.zeros_like(v) for k, v in sd.items()}
    wrapped.load_state_dict(new_sd)
    assert isinstance(wrapped[0].weight, WeightWithFloat8AllGather) and wrapped[0].weight._tensor.abs().sum() == 0


def test_wrapper_survives_meta_init_and_to_empty():
    with torch.device("meta"):
        model = convert_to_float8_training(mlp(), config=FSDP_TENSORWISE)
    model.to_empty(device="cpu")
    assert isinstance(model[0].weight, WeightWithFloat8AllGather) and not model[0].weight.is_meta


class FakeMesh:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size

    def get_group(self):
        raise AssertionError("no collective expected: the scale was precomputed")


def test_pre_and_post_all_gather_produce_fp8_bytes_and_rebuild_the_weight():
    torch.manual_seed(0)
    layer = Float8Linear.from_float(nn.Linear(32, 48, bias=False), FSDP_TENSORWISE)
    # Single process: the scale of the whole weight. The shards below are cut from it by hand, so they cast
    # at the gather (cast=False); the batched cast of real shards is tested further down.
    precompute_float8_dynamic_scale_for_fsdp(layer, cast=False)
    w = layer.weight
    scale, param_ref, data = w._precomputed.scale, w._precomputed.param_ref, w._precomputed.data
    assert param_ref() is w and data is None
    torch.testing.assert_close(scale, 448.0 / w._tensor.abs().max())

    # Rank 0's shard of an uneven 3-way split: 16 rows, rank 2 gets fewer and must be padded.
    shard = w[:16]
    assert isinstance(shard, WeightWithFloat8AllGather)
    shard._precomputed = w._precomputed
    (data,), meta = shard.fsdp_pre_all_gather(FakeMesh(3), torch.Size([48, 32]), (32, 1), None, None)
    assert data.dtype == torch.uint8 and data.shape == (16, 32)
    last = w[32:40]  # a short last shard (8 of 16 rows)
    last._precomputed = w._precomputed
    (data_last,), _ = last.fsdp_pre_all_gather(FakeMesh(3), torch.Size([40, 32]), (32, 1), None, None)
    assert data_last.shape == (14, 32) and (data_last[8:] == 0).all()

    gathered = torch.cat([shard.fsdp_pre_all_gather(FakeMesh(3), torch.Size([48, 32]), (32, 1), None, None)[0][0]
                          for shard in _shards(w, scale)])
    weight, inner = w.fsdp_post_all_gather((gathered,), meta, torch.bfloat16)
    assert isinstance(weight, Float8TrainingTensor) and weight.dtype == torch.bfloat16
    assert weight._data.dtype == torch.float8_e4m3fn and inner[0].data_ptr() == weight._data.data_ptr()
    expected = saturated_cast(w._tensor, scale, torch.float8_e4m3fn)
    assert torch.equal(weight._data.view(torch.uint8), expected.view(torch.uint8))

    # Re-gather into the same tensor: FSDP passes out=, only the scale is refreshed.
    new_scale = scale * 2
    w.fsdp_post_all_gather((gathered,), (new_scale,), torch.bfloat16, out=weight)
    assert weight._scale == new_scale


def _shards(w, scale):
    for i in range(3):
        s = w[16 * i: 16 * (i + 1)]
        s._precomputed = w._precomputed
        yield s


@pytest.mark.parametrize("cast", [False, True])
def test_precomputed_scale_is_ignored_once_the_weight_changes(cast):
    layer = Float8Linear.from_float(nn.Linear(32, 48, bias=False), FSDP_TENSORWISE)
    precompute_float8_dynamic_scale_for_fsdp(layer, cast=cast)
    mesh = FakeMesh(1)
    layer.weight.fsdp_pre_all_gather(mesh, torch.Size([48, 32]), (32, 1), None, None)  # fresh: no collective
    with torch.no_grad():
        layer.weight.mul_(2.0)  # e.g. an optimizer step without a following precompute
    with pytest.raises(AssertionError, match="no collective expected"):
        layer.weight.fsdp_pre_all_gather(mesh, torch.Size([48, 32]), (32, 1), None, None)


def test_precompute_casts_every_shard_once_for_all_gathers_of_the_step():
    """The batched cast after the optimizer step: each weight's fp8 bytes equal the cast at the gather bit for
    bit, and the forward's gather and the backward's re-gather both send that one cast (no new cast, no
    collective) until the weight changes."""
    torch.manual_seed(0)
    model = convert_to_float8_training(mlp(), config=FSDP_TENSORWISE)
    with torch.no_grad():
        model[2].weight.mul_(30.0)  # two weights with different scales
    precompute_float8_dynamic_scale_for_fsdp(model)
    for layer, (n, k) in ((model[0], (64, 32)), (model[2], (32, 64))):
        w = layer.weight
        scale, cached = w._precomputed.scale, w._precomputed.data
        torch.testing.assert_close(scale, 448.0 / w._tensor.abs().max(), rtol=0, atol=0)
        expected = saturated_cast(w._tensor, scale, torch.float8_e4m3fn).view(torch.uint8)
        sent = [w.fsdp_pre_all_gather(FakeMesh(1), torch.Size([n, k]), (k, 1), None, None) for _ in range(2)]
        for (data,), (sent_scale,) in sent:
            assert torch.equal(data, expected) and data.data_ptr() == cached.data_ptr() and sent_scale is scale
    # The same bytes as the cast at the gather (precompute without the batched cast).
    cached_bytes = [m.weight._precomputed.data.view(torch.uint8).clone() for m in (model[0], model[2])]
    precompute_float8_dynamic_scale_for_fsdp(model, cast=False)
    for m, b in zip((model[0], model[2]), cached_bytes):
        (data,), _ = m.weight.fsdp_pre_all_gather(FakeMesh(1), torch.Size(m.weight.shape), (m.weight.shape[1], 1),
                                                  None, None)
        assert torch.equal(data, b)


def test_save_float8_for_backward_matches_high_precision_saving():
    torch.manual_seed(0)
    base = Float8LinearConfig.from_recipe_name("tensorwise")
    lin = nn.Linear(32, 48)
    a = Float8Linear.from_float(lin, base)
    b = Float8Linear.from_float(nn.Linear(32, 48), dataclasses.replace(base, save_float8_for_backward=True))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 32)
    for m in (a, b):
        xi = x.clone().requires_grad_()
        m(xi).sum().backward()
        m.xgrad = xi.grad
    assert torch.equal(a.weight.grad, b.weight.grad) and torch.equal(a.xgrad, b.xgrad)


def test_delayed_precompute_casts_with_the_synced_scale_and_records_the_amax():
    from titan_fp8.float8 import sync_float8_amax_and_scale_history

    torch.manual_seed(0)
    cfg = dataclasses.replace(Float8LinearConfig.from_recipe_name("delayed"), enable_fsdp_float8_all_gather=True)
    layer = Float8Linear.from_float(nn.Linear(32, 48, bias=False), cfg)
    layer(torch.randn(8, 32)).sum().backward()
    sync_float8_amax_and_scale_history(layer)  # the weight now has a history and a delayed scale
    precompute_float8_dynamic_scale_for_fsdp(layer)
    w, scale_buffer = layer.weight, layer.float8_scale_weight
    pre = w._precomputed
    assert torch.equal(pre.scale, scale_buffer)
    assert torch.equal(pre.data.view(torch.uint8), saturated_cast(w._tensor, scale_buffer, torch.float8_e4m3fn).view(torch.uint8))
    # Recorded as the gather would have: the next sync sees this step's weight amax.
    assert layer.float8_amax_weight == w._tensor.abs().max()
    (data,), (scale,) = w.fsdp_pre_all_gather(FakeMesh(1), torch.Size([48, 32]), (32, 1), None, None)
    assert data.data_ptr() == pre.data.data_ptr() and torch.equal(scale, scale_buffer)

    # Another sync (or a load) rewrites the scale buffer in place, the weight unchanged: the cast made with the
    # old scale is not sent.
    with torch.no_grad():
        scale_buffer.mul_(2)
    (data,), (scale,) = w.fsdp_pre_all_gather(FakeMesh(1), torch.Size([48, 32]), (32, 1), None, None)
    assert torch.equal(scale, pre.scale * 2)
    assert torch.equal(data, saturated_cast(w._tensor, pre.scale * 2, torch.float8_e4m3fn).view(torch.uint8))
