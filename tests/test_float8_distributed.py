"""Two gloo ranks on CPU: the delayed-scaling amax sync, and FSDP2 fp8 all-gather.

Each test spawns 2 processes; workers write what they saw to files and the test asserts on them,
so failures show up as ordinary assertion diffs.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from titan_fp8.float8 import (
    Float8Linear,
    Float8LinearConfig,
    Float8TrainingTensor,
    WeightWithFloat8AllGather,
    convert_to_float8_training,
    precompute_float8_dynamic_scale_for_fsdp,
    sync_float8_amax_and_scale_history,
)

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _entry(rank: int, fn, tmp: str):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, tmp)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        # No rank may tear down its gloo connections while a peer still finishes its last
        # collective: that kills the peer's gloo thread (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # After fully_shard, torch keeps references to the gloo process group past destroy_process_group
    # (its threads stay alive), and destroying it during interpreter shutdown aborts now and then
    # ("terminate called without an active exception": ~1 run in 25 under CPU load). The results are
    # saved and every rank passed the barrier, so leave without running C++ static destructors.
    os._exit(0)


def spawn(fn, tmp_path) -> list:
    mp.spawn(_entry, args=(fn, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))


class CountCalls:
    """Counts calls of dist.<name> while active."""

    def __init__(self, name: str):
        self.name, self.count, self.inputs = name, 0, []

    def __enter__(self):
        self.real = getattr(dist, self.name)

        def counting(*args, **kwargs):
            self.count += 1
            return self.real(*args, **kwargs)

        setattr(dist, self.name, counting)
        return self

    def __exit__(self, *exc):
        setattr(dist, self.name, self.real)


# ---------------------------------------------------------------------- delayed-scaling sync


def _sync_worker(rank: int, tmp: str):
    torch.manual_seed(0)  # same weights on both ranks
    model = convert_to_float8_training(mlp(), config=Float8LinearConfig.from_recipe_name("delayed"))
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.randn(16, 32) * (1 + 3 * rank)
    out = model(x)
    out.backward(torch.randn_like(out) * (1 + rank))
    local = {n: m.float8_amax_input.item() for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    local_go = {n: m.float8_amax_grad_output.item() for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    with CountCalls("all_reduce") as calls:
        sync_float8_amax_and_scale_history(model)
    state = {k: v for k, v in model.state_dict().items() if "float8" in k}
    return dict(all_reduces=calls.count, state=state, local=local, local_go=local_go)


def test_sync_makes_scales_identical_with_one_all_reduce(tmp_path):
    r0, r1 = spawn(_sync_worker, tmp_path)
    assert r0["all_reduces"] == 1 and r1["all_reduces"] == 1  # 3 layers x 3 operands, ONE collective
    assert r0["local"] != r1["local"]  # the ranks really saw different data
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for name in r0["local"]:
        expected = max(r0["local"][name], r1["local"][name])
        assert r0["state"][f"{name}.float8_amax_history_input"][0].item() == pytest.approx(expected, rel=1e-6)
        assert r0["state"][f"{name}.float8_scale_input"].item() == pytest.approx(448.0 / expected, rel=1e-6)
        expected_go = max(r0["local_go"][name], r1["local_go"][name])
        assert r0["state"][f"{name}.float8_scale_grad_output"].item() == pytest.approx(57344.0 / expected_go, rel=1e-6)


# ---------------------------------------------------------------------- FSDP2 fp8 all-gather


def _fsdp_worker(rank: int, tmp: str, recipe: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = Float8LinearConfig.from_recipe_name(recipe)
    torch.manual_seed(0)
    plain = mlp()
    # Reference: one process, no FSDP, same float8 recipe; it runs each rank's batch as a separate
    # micro-batch so activation/gradient scales match the ranks' exactly.
    ref = convert_to_float8_training(copy.deepcopy(plain), config=base)
    model = convert_to_float8_training(plain, config=dataclasses.replace(base, enable_fsdp_float8_all_gather=True))
    assert all(isinstance(m.weight, WeightWithFloat8AllGather) for m in model.modules() if isinstance(m, Float8Linear))
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, Float8Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model[0].weight._local_tensor, WeightWithFloat8AllGather)

    # What the all-gathers carry and what the layers compute with.
    payload, weights_seen = [], []
    pre = WeightWithFloat8AllGather.fsdp_pre_all_gather

    def recording_pre(self, mesh, outer_size, outer_stride, module, mp_policy):  # FSDP checks the arity
        inputs, meta = pre(self, mesh, outer_size, outer_stride, module, mp_policy)
        payload.append((inputs[0].dtype, inputs[0].numel(), self._tensor.numel()))
        return inputs, meta

    WeightWithFloat8AllGather.fsdp_pre_all_gather = recording_pre
    collective_inputs = []
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    reals = {n: getattr(dist, n) for n in names}
    def recording_collective(real):
        def collective(out, inp, *args, **kwargs):
            collective_inputs.append((inp.dtype, inp.numel()))
            return real(out, inp, *args, **kwargs)

        return collective

    for n in names:
        setattr(dist, n, recording_collective(reals[n]))

    def record_weight(m, args):
        w = m.weight
        weights_seen.append((type(w), w._data.dtype if isinstance(w, Float8TrainingTensor) else None))

    for layer in model:
        if isinstance(layer, Float8Linear):
            layer.register_forward_pre_hook(record_weight)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    losses, grad_diffs, param_diffs, fwd_all_reduces, precompute_all_reduces = [], [], [], [], []
    for it in range(3):
        gen = torch.Generator().manual_seed(1000 + it)
        batches = [torch.randn(16, 32, generator=gen) * (1 + r) for r in range(WORLD)]
        with CountCalls("all_reduce") as fwd_calls:
            loss = model(batches[rank]).pow(2).mean()
        fwd_all_reduces.append(fwd_calls.count)
        loss.backward()
        ref_loss = sum(ref(b).pow(2).mean() for b in batches) / WORLD
        ref_loss.backward()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append((global_loss.item() / WORLD, ref_loss.item()))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        grad_diffs.append(max(((grads[n] - p.grad).norm() / p.grad.norm()).item() for n, p in ref.named_parameters()))
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        if recipe == "delayed":
            sync_float8_amax_and_scale_history(model)
            sync_float8_amax_and_scale_history(ref)
        with CountCalls("all_reduce") as pre_calls:
            precompute_float8_dynamic_scale_for_fsdp(model)
        precompute_all_reduces.append(pre_calls.count)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        param_diffs.append(max((full[n] - p).abs().max().item() for n, p in ref.named_parameters()))
    WeightWithFloat8AllGather.fsdp_pre_all_gather = pre
    for n in names:
        setattr(dist, n, reals[n])

    # Checkpoint: plain tensors in the state dict, and a DCP round trip into a fresh sharded model.
    import torch.distributed.checkpoint as dcp

    sd = model.state_dict()
    local_types = {k: type(getattr(v, "_local_tensor", v)).__name__ for k, v in sd.items()}
    opt_state_types = {type(s["exp_avg"]._local_tensor).__name__ for s in opt.state.values()}
    dcp.save(sd, checkpoint_id=os.path.join(tmp, "ckpt"))
    torch.manual_seed(123)
    fresh = convert_to_float8_training(mlp(), config=dataclasses.replace(base, enable_fsdp_float8_all_gather=True))
    for layer in fresh:
        if isinstance(layer, Float8Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    fresh_sd = fresh.state_dict()
    dcp.load(fresh_sd, checkpoint_id=os.path.join(tmp, "ckpt"))
    fresh.load_state_dict(fresh_sd)
    ckpt_diff = max((p.full_tensor() - q.full_tensor()).abs().max().item()
                    for p, q in zip(model.parameters(), fresh.parameters()))
    scales = {
        n: getattr(m, "float8_scale_weight", torch.tensor(0.0)).clone()
        for n, m in model.named_modules()
        if isinstance(m, Float8Linear)
    }
    return dict(
        losses=losses, grad_diffs=grad_diffs, param_diffs=param_diffs, payload=payload,
        collective_inputs=collective_inputs, weights_seen=weights_seen, fwd_all_reduces=fwd_all_reduces,
        precompute_all_reduces=precompute_all_reduces, local_types=local_types, opt_state_types=opt_state_types,
        ckpt_diff=ckpt_diff, scales=scales,
    )


def _fsdp_tensorwise(rank, tmp):
    return _fsdp_worker(rank, tmp, "tensorwise")


def _fsdp_delayed(rank, tmp):
    return _fsdp_worker(rank, tmp, "delayed")


def _check_fp8_payload(r):
    # What fsdp_pre_all_gather hands FSDP: fp8 bytes as uint8, one byte per local weight element.
    assert r["payload"], "fsdp_pre_all_gather was never called"
    for dtype, numel, local_numel in r["payload"]:
        assert dtype == torch.uint8 and numel == local_numel
    # What the collective carried: uint8 of (weight bytes + 4 bytes per fp32 bias element) per rank.
    expected = {64 * 32 // WORLD + 4 * 64 // WORLD, 64 * 64 // WORLD + 4 * 64 // WORLD, 32 * 64 // WORLD + 4 * 32 // WORLD}
    assert r["collective_inputs"]
    assert {n for d, n in r["collective_inputs"]} == expected
    assert all(d == torch.uint8 for d, n in r["collective_inputs"])
    # The layers computed with the gathered fp8 weight.
    assert r["weights_seen"] and all(t is Float8TrainingTensor and d == torch.float8_e4m3fn for t, d in r["weights_seen"])
    # Plain tensors for the optimizer and checkpoints.
    assert set(r["local_types"].values()) == {"Tensor"}
    assert r["opt_state_types"] == {"Tensor"}
    assert r["ckpt_diff"] == 0.0


def test_fsdp_float8_all_gather_tensorwise_matches_single_process(tmp_path):
    r0, r1 = spawn(_fsdp_tensorwise, tmp_path)
    for r in (r0, r1):
        _check_fp8_payload(r)
        for loss, ref_loss in r["losses"]:
            assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert max(r["grad_diffs"]) < 1e-4, r["grad_diffs"]
        assert max(r["param_diffs"]) < 1e-5, r["param_diffs"]
        # precompute: one all-reduce for all weights; then forwards need no collective for scales.
        assert r["precompute_all_reduces"] == [1, 1, 1]
        assert r["fwd_all_reduces"][1:] == [0, 0]
    assert r0["losses"] == r1["losses"]


def test_fsdp_float8_all_gather_delayed(tmp_path):
    r0, r1 = spawn(_fsdp_delayed, tmp_path)
    for r in (r0, r1):
        _check_fp8_payload(r)
        for loss, ref_loss in r["losses"]:
            assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert max(r["grad_diffs"]) < 1e-4, r["grad_diffs"]
        assert r["precompute_all_reduces"] == [0, 0, 0]  # delayed weights use their synced scale
    for k in r0["scales"]:
        assert torch.equal(r0["scales"][k], r1["scales"][k])
