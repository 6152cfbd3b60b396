"""Two gloo ranks on CPU, through torchrun: FSDP2 (+ compile + AC) reproduces a 1-rank run, the fp8 all-gather
carries fp8 bytes, checkpoints reshard 2 -> 1 and 1 -> 2, the CLI works, and SIGUSR1 checkpoints and exits.

One torchrun launch (`two_rank` fixture) runs every 2-rank training job in sequence, so the process start,
tokenizer load and compilation are paid once; the tests then compare its metrics with 1-rank runs made in
this process. This file is also the worker that launch runs (`__main__` below).

Tolerances (relative, per step loss; 1-rank reference = eager, same global batch of 8 as 2 micro-batches
of 4 so float8 activation scales are computed over the same rows):
  float32 params, float8 recipes (tensorwise + fp8 all-gather, rowwise, delayed): 2e-5 — what remains is
    fp32 summation order (reduce-scatter vs accumulation) and compiled vs eager elementwise kernels;
  bfloat16 params: 2e-3 (measured 1.5e-4) — FSDP's bf16 parameters vs 1-rank autocast differ in where bf16
    rounding happens, not in what is computed;
  resharded resume, next-step loss: 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--model.n_layers", "2", "--training.seq_len", "64", "--training.steps", "3",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--training.deterministic",
        "--metrics.no_enable_tensorboard", "--validation.no_enable", "--checkpoint.no_last_save_model_only"]
BATCH_2 = ["--training.local_batch_size", "4", "--training.global_batch_size", "8"]  # 2 ranks x 4
ACCUM_1 = ["--training.local_batch_size", "4", "--training.global_batch_size", "8"]  # 1 rank, 2 x 4
FP8_AG = ["--float8.enable_fsdp_float8_all_gather", "--float8.precompute_float8_dynamic_scale_for_fsdp"]

# name -> (extra args, relative tolerance vs the 1-rank reference)
RECIPES = {
    "bf16": (["--training.mixed_precision_param", "bfloat16", "--activation_checkpoint.mode", "full"], 2e-3),
    "tensorwise": (["--float8.enable", "--float8.recipe_name", "tensorwise", *FP8_AG,
                    "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
                    "op"], 2e-5),
    "rowwise": (["--float8.enable", "--float8.recipe_name", "rowwise", "--activation_checkpoint.mode",
                 "selective", "--activation_checkpoint.selective_ac_option", "2"], 2e-5),
    # FP8_AG's precompute: delayed weights are cast in one batched pass with the scales the amax sync computed.
    "delayed": (["--float8.enable", "--float8.recipe_name", "delayed", *FP8_AG,
                 "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
                 "op"], 2e-5),
    # QAT with learned scales: each rank initialises its own rows of the sharded scales (no collective).
    "qat_range_learning": (["--qat.enable", "--qat.range_learning", "--qat.start_step", "2",
                            "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
                            "op"], 2e-5),
    # ... started from one calibration forward's input statistics (each rank's first micro-batch), summed over
    # the ranks (an all-reduce); its 1-rank reference sees the same 8 sequences as one micro-batch (ONE_RANK_BATCH).
    "qat_activation_mse": (["--qat.enable", "--qat.range_learning", "--qat.scale_init", "activation_mse",
                            "--qat.start_step", "2", "--activation_checkpoint.mode", "selective",
                            "--activation_checkpoint.selective_ac_option", "op"], 2e-5),
}
ONE_RANK_BATCH = {"qat_activation_mse": ["--training.local_batch_size", "8"]}
HSDP = ["--parallelism.data_parallel_replicate_degree", "2", "--float8.enable", "--float8.recipe_name", "delayed",
        "--float8.enable_fsdp_float8_all_gather"]
# HSDP with tensorwise: the precompute all-reduces the weights' amaxes over the shard dimension of the 2-D mesh.
HSDP_TENSORWISE = ["--parallelism.data_parallel_replicate_degree", "2", "--float8.enable", "--float8.recipe_name",
                   "tensorwise", *FP8_AG]
RESHARD = ["--float8.enable", "--float8.recipe_name", "tensorwise", *FP8_AG, "--training.steps", "4",
           "--checkpoint.enable", "--checkpoint.interval", "3", "--lr_scheduler.decay_ratio", "0"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def _config(dump, *extra) -> list[str]:
    return ["--config", os.path.join(REPO, "configs", "debug.toml"), "--job.dump_folder", str(dump), *TINY, *extra]


def losses(dump) -> dict[int, float]:
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def run_one_rank(dump, *extra):
    import torch

    from titan_fp8.config import load_config
    from titan_fp8.trainer import Trainer

    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks; OpenMP spinning on 2 shared cores is slow
    try:
        trainer = Trainer(load_config(_config(dump, *extra)))
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return trainer


def torchrun(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _tail(proc) -> str:
    return (proc.stdout + proc.stderr)[-4000:]


# ----------------------------------------------------------------------------------------------------
# The 2-rank launch and its 1-rank references
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # 1-rank run first: its step-3 checkpoint is what the 2-rank launch resumes from (1 -> 2).
    run_one_rank(root / "one_save", *ACCUM_1, *RESHARD)
    shutil.copytree(root / "one_save" / "checkpoint", root / "from_one" / "checkpoint",
                    ignore=shutil.ignore_patterns("step-4*"))
    jobs = [{"name": name, "argv": _config(root / name, *BATCH_2, "--compile.enable", *extra)}
            for name, (extra, _) in RECIPES.items()]
    jobs[1]["record_all_gather"] = True  # tensorwise + fp8 all-gather
    jobs.append({"name": "hsdp", "argv": _config(root / "hsdp", *BATCH_2, *HSDP)})
    jobs.append({"name": "hsdp_tensorwise", "argv": _config(root / "hsdp_tensorwise", *BATCH_2, *HSDP_TENSORWISE)})
    jobs.append({"name": "two_save", "argv": _config(root / "two_save", *BATCH_2, *RESHARD)})
    jobs.append({"name": "from_one", "argv": _config(root / "from_one", *BATCH_2, *RESHARD)})
    spec = root / "jobs.json"
    spec.write_text(json.dumps(jobs))
    proc = torchrun([__file__, str(spec)], timeout=900)
    assert proc.returncode == 0, _tail(proc)
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_two_ranks_match_one_rank(two_rank, tmp_path, recipe):
    root, results = two_rank
    extra, rel = RECIPES[recipe]
    run_one_rank(tmp_path, *ACCUM_1, *extra, *ONE_RANK_BATCH.get(recipe, []))
    one, two = losses(tmp_path), losses(root / recipe)
    assert sorted(two) == [1, 2, 3]
    worst = max(abs(two[s] - one[s]) / abs(one[s]) for s in one)
    print(f"{recipe}: 2-rank FSDP+compile+AC vs 1-rank: max relative loss difference {worst:.2e} (tolerance {rel:g})")
    assert worst <= rel, (one, two)
    # FSDP groups: embedding, each block, norm + output (one group of two modules), the root.
    assert results[recipe]["fsdp_modules"] == ["layers.0", "layers.1", "norm", "output", "tok_embeddings"]
    assert results[recipe]["root_is_fsdp"]
    assert results[recipe]["compiled_blocks"] == 2
    # With FP8_AG's precompute every block Linear (2 layers x 7) ends with its shard's batched fp8 cast.
    assert results[recipe]["precomputed_casts"] == (14 if FP8_AG[1] in extra else 0), results[recipe]


@pytest.mark.slow
@pytest.mark.parametrize("job, argv", [("hsdp", HSDP), ("hsdp_tensorwise", HSDP_TENSORWISE)])
def test_hsdp_matches_one_rank(two_rank, tmp_path, job, argv):
    root, results = two_rank
    run_one_rank(tmp_path, *ACCUM_1, *argv[2:])
    one, two = losses(tmp_path), losses(root / job)
    worst = max(abs(two[s] - one[s]) / abs(one[s]) for s in one)
    print(f"HSDP (replicate 2 x shard 1), {job} + fp8 all-gather vs 1-rank: max relative loss difference {worst:.2e}")
    assert sorted(two) == [1, 2, 3] and worst <= 2e-5, (one, two)
    if job == "hsdp_tensorwise":  # the precompute ran on the 2-D mesh: every block Linear's shard was cast
        assert results[job]["precomputed_casts"] == 2 * 7, results[job]


@pytest.mark.slow
def test_fp8_all_gather_sends_fp8_bytes(two_rank):
    _, results = two_rank
    r = results["tensorwise"]
    # One transformer block: 7 fp8 Linear weights (1 byte per element) and 2 RMSNorm weights (fp32, not fp8).
    dim, hidden, kv = 256, 768, 128
    linear = 2 * dim * dim + 2 * kv * dim + 3 * dim * hidden
    norms = 2 * dim
    fp8_bytes_per_rank = (linear + 4 * norms) // 2
    hp_numel_per_rank = (linear + norms) // 2
    gathers = [tuple(g) for g in r["all_gathers"]]
    block_gathers = [g for g in gathers if g[1] in (fp8_bytes_per_rank, hp_numel_per_rank)]
    assert block_gathers, gathers
    # Every block all-gather is the fp8 payload viewed as uint8; none carries the fp32 (or bf16) weights.
    assert set(block_gathers) == {("torch.uint8", fp8_bytes_per_rank)}, gathers
    assert len(block_gathers) >= 2 * 3  # 2 blocks x 3 steps (+ re-gathers in backward)
    # The non-fp8 groups (embedding, norm + output) are gathered in the parameter dtype.
    assert ("torch.float32", 4096 * dim // 2) in gathers


@pytest.mark.slow
def test_reshard_two_to_one_resumes_with_same_next_step_loss(two_rank, tmp_path):
    root, _ = two_rank
    shutil.copytree(root / "two_save" / "checkpoint", tmp_path / "checkpoint", ignore=shutil.ignore_patterns("step-4*"))
    with open(root / "two_save" / "checkpoint" / "step-3" / "manifest.json") as f:
        assert json.load(f)["world_size"] == 2
    trainer = run_one_rank(tmp_path, *ACCUM_1, *RESHARD)
    assert trainer.train_state.step == 4
    resumed, reference = losses(tmp_path), losses(root / "two_save")
    assert sorted(resumed) == [4]  # steps 1-3 came from the checkpoint
    print(f"2 -> 1: step 4 loss {resumed[4]:.7f} vs {reference[4]:.7f} on 2 ranks")
    assert resumed[4] == pytest.approx(reference[4], rel=1e-5)


@pytest.mark.slow
def test_reshard_one_to_two_resumes_with_same_next_step_loss(two_rank):
    root, _ = two_rank
    resumed, reference = losses(root / "from_one"), losses(root / "one_save")
    assert sorted(resumed) == [4]
    print(f"1 -> 2: step 4 loss {resumed[4]:.7f} vs {reference[4]:.7f} on 1 rank")
    assert resumed[4] == pytest.approx(reference[4], rel=1e-5)


def test_changing_the_global_batch_on_resume_is_a_one_line_error(tmp_path):
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "1", "--training.steps", "1"]
    run_one_rank(tmp_path, "--training.local_batch_size", "4", *ckpt)
    from titan_fp8.config import ConfigError

    with pytest.raises(ConfigError, match=r"global_batch_size.*global batch of 4 sequences, this run has 8"):
        run_one_rank(tmp_path, "--training.local_batch_size", "8", *ckpt[:-1], "2")


# ----------------------------------------------------------------------------------------------------
# The command line, and preemption
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_two_ranks_float8_fp8_all_gather(tmp_path):
    proc = torchrun(["train.py", "--config", "configs/debug.toml", "--float8.enable", "--float8.recipe_name",
                     "tensorwise", "--float8.enable_fsdp_float8_all_gather",
                     # few steps, out of the repo, quiet
                     "--training.steps", "3", "--metrics.log_freq", "1", "--validation.steps", "2",
                     "--job.dump_folder", str(tmp_path), "--metrics.no_enable_tensorboard"], timeout=300)
    assert proc.returncode == 0, _tail(proc)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_loss" in r] == [3]
    assert "world size 2" in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fake_slurm(bin_dir) -> None:
    """srun / scontrol stand-ins: one node (this machine); srun runs its command in place, so signals sent
    to it reach torchrun as SLURM's srun forwards them; `scontrol requeue` leaves a marker file."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'export SLURM_NODEID=0 SLURM_PROCID=0\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\ncase "$1" in\n  show) echo localhost ;;\n'
                                      '  requeue) echo "$2" > "$REQUEUE_MARKER" ;;\nesac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.mark.slow
