"""Reliability: atomic checkpoints, corrupted-checkpoint fallback, async saves, kill -9 crash-resume
exactness, preemption signals, and numerical guards (non-finite policy, delayed-scaling history).

Subprocess tests run the real `train.py` on the tiny model (2 layers, seq_len 64, batch 4). Everything runs
on one intra-op thread (in-process and in subprocesses alike, so their numbers can be compared bit for bit):
on 2 shared cores, oversubscribed OpenMP threads make the tiny model 5-10x slower."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from titan_fp8.checkpoint import MANIFEST, CheckpointError, CheckpointManager, ModelState, file_crc32
from titan_fp8.config import load_config
from titan_fp8.trainer import NonFiniteError, Trainer

TINY = ["--model.n_layers", "2", "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0", "--metrics.log_freq", "1",
        "--training.deterministic", "--metrics.no_enable_tensorboard", "--validation.no_enable"]
CKPT = ["--checkpoint.enable", "--checkpoint.no_last_save_model_only", "--checkpoint.keep_latest_k", "0"]
DELAYED = ["--float8.enable", "--float8.recipe_name", "delayed"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def argv_for(repo_root, dump, *extra):
    return ["--config", os.path.join(repo_root, "configs", "debug.toml"), "--job.dump_folder", str(dump),
            *TINY, *extra]


def run_inproc(repo_root, dump, *extra):
    trainer = Trainer(load_config(argv_for(repo_root, dump, *extra)))
    trainer.train()
    return trainer


def records(dump):
    path = os.path.join(dump, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_losses(dump):
    """step -> loss, the last record of each step winning (a resumed run logs some steps twice)."""
    return {r["step"]: r["loss"] for r in records(dump) if "loss" in r}


def spawn(repo_root, dump, *extra):
    cmd = [sys.executable, os.path.join(repo_root, "train.py"), *argv_for(repo_root, dump, *extra)]
    return subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def wait_for_step(proc, dump, step, timeout=120):
    """Poll metrics.jsonl until `step` is logged (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in records(dump)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


# ----------------------------------------------------------------------------------------------------
# Atomic checkpoints and the loader's fallback (tiny modules: fast)
# ----------------------------------------------------------------------------------------------------


def make_state(value: float, out_features: int = 16):
    model = nn.Linear(16, out_features)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model, {"model": ModelState(model)}


def manager(folder, **kw):
    kw.setdefault("metadata", {"config_hash": "abc123", "model_args": {"dim": 16}})
    return CheckpointManager(str(folder), interval=1, keep_latest_k=0, **kw)


def saved_steps(folder, *values, **kw):
    mgr = manager(folder, **kw)
    for step, value in enumerate(values, start=1):
        mgr.save(step, make_state(value)[1])
    mgr.close()
    return mgr


def loaded_value(folder, **kw):
    model, state = make_state(0.0)
    step = manager(folder, **kw).load(state)
    return step, float(model.weight[0, 0].detach())


def test_save_writes_manifest_and_leaves_no_partial(tmp_path):
    saved_steps(tmp_path, 1.0)
    assert sorted(os.listdir(tmp_path)) == ["step-1"]
    with open(tmp_path / "step-1" / MANIFEST) as f:
        manifest = json.load(f)
    assert manifest["step"] == 1 and manifest["config_hash"] == "abc123"
    assert manifest["torch"] == torch.__version__ and manifest["titan_fp8"].startswith("0.")
    names = sorted(n for n in os.listdir(tmp_path / "step-1") if n != MANIFEST)
    assert sorted(manifest["files"]) == names and ".metadata" in names
    for name, info in manifest["files"].items():
        assert info["size"] == os.path.getsize(tmp_path / "step-1" / name)
        assert info["crc32"] == file_crc32(str(tmp_path / "step-1" / name))


def _truncate(d):
    shard = next(n for n in os.listdir(d) if n.endswith(".distcp"))
    with open(d / shard, "r+b") as f:
        f.truncate(os.path.getsize(d / shard) // 2)


def _flip_byte(d):
    shard = next(n for n in os.listdir(d) if n.endswith(".distcp"))
    with open(d / shard, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))


def _remove_shard(d):
    os.remove(d / next(n for n in os.listdir(d) if n.endswith(".distcp")))


def _edit_manifest(fn):
    def edit(d):
        with open(d / MANIFEST) as f:
            m = json.load(f)
        fn(m)
        with open(d / MANIFEST, "w") as f:
            json.dump(m, f)
    return edit


def _garbage_manifest(d):
    (d / MANIFEST).write_bytes(b'{"step": 2, "files": {')


def _remove_manifest(d):
    os.remove(d / MANIFEST)


CORRUPTIONS = [
    ("truncated shard", _truncate, "is truncated"),
    ("flipped byte", _flip_byte, "is corrupted: crc32"),
    ("missing shard", _remove_shard, "missing file __0_0.distcp"),
    ("missing dcp metadata", lambda d: os.remove(d / ".metadata"), "missing file .metadata"),
    ("manifest not json", _garbage_manifest, "manifest.json is not valid JSON"),
    ("manifest wrong step", _edit_manifest(lambda m: m.update(step=7)), "says step 7"),
    ("manifest without files", _edit_manifest(lambda m: m.pop("files")), "has no 'files' table"),
    ("manifest newer format", _edit_manifest(lambda m: m.update(format=99)), "format 99"),
    ("manifest missing (never completed)", _remove_manifest, "no manifest.json"),
]


@pytest.mark.parametrize("name,corrupt,reason", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_newest_checkpoint_falls_back_to_previous(tmp_path, caplog, name, corrupt, reason):
    saved_steps(tmp_path, 1.0, 2.0)
    corrupt(tmp_path / "step-2")
    with caplog.at_level(logging.WARNING, logger="titan_fp8.checkpoint"):
        step, value = loaded_value(tmp_path)
    assert (step, value) == (1, 1.0)
    assert str(tmp_path / "step-2") in caplog.text and reason in caplog.text
    assert os.path.isdir(tmp_path / "step-2")  # reported, never deleted by the loader


def test_partial_save_is_never_loaded_and_is_cleaned_by_the_next_save(tmp_path):
    saved_steps(tmp_path, 1.0, 2.0)
    os.rename(tmp_path / "step-2", tmp_path / ".step-3.partial")  # looks complete inside, but never renamed
    assert loaded_value(tmp_path) == (1, 1.0)
    manager(tmp_path).save(4, make_state(4.0)[1])
    assert sorted(os.listdir(tmp_path)) == ["step-1", "step-4"]


def test_every_checkpoint_bad_is_one_line_error_naming_each(tmp_path):
    saved_steps(tmp_path, 1.0, 2.0)
    _truncate(tmp_path / "step-1")
    _flip_byte(tmp_path / "step-2")
    with pytest.raises(CheckpointError) as e:
        loaded_value(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "no usable checkpoint" in msg
    assert "step-2: __0_0.distcp is corrupted" in msg and "step-1: __0_0.distcp is truncated" in msg


def test_explicit_load_step_that_is_corrupted_is_an_error(tmp_path):
    saved_steps(tmp_path, 1.0, 2.0)
    _truncate(tmp_path / "step-1")
    model, state = make_state(0.0)
    with pytest.raises(CheckpointError, match=r"step-1: unusable checkpoint: __0_0.distcp is truncated"):
        manager(tmp_path).load(state, step=1)


def test_different_shape_is_refused_naming_folder_and_key_and_nothing_changes(tmp_path):
    saved_steps(tmp_path, 1.0)
    before = {n: (tmp_path / "step-1" / n).read_bytes() for n in os.listdir(tmp_path / "step-1")}
    model, state = make_state(0.0, out_features=32)
    mgr = manager(tmp_path, metadata={"model_args": {"dim": 32}})
    with pytest.raises(CheckpointError) as e:
        mgr.load(state)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "step-1")) and "'weight' has shape (16, 16) in the checkpoint, (32, 16)" in msg
    assert "model args differ, checkpoint vs this run: dim 16 vs 32" in msg
    assert {n: (tmp_path / "step-1" / n).read_bytes() for n in os.listdir(tmp_path / "step-1")} == before
    assert float(model.weight[0, 0].detach()) == 0.0  # nothing was loaded


def test_resaving_a_step_replaces_it_whole(tmp_path):
    saved_steps(tmp_path, 1.0)
    saved_steps(tmp_path, 5.0)  # the same step 1, new content
    assert loaded_value(tmp_path) == (1, 5.0)
    assert sorted(os.listdir(tmp_path)) == ["step-1"]


def test_async_save_snapshots_state_and_is_invisible_until_sealed(tmp_path):
    mgr = manager(tmp_path, async_mode="async")
    model, state = make_state(1.0)
    mgr.save(1, state)
    with torch.no_grad():
        model.weight.fill_(9.0)  # training goes on while the save is written
    assert mgr.complete_steps() == []  # a crash now resumes from the previous checkpoint, never a partial
    mgr.close()
    assert mgr.complete_steps() == [1] and loaded_value(tmp_path) == (1, 1.0)
    with open(tmp_path / "step-1" / MANIFEST) as f:
        assert json.load(f)["files"]["__0_0.distcp"]["crc32"] == file_crc32(str(tmp_path / "step-1" / "__0_0.distcp"))


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from torch import nn
import titan_fp8.checkpoint as ck
import torch.distributed.checkpoint as dcp

def state(v):
    m = nn.Linear(16, 16)
    with torch.no_grad():
        m.weight.fill_(v)
    return {{"model": ck.ModelState(m)}}

mgr = ck.CheckpointManager({folder!r}, interval=1, keep_latest_k=0, async_mode={mode!r})
mgr.save(1, state(1.0)); mgr.wait()
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
point = {point!r}
if point == "after_shards":       # DCP wrote every file, nothing sealed yet
    ck.CheckpointManager._seal_local = staticmethod(die)
elif point == "before_rename":    # manifest written and fsynced, folder not yet renamed
    real_replace = os.replace
    ck.os.replace = lambda a, b: die() if a.endswith(".partial") else real_replace(a, b)
mgr.save(2, state(2.0)); mgr.wait()
"""


@pytest.mark.parametrize("point,mode", [("after_shards", "disabled"), ("before_rename", "disabled"),
                                        ("after_shards", "async")])
def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, repo_root, point, mode):
    script = KILL_SCRIPT.format(repo=repo_root, folder=str(tmp_path), point=point, mode=mode)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(os.listdir(tmp_path)) == [".step-2.partial", "step-1"]
    assert loaded_value(tmp_path) == (1, 1.0)


# ----------------------------------------------------------------------------------------------------
# Crash-resume exactness: kill -9 the real train.py, rerun the same command
# ----------------------------------------------------------------------------------------------------


STEPS = 8
CRASHES = [  # id, flags that change the numbers, flags that do not, kill once this step is logged, oldest resume
    ("fp32", [], [], 4, 2),
    ("float8_delayed", DELAYED, [], 3, 2),
    # The save of step 2 may still be in flight when step 4 is logged: it may resume from scratch (step 0).
    ("fp32_async", [], ["--checkpoint.async_mode", "async"], 4, 0),
]


@pytest.fixture(scope="module")
def uninterrupted(repo_root, tmp_path_factory):
    """Loss per step of an uninterrupted in-process run, per set of numerics-changing flags (cached)."""
    cache = {}

    def get(flags):
        key = tuple(flags)
        if key not in cache:
            dump = tmp_path_factory.mktemp("uninterrupted")
            run_inproc(repo_root, dump, "--training.steps", str(STEPS), *flags)
            cache[key] = last_losses(dump)
        return cache[key]
    return get


@pytest.mark.parametrize("recipe,flags,save_flags,kill_after,min_resume", CRASHES, ids=[c[0] for c in CRASHES])
def test_kill_9_then_same_command_resumes_bit_for_bit(tmp_path, repo_root, uninterrupted, recipe, flags, save_flags,
                                                      kill_after, min_resume):
    extra = ["--training.steps", str(STEPS), *CKPT, "--checkpoint.interval", "2", *flags, *save_flags]
    reference = uninterrupted(flags)

    dump = tmp_path / "crash"
    proc = spawn(repo_root, dump, *extra)
    wait_for_step(proc, dump, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = last_losses(dump)
    assert max(before) < STEPS, "the run finished before it was killed"

    proc = spawn(repo_root, dump, *extra)  # the same command
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    resumed = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "resuming at step" in line]
    resume_step = resumed[0] if resumed else 0
    assert len(resumed) <= 1 and resume_step >= min_resume and resume_step % 2 == 0  # newest complete one
    after = last_losses(dump)
    assert sorted(after) == list(range(1, STEPS + 1))
    assert [after[s] for s in after] == [reference[s] for s in after]  # bit for bit
    if recipe == "float8_delayed" and resume_step:  # the amax histories are in the checkpoint the run resumed from
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(dump / "checkpoint" / f"step-{resume_step}")).read_metadata().state_dict_metadata
        assert any(k.startswith("model.") and "float8_amax_history_input" in k for k in keys)


# ----------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGUSR1 -> checkpoint after the current step, exit 0
# ----------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_after_the_current_step_and_exits_0(tmp_path, repo_root):
    extra = ["--training.steps", "100000", *CKPT, "--checkpoint.interval", "100000"]
    dump = tmp_path / "run"
    proc = spawn(repo_root, dump, *extra)
    wait_for_step(proc, dump, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    last = max(last_losses(dump))
    assert os.listdir(dump / "checkpoint") == [f"step-{last}"]
    # and the job picks up exactly there
    trainer = run_inproc(repo_root, dump, "--training.steps", str(last + 1), *CKPT, "--checkpoint.interval", "100000")
    assert trainer.train_state.step == last + 1
    assert [r["step"] for r in records(dump)][-1] == last + 1


def test_sigusr1_with_async_checkpointing(tmp_path, repo_root, monkeypatch):
    real_step = Trainer.train_step

    def step_and_signal(self, data_iter):
        out = real_step(self, data_iter)
        if self.train_state.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_and_signal)
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = run_inproc(repo_root, tmp_path, "--training.steps", "50", *CKPT, "--checkpoint.interval", "2",
                         "--checkpoint.async_mode", "async")
    assert trainer.train_state.step == 3
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-2", "step-3"]
    assert trainer.checkpointer.verify(3) is None
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored when train() returns


# ----------------------------------------------------------------------------------------------------
# Numerical guards
# ----------------------------------------------------------------------------------------------------

POISONED = "layers.1.feed_forward.w2.weight"


def poison_grad_at(monkeypatch, step: int, value=float("nan")):
    """Make the gradient of POISONED non-finite at `step` (a hook on the parameter)."""
    real_step = Trainer.train_step

    def train_step(self, data_iter):
        if self.train_state.step == step:
            param = dict(self.model.named_parameters())[POISONED]
            handle = param.register_hook(lambda g: g * value)
            try:
                return real_step(self, data_iter)
            finally:
                handle.remove()
        return real_step(self, data_iter)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_nonfinite_grad_error_names_step_and_first_parameter(tmp_path, repo_root, monkeypatch):
    poison_grad_at(monkeypatch, 3)
    with pytest.raises(NonFiniteError) as e:
        run_inproc(repo_root, tmp_path, "--training.steps", "5")
    assert str(e.value).startswith(f"step 3: grad norm nan, first non-finite gradient in {POISONED}")
    assert max(last_losses(tmp_path)) == 2


def count_steps(monkeypatch) -> list:
    """Record the step of every train_step call (wraps whatever train_step is patched in already)."""
    seen, inner = [], Trainer.train_step

    def train_step(self, data_iter):
        seen.append(self.train_state.step)
        return inner(self, data_iter)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return seen


def test_error_policy_checks_a_step_without_waiting_for_it(tmp_path, repo_root, monkeypatch):
    # Not a log step: the check of step 3 runs after step 4 was issued, so no step waits for the device.
    poison_grad_at(monkeypatch, 3)
    seen = count_steps(monkeypatch)
    with pytest.raises(NonFiniteError) as e:
        run_inproc(repo_root, tmp_path, "--training.steps", "8", "--metrics.log_freq", "100")
    assert str(e.value).startswith(f"step 3: grad norm nan, first non-finite gradient in {POISONED}")
    assert seen == [1, 2, 3, 4]


def test_error_policy_never_checkpoints_a_nonfinite_step(tmp_path, repo_root, monkeypatch):
    poison_grad_at(monkeypatch, 3)
    seen = count_steps(monkeypatch)
    with pytest.raises(NonFiniteError, match=r"^step 3: grad norm nan"):
        run_inproc(repo_root, tmp_path, "--training.steps", "8", "--metrics.log_freq", "100", *CKPT,
                   "--checkpoint.interval", "3")
    assert seen == [1, 2, 3]  # the save at step 3 waits for the check first
    assert not (tmp_path / "checkpoint").exists() or os.listdir(tmp_path / "checkpoint") == []


def test_nonfinite_loss_error_names_the_loss(tmp_path, repo_root, monkeypatch):
    import titan_fp8.loss as loss_mod

    real_loss = loss_mod.linear_cross_entropy  # the output head computes the training loss with it
    monkeypatch.setattr(loss_mod, "linear_cross_entropy", lambda *a, **k: real_loss(*a, **k) * float("inf"))
    with pytest.raises(NonFiniteError, match=r"^step 1: non-finite loss (inf|nan), first non-finite gradient in tok_embeddings"):
        run_inproc(repo_root, tmp_path, "--training.steps", "2")


@pytest.mark.parametrize("recipe", ["fp32", "float8_delayed"])
def test_skip_step_leaves_weights_and_counts(tmp_path, repo_root, monkeypatch, recipe):
    poison_grad_at(monkeypatch, 3, value=float("inf"))
    snapshots = {}
    real_step = Trainer.train_step

    def train_step(self, data_iter):
        out = real_step(self, data_iter)
        snapshots[self.train_state.step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    trainer = run_inproc(repo_root, tmp_path, "--training.steps", "5", "--training.nonfinite_policy", "skip_step",
                         *(DELAYED if recipe == "float8_delayed" else []))
    assert trainer.train_state.step == 5 and trainer.train_state.skipped_steps == 1
    recs = {r["step"]: r for r in records(tmp_path)}
    assert [recs[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    params = [k for k, _ in trainer.model.named_parameters()]
    assert all(torch.equal(snapshots[2][k], snapshots[3][k]) for k in params)  # step 3 changed no weight
    assert not torch.equal(snapshots[3][params[0]], snapshots[4][params[0]])  # training went on
    assert all(torch.isfinite(v).all() for v in snapshots[5].values() if v.is_floating_point())


def _poison_steps(monkeypatch, steps: set[int]):
    real_step = Trainer.train_step

    def train_step(self, data_iter):
        if self.train_state.step not in steps:
            return real_step(self, data_iter)
        handle = dict(self.model.named_parameters())[POISONED].register_hook(lambda g: g * float("nan"))
        try:
            return real_step(self, data_iter)
        finally:
            handle.remove()

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_skip_step_stops_a_diverged_run_after_max_consecutive_skips(tmp_path, repo_root, monkeypatch):
    _poison_steps(monkeypatch, {2, 3, 4, 5})
    with pytest.raises(NonFiniteError, match=r"step 4: .*first non-finite gradient in .*3 non-finite steps in a row "
                                             r"exceed training.max_consecutive_skips=2: the run has diverged"):
        run_inproc(repo_root, tmp_path, "--training.steps", "6", "--training.nonfinite_policy", "skip_step",
                   "--training.max_consecutive_skips", "2")


def test_a_finite_step_resets_the_consecutive_skip_count(tmp_path, repo_root, monkeypatch):
    _poison_steps(monkeypatch, {2, 3, 5, 6})
    trainer = run_inproc(repo_root, tmp_path, "--training.steps", "7", "--training.nonfinite_policy", "skip_step",
                         "--training.max_consecutive_skips", "2")
    assert trainer.train_state.step == 7 and trainer.train_state.skipped_steps == 4


# -- delayed scaling guard, through the public float8 API ------------------------------------------------


def _delayed_model():
    from titan_fp8.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 16, bias=False))
    return convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("delayed"))


def _delayed_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "float8_" in k}


def _fwd_bwd(model, x, grad_scale=1.0):
    out = model(x)
    out.backward(torch.ones_like(out) * grad_scale)


@pytest.mark.parametrize("poison", ["inf input", "nan input", "nan grad_output", "zero input"])
def test_delayed_scaling_history_never_takes_nonfinite_amax(poison):
    from titan_fp8.float8 import sync_float8_amax_and_scale_history

    model = _delayed_model()
    for _ in range(2):  # a valid history first
        _fwd_bwd(model, torch.randn(8, 32))
        sync_float8_amax_and_scale_history(model)
    good = _delayed_buffers(model)
    x, grad_scale = torch.randn(8, 32), 1.0
    if poison == "inf input":
        x[0, 0] = float("inf")
    elif poison == "nan input":
        x[1, 1] = float("nan")
    elif poison == "nan grad_output":
        grad_scale = float("nan")
    else:
        x = torch.zeros(8, 32)
    _fwd_bwd(model, x, grad_scale)
    sync_float8_amax_and_scale_history(model)
    after = _delayed_buffers(model)
    for k, v in after.items():
        assert torch.isfinite(v).all(), f"{poison}: {k} = {v}"
        if "scale" in k:
            assert (v > 0).all() and torch.isfinite(v).all(), f"{poison}: {k} = {v}"
    if poison != "zero input":  # the poisoned operand's history did not move
        key = {"inf input": "0.float8_amax_history_input", "nan input": "0.float8_amax_history_input",
               "nan grad_output": "1.float8_amax_history_grad_output"}[poison]
        assert torch.equal(after[key], good[key])
    # and the model still trains with finite scales afterwards
    _fwd_bwd(model, torch.randn(8, 32))
    sync_float8_amax_and_scale_history(model)
    assert all(torch.isfinite(v).all() for v in _delayed_buffers(model).values())
