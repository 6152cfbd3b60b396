"""titan_fp8.parallel in one process: degrees, AC, reshard policy, FSDP groups, init and the data split.

FSDP structure and the sharded init run on a fake 2-rank process group (no communication): this process
plays one rank, which is all those checks need. Multi-process numerics are in test_distributed.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from titan_fp8.models import Transformer, llama3_flavors
from titan_fp8.parallel import (ParallelDims, ParallelismError, RowStreamLoader, apply_ac, apply_compile, apply_fsdp,
                                init_weights_like_unsharded, parse_ac_option, reshard_after_forward_flags)

ARGS = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=4, vocab_size=512, max_seq_len=64)


def meta_model(args=ARGS) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


# ----------------------------------------------------------------------------------------------------
# Degrees
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard,replicate,world,expected", [
    (-1, 1, 8, (1, 8)), (-1, 2, 8, (2, 4)), (4, 2, 8, (2, 4)), (1, 1, 1, (1, 1)), (-1, 1, 1, (1, 1)),
])
def test_parallel_dims_resolve(shard, replicate, world, expected):
    dims = ParallelDims.resolve(shard, replicate, world)
    assert (dims.dp_replicate, dims.dp_shard) == expected
    assert dims.dp_degree == world
    assert dims.fsdp_enabled == (world > 1)
    assert dims.hsdp == (expected[0] > 1)


@pytest.mark.parametrize("shard,replicate,world,match", [
    (4, 1, 8, r"data_parallel_shard_degree \(4\) x data_parallel_replicate_degree \(1\) = 4, but the world size is 8"),
    (-1, 3, 8, r"data_parallel_replicate_degree=3 does not divide the world size 8"),
    (0, 1, 2, r"data_parallel_shard_degree must be -1 \(all remaining ranks\) or >= 1, got 0"),
    (-1, 0, 2, r"data_parallel_replicate_degree must be >= 1, got 0"),
])
def test_parallel_dims_errors_name_the_keys(shard, replicate, world, match):
    with pytest.raises(ParallelismError, match=match) as e:
        ParallelDims.resolve(shard, replicate, world)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # train.py prints it as a one-line error, exit 2


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing and compile
# ----------------------------------------------------------------------------------------------------


def test_parse_ac_option():
    assert parse_ac_option("full", "op") == 1
    assert parse_ac_option("selective", "op") is None
    assert parse_ac_option("selective", "3") == 3
    for mode, option, match in (("selective", "0", "'op' or a positive integer"),
                                ("selective", "every", "'op' or a positive integer"),
                                ("partial", "op", "expected none, full or selective")):
        with pytest.raises(ValueError, match=match):
            parse_ac_option(mode, option)


def _wrapped(model) -> list[str]:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return [name for name, block in model.layers.items() if isinstance(block, CheckpointWrapper)]


@pytest.mark.parametrize("mode,option,expected", [
    ("none", "op", []), ("full", "op", ["0", "1", "2", "3"]), ("selective", "op", ["0", "1", "2", "3"]),
    ("selective", "2", ["1", "3"]), ("selective", "1", ["0", "1", "2", "3"]), ("selective", "4", ["3"]),
])
def test_apply_ac_wraps_every_nth_block(mode, option, expected):
    model = meta_model()
    apply_ac(model.layers, mode, option)
    assert _wrapped(model) == expected
    # The state dict keys are unchanged (checkpoints load with and without AC).
    assert list(model.state_dict()) == list(meta_model().state_dict())


@pytest.mark.parametrize("mode,option", [("full", "op"), ("selective", "op"), ("selective", "2")])
def test_ac_gives_the_same_loss_and_gradients(mode, option):
    args = dataclasses.replace(ARGS, n_layers=2)
    torch.manual_seed(0)
    plain = Transformer(args)
    plain.init_weights()
    checkpointed = Transformer(args)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.rope_cache = plain.rope_cache
    apply_ac(checkpointed.layers, mode, option)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    grads = []
    for model in (plain, checkpointed):
        model(tokens).float().pow(2).mean().backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_apply_compile_marks_every_block():
    model = meta_model()
    apply_ac(model.layers, "selective", "2")
    apply_compile(model.layers)
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in model.layers.values())


# ----------------------------------------------------------------------------------------------------
# FSDP2 (fake 2-rank process group)
# ----------------------------------------------------------------------------------------------------


def test_reshard_after_forward_policies():
    default = reshard_after_forward_flags("default", 3)
    assert default == {"tok_embeddings": True, "layers.0": True, "layers.1": True, "layers.2": False,
                       "norm+output": False, "root": False}
    assert all(reshard_after_forward_flags("always", 3).values())
    never = reshard_after_forward_flags("never", 3)
    assert not any(never.values())
    with pytest.raises(ValueError, match="fsdp_reshard_after_forward: expected one of default, always, never"):
        reshard_after_forward_flags("sometimes", 3)


@pytest.fixture
def fake_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    finally:
        dist.destroy_process_group()


def _group(module):
    return module._get_fsdp_state()._fsdp_param_group


@pytest.mark.parametrize("policy", ["default", "always", "never"])
def test_apply_fsdp_groups_mixed_precision_and_reshard(fake_mesh, policy):
    from torch.distributed.fsdp import FSDPModule

    model = meta_model()
    apply_ac(model.layers, "selective", "op")
    apply_fsdp(model, fake_mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
               reshard_after_forward=policy)
    sharded = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
    assert sharded == ["", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "output", "tok_embeddings"]
    # norm and output are ONE group (gathered together); the root group holds no parameters of its own.
    assert _group(model.norm) is _group(model.output)
    groups = {"tok_embeddings": model.tok_embeddings, "norm+output": model.norm,
              **{f"layers.{i}": model.layers[str(i)] for i in range(4)}}
    flags = reshard_after_forward_flags(policy, 4)
    for name, module in groups.items():
        group = _group(module)
        assert group.mp_policy.param_dtype == torch.bfloat16 and group.mp_policy.reduce_dtype == torch.float32
        assert (group.post_forward_mesh_info is not None) == flags[name], name
    # Parameters are DTensors sharded on dim 0 across the 2 ranks.
    w = model.layers["0"].attention.wq.weight
    assert tuple(w.shape) == (256, 256) and tuple(w.to_local().shape) == (128, 256)


def test_cpu_offload_on_cpu_is_a_clear_error(fake_mesh):
    with pytest.raises(ParallelismError, match="fsdp_cpu_offload needs CUDA"):
        apply_fsdp(meta_model(), fake_mesh, param_dtype=torch.float32, reduce_dtype=torch.float32, cpu_offload=True)


def _unsharded_init(args, seed=0):
    model = meta_model(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model, torch.get_rng_state()


@pytest.mark.parametrize("budget", [None, 600_000])  # one pass; several passes of a few parameters
def test_sharded_init_equals_the_unsharded_init(fake_mesh, budget):
    args = dataclasses.replace(ARGS, n_layers=1)
    ref, rng_after = _unsharded_init(args)
    model = meta_model(args)
    apply_fsdp(model, fake_mesh, param_dtype=torch.float32, reduce_dtype=torch.float32)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    passes = init_weights_like_unsharded(model, model.init_weights, budget_bytes=budget)
    assert passes == 1 if budget is None else passes >= 3
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        (coord,) = p.device_mesh.get_coordinate()
        assert torch.equal(p.to_local(), q.chunk(2)[coord]), name
    assert torch.equal(torch.get_rng_state(), rng_after)  # the generator ends where the unsharded init leaves it
    assert torch.equal(model.rope_cache, ref.rope_cache)


def test_plain_init_on_dtensor_shards_does_not_match(fake_mesh):
    """Why init_weights_like_unsharded exists: random init on the shards draws each shard from the start
    of the generator, so a rank's shard is not its slice of the unsharded weights."""
    args = dataclasses.replace(ARGS, n_layers=1)
    ref, _ = _unsharded_init(args)
    model = meta_model(args)
    apply_fsdp(model, fake_mesh, param_dtype=torch.float32, reduce_dtype=torch.float32)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.init_weights()
    w, q = model.layers["0"].attention.wq.weight, ref.layers["0"].attention.wq
    (coord,) = w.device_mesh.get_coordinate()
    assert not torch.equal(w.to_local(), q.weight.chunk(2)[coord])