def test_slurm_sigusr1_checkpoints_on_two_ranks_requeues_and_resumes(tmp_path):
    """scripts/multinode.slurm as SLURM runs it (stubbed srun/scontrol, one node with 2 CPU ranks): SIGUSR1 to
    the batch script -> srun -> torchrun -> both ranks finish the step, checkpoint together, exit 0; the
    script requeues; the requeued run (here through scripts/run_train.sh) resumes from that checkpoint."""
    _fake_slurm(tmp_path / "bin")
    dump, logs = tmp_path / "out", tmp_path / "logs"
    train_args = ["--job.dump_folder", str(dump), "--model.n_layers", "2", "--training.seq_len", "64",
                  "--training.local_batch_size", "4", "--metrics.log_freq", "1", "--metrics.no_enable_tensorboard",
                  "--validation.no_enable", "--checkpoint.enable", "--checkpoint.interval", "1000",
                  "--checkpoint.no_last_save_model_only"]
    env = dict(_env(), PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="titan", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2",
               CONFIG_FILE="configs/debug.toml", LOG_DIR=str(logs), MASTER_PORT=str(_free_port()),
               REQUEUE_MARKER=str(tmp_path / "requeued"))
    proc = subprocess.Popen(["bash", "scripts/multinode.slurm", *train_args, "--training.steps", "400"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = dump / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` does
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    steps = sorted(int(n[5:]) for n in os.listdir(dump / "checkpoint") if n.startswith("step-"))
    assert len(steps) == 1 and 2 <= steps[0] < 400, (steps, out[-4000:])
    step = steps[0]
    assert f"stop signal received: checkpointed step {step}, exiting" in out, out[-4000:]
    assert (tmp_path / "requeued").read_text().strip() == "4242"
    # One log per rank under logs/node0/<run id>/attempt_0/<local rank>/.
    rank_logs = sorted(str(p.relative_to(logs)).split(os.sep)[-2] for p in logs.rglob("stderr.log"))
    assert rank_logs == ["0", "1"], list(logs.rglob("*"))
    for p in logs.rglob("stderr.log"):
        assert "received SIGUSR1" in p.read_text()

    resumed = subprocess.run(["bash", "scripts/run_train.sh", *train_args, "--training.steps", str(step + 1)],
                             cwd=REPO, env=dict(_env(), NGPU="2"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, _tail(resumed)
    assert f"resuming at step {step}" in resumed.stdout + resumed.stderr
    assert max(losses(dump)) == step + 1


# ----------------------------------------------------------------------------------------------------
# Worker (run by torchrun): every job of the spec in turn, in one process group
# ----------------------------------------------------------------------------------------------------


def _worker(spec_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from titan_fp8.config import load_config
    from titan_fp8.trainer import Trainer

    jobs = json.load(open(spec_path))
    results = {}
    for job in jobs:
        torch._dynamo.reset()
        gathers: list[tuple[str, int]] = []
        patched = {}
        if job.get("record_all_gather"):
            for name in ("all_gather_single", "all_gather_into_tensor"):
                if hasattr(dist, name):
                    real = patched[name] = getattr(dist, name)

                    def recording(out, inp, *args, _real=real, **kwargs):
                        gathers.append((str(inp.dtype), inp.numel()))
                        return _real(out, inp, *args, **kwargs)

                    setattr(dist, name, recording)
        try:
            trainer = Trainer(load_config(job["argv"]))
            trainer.train()
        finally:
            for name, real in patched.items():
                setattr(dist, name, real)
        model = trainer.model
        results[job["name"]] = {
            "fsdp_modules": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule) and m is not model),
            "root_is_fsdp": isinstance(model, FSDPModule),
            "compiled_blocks": sum(getattr(b, "_compiled_call_impl", None) is not None
                                   for b in model.layers.values()),
            "all_gathers": gathers,
            # Float8Linear weights whose shard holds the fp8 cast the precompute made after the last step.
            "precomputed_casts": sum(
                getattr(p._local_tensor, "_valid_precomputed", lambda: None)() is not None
                and p._local_tensor._precomputed.data is not None
                for n, p in model.named_parameters() if hasattr(p, "_local_tensor")),
        }
        dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(os.path.dirname(spec_path), "results.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    import logging

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK") == "0" else logging.WARNING,
                        format=f"[r{os.environ.get('RANK')}] %(levelname)s %(message)s")
    _worker(sys.argv[1])