def test_float8_all_gather_only_under_fsdp():
    from titan_fp8.config import load_config
    from titan_fp8.converters import build_converters

    cfg = load_config(["--float8.enable", "--float8.enable_fsdp_float8_all_gather"])
    assert build_converters(cfg, fsdp_enabled=True)[0].config.enable_fsdp_float8_all_gather
    assert not build_converters(cfg, fsdp_enabled=False)[0].config.enable_fsdp_float8_all_gather


# ----------------------------------------------------------------------------------------------------
# The data split
# ----------------------------------------------------------------------------------------------------


class CountingStream:
    """Stream j of B yields rows [j, step] (T = 2); stateful like the real per-row loaders."""

    def __init__(self, j: int, rows: int):
        self.j, self.rows, self.pos = j, rows, 0

    def __iter__(self):
        while True:
            self.pos += 1
            x = torch.tensor([[self.j, self.pos]])
            yield x, x + 1000

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _steps(global_batch, local_batch, dp_degree, n_steps=2, state=None):
    """{step: {rank: [micro-batch input tensors]}} and each rank's state after n_steps."""
    out, states = {}, {}
    for rank in range(dp_degree):
        loader = RowStreamLoader(CountingStream, global_batch=global_batch, local_batch=local_batch, dp_rank=rank,
                                 dp_degree=dp_degree)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        for step in range(n_steps):
            out.setdefault(step, {})[rank] = [next(it)[0] for _ in range(loader.accum)]
        states.update(loader.state_dict())
    return out, states


def test_row_streams_give_the_same_global_batch_for_any_rank_count():
    one, one_state = _steps(8, 8, 1)
    accum, _ = _steps(8, 4, 1)
    two, two_state = _steps(8, 4, 2)
    four, _ = _steps(8, 1, 4)
    for step in range(2):
        rows = torch.cat(one[step][0])
        assert rows[:, 0].tolist() == list(range(8)) and rows[:, 1].tolist() == [step + 1] * 8
        # 2 ranks x 4 rows: rank r's batch is micro-batch r of the 1-rank accumulation run.
        assert torch.equal(two[step][0][0], accum[step][0][0]) and torch.equal(two[step][1][0], accum[step][0][1])
        assert torch.equal(torch.cat([b for r in range(4) for b in four[step][r]]).sort(0).values, rows)
    # State is per row: any split of the same global batch resumes any other.
    assert sorted(one_state) == sorted(two_state) == [f"row_{j}" for j in range(8)]
    resumed, _ = _steps(8, 4, 2, n_steps=1, state=one_state)
    assert resumed[0][1][0][:, 1].tolist() == [3] * 4  # continues at the third window of each stream


def test_row_streams_reject_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="global batch 8 is not a multiple of local batch 3 x data-parallel degree 2"):
        RowStreamLoader(CountingStream, global_batch=8, local_batch=3, dp_rank=0, dp_degree=2)
