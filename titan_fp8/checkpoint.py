"""DCP checkpoints: save every N steps, resume from the newest good one, keep the latest K.

Layout under `{dump_folder}/{checkpoint.folder}/`:
  step-N/            a complete, resumable checkpoint (model, optimizer, lr scheduler, dataloader, RNG,
                     train state) written by torch.distributed.checkpoint, plus `manifest.json`
  step-N-model/      the final model-only save in `export_dtype` (when `last_save_model_only`)
  .step-N.partial/   a save in progress; renamed to step-N only once every rank has finished

Atomicity. A save is written under `.step-N.partial/`; every rank fsyncs and checksums the files it
wrote; rank 0 then writes `manifest.json` (step, config hash, titan_fp8/torch versions, world size,
model args, and per file its size and crc32), fsyncs it and the folder, renames the folder to `step-N`
and fsyncs the parent. A process killed at any point leaves either a `.partial` folder (never loaded,
removed by the next save) or a complete `step-N`. Async saves stage the state (a copy) before
returning, write and checksum it in background threads, and are sealed the same way.

Loading. `step-N` folders without a manifest are ignored. The newest one is verified against its
manifest (every listed file present, sizes equal, crc32 equal; ranks share the checksum work); a bad one
is logged with the reason and the previous one is tried. A checkpoint whose shapes or keys do not match
the model raises `CheckpointError` naming the folder and the key, before anything is loaded or written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

# Without a process group DCP warns on every call that it assumes a single process: that is our intent.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")

_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")  # DCP's FileSystemWriter: __{rank}_{index}.distcp
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


# ----------------------------------------------------------------------------------------------------
# Stateful wrappers: what goes into a checkpoint
# ----------------------------------------------------------------------------------------------------


class ModelState(Stateful):
    """Model weights and buffers (float8 amax histories included) keyed by FQN, sharded or not.

    `skip`: keys the checkpoint being loaded lacks and that may start fresh (CheckpointManager.load sets it).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.skip: frozenset[str] = frozenset()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in get_model_state_dict(self.model).items() if k not in self.skip}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only the skipped keys may be missing (CheckpointManager checked every other key and shape).
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=not self.skip))


class OptimizerState(Stateful):
    """Optimizer state flattened to FQN keys, so it reshards across world sizes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)
        self.skip: frozenset[str] = frozenset()  # parameters (FQNs) the checkpoint lacks: fresh state
        self._fresh: dict[str, Any] = {}

    def _skipped(self, key: str) -> bool:
        # Flattened keys: "state.<fqn>.<name>" and "param_groups.<fqn>.<name>".
        fqn = key.split(".", 1)[1] if "." in key else key
        return any(fqn.startswith(p + ".") for p in self.skip)

    def state_dict(self) -> dict[str, Any]:
        full = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if not self.skip:
            return full
        self._fresh = {k: v for k, v in full.items() if self._skipped(k)}
        return {k: v for k, v in full.items() if not self._skipped(k)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The skipped parameters keep the freshly initialised state (zero moments) from state_dict().
        set_optimizer_state_dict(self.model, self.optimizer, {**state_dict, **self._fresh}, options=self.options)


class PerRankState(Stateful):
    """State that differs per data-parallel rank (data position, RNG), stored under a per-rank key.

    The state is serialised to one bytes blob: its tensors change shape as training goes (a shuffle buffer
    fills up), which DCP's tensor planner would reject, and `torch.load(weights_only=True)` reads it back
    without unpickling arbitrary code.
    """

    def __init__(self, obj: Any, rank: int, what: str):
        self.obj, self.key, self.what = obj, f"dp_rank_{rank}", what

    def state_dict(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(self.obj.state_dict(), buffer)
        return {self.key: buffer.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.key not in state_dict:
            raise CheckpointError(f"checkpoint has no {self.what} state for {self.key}: it was saved with "
                                  "a different data-parallel degree")
        blob = state_dict[self.key]
        if isinstance(blob, io.BytesIO):
            blob = blob.getvalue()
        self.obj.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))


class RNGState:
    """Torch CPU (and CUDA) generator state of this process."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Files: fsync, checksums, versions
# ----------------------------------------------------------------------------------------------------

_CHUNK = 16 << 20  # zlib.crc32 runs at several GB/s and releases the GIL on large buffers


def file_crc32(path: str) -> str:
    """crc32 of a file's bytes as 8 hex digits (detects truncation, bit rot and torn writes)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _fsync_path(path: str) -> None:
    """fsync a file or a directory (the latter makes renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_file(path: str) -> dict[str, Any]:
    """fsync one written file and describe it for the manifest."""
    _fsync_path(path)
    return {"size": os.path.getsize(path), "crc32": file_crc32(path)}


def titan_fp8_version() -> str:
    try:
        return importlib.metadata.version("titan_fp8")
    except importlib.metadata.PackageNotFoundError:  # running from a source checkout
        pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
        try:
            import tomllib

            with open(pyproject, "rb") as f:
                return str(tomllib.load(f)["project"]["version"]) + "+src"
        except Exception:
            return "unknown"


def config_hash(config: dict) -> str:
    """Short stable hash of a job config (as `JobConfig.to_dict()`), recorded in every manifest."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Manager
# ----------------------------------------------------------------------------------------------------


def _is_coordinator() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _own_files(folder: str, rank: int, world: int) -> list[str]:
    """Files of a DCP save this rank seals: its `__{rank}_*` shards; rank 0 also everything else."""
    mine = []
    for name in sorted(os.listdir(folder)):
        m = _SHARD_FILE.match(name)
        if (m and int(m.group(1)) == rank) or (rank == 0 and (not m or int(m.group(1)) >= world)):
            mine.append(name)
    return mine


def _shape(value: Any) -> Optional[tuple]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class CheckpointManager:
    def __init__(self, folder: str, *, interval: int, keep_latest_k: int, async_mode: str = "disabled",
                 metadata: Optional[dict] = None, fresh_if_missing: Optional[Callable[[str], bool]] = None):
        """fresh_if_missing: model keys a checkpoint may lack (e.g. QAT's learned scales when resuming a run
        saved without range learning); they keep their initial values and get fresh optimizer state."""
        self.folder = folder
        self.fresh_if_missing = fresh_if_missing or (lambda key: False)
        self.interval = interval
        self.keep_latest_k = keep_latest_k
        self.async_mode = async_mode
        self.metadata = dict(metadata or {})
        self._pending: Optional[tuple[int, Future]] = None
        self._executor: Optional[ThreadPoolExecutor] = None

    # -- discovery ---------------------------------------------------------------------------------

    def step_dir(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    def _partial_dir(self, name: str) -> str:
        return os.path.join(self.folder, f".{name}.partial")

    def complete_steps(self) -> list[int]:
        """Steps with a renamed checkpoint folder holding a manifest, oldest first (not yet verified)."""
        if not os.path.isdir(self.folder):
            return []
        steps = []
        for name in os.listdir(self.folder):
            m = _STEP_DIR.match(name)
            if m and os.path.isfile(os.path.join(self.folder, name, MANIFEST)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def should_save(self, step: int, last_step: int) -> bool:
        return step % self.interval == 0 or step == last_step

    # -- save --------------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Save a resumable checkpoint for `step` (async: returns once the state is staged)."""
        self.wait()
        partial = self._partial_dir(f"step-{step}")
        if _is_coordinator():
            self._remove_partials()
            os.makedirs(partial)
        _barrier()
        start = time.perf_counter()
        if self.async_mode == "async":
            written = dcp.async_save(state, checkpoint_id=partial)  # returns once staged (copied)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-seal")
            self._pending = (step, self._executor.submit(self._seal_after, written, partial))
            logger.info("checkpoint step-%d staged in %.2fs (writing in the background)", step,
                        time.perf_counter() - start)
        else:
            dcp.save(state, checkpoint_id=partial)
            self._finalize(step, partial, self.step_dir(step), self._seal_local(partial))
            logger.info("checkpoint step-%d saved in %.2fs", step, time.perf_counter() - start)

    def maybe_finalize(self) -> None:
        """Seal a finished async save without waiting for the next one. Single process only: with several
        ranks, sealing is collective and waits for the next save (or the end of training)."""
        if self._pending is not None and not dist.is_initialized() and self._pending[1].done():
            self.wait()

    def wait(self) -> None:
        """Finish an async save in flight (before the next save, and before exit)."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        files = future.result()
        self._finalize(step, self._partial_dir(f"step-{step}"), self.step_dir(step), files)
        logger.info("checkpoint step-%d written", step)

    @staticmethod
    def _seal_after(written: Future, partial: str) -> dict[str, dict]:
        written.result()
        return CheckpointManager._seal_local(partial)

    @staticmethod
    def _seal_local(partial: str) -> dict[str, dict]:
        """fsync and checksum the files this rank is responsible for (no collectives: runs in threads)."""
        rank, world = _rank_world()
        return {name: _seal_file(os.path.join(partial, name)) for name in _own_files(partial, rank, world)}

    def _finalize(self, step: int, partial: str, final: str, local_files: dict[str, dict]) -> None:
        gathered = _all_gather(local_files)
        if _is_coordinator():
            files: dict[str, dict] = {}
            for part in gathered:
                files.update(part)
            manifest = dict(self.metadata, format=MANIFEST_FORMAT, step=step, time=time.time(),
                            torch=torch.__version__, titan_fp8=titan_fp8_version(),
                            world_size=_rank_world()[1], files=dict(sorted(files.items())))
            tmp = os.path.join(partial, MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(partial, MANIFEST))
            _fsync_path(partial)
            old = None
            if os.path.exists(final):  # re-saving a step (resumed from an older one): swap, then remove
                old = os.path.join(self.folder, f".{os.path.basename(final)}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(partial, final)
            _fsync_path(self.folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._purge()
        _barrier()

    def _remove_partials(self) -> None:
        """Remove folders of interrupted saves (a killed run leaves them; they are never loaded)."""
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            if name.startswith(".") and (name.endswith(".partial") or name.endswith(".old")):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
                logger.info("removed %s left by an interrupted save", name)

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for step in self.complete_steps()[:-self.keep_latest_k]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
            logger.info("removed old checkpoint step-%d (keep_latest_k=%d)", step, self.keep_latest_k)

    def save_model_only(self, step: int, model: nn.Module, dtype: torch.dtype) -> str:
        """Final weights-only save in `dtype` (for export), beside the resumable checkpoints; atomic too."""
        self.wait()
        out = os.path.join(self.folder, f"step-{step}-model")
        partial = self._partial_dir(f"step-{step}-model")
        sd = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in get_model_state_dict(model).items()}
        if _is_coordinator():
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        _barrier()
        dcp.save({"model": sd}, checkpoint_id=partial)
        self._finalize(step, partial, out, self._seal_local(partial))
        logger.info("model-only checkpoint (%s) saved to %s", dtype, out)
        return out

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    # -- verify ------------------------------------------------------------------------------------

    def verify(self, step: int) -> Optional[str]:
        """Why the checkpoint of `step` is unusable, or None when it matches its manifest.

        Sizes are checked by every rank; the crc32 work is split over ranks and the verdicts gathered,
        so every rank reaches the same answer."""
        path = self.step_dir(step)
        rank, world = _rank_world()
        problem = None
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, UnicodeDecodeError) as e:
            manifest, problem = None, f"{MANIFEST} unreadable ({e})"
        except json.JSONDecodeError as e:
            manifest, problem = None, f"{MANIFEST} is not valid JSON ({e.msg} at line {e.lineno})"
        if manifest is not None:
            problem = self._check_manifest(manifest, step)
        if problem is None:
            files = sorted(manifest["files"].items())
            problem = next(filter(None, (self._check_file(path, name, info, checksum=(i % world == rank))
                                         for i, (name, info) in enumerate(files))), None)
        problems = [p for p in _all_gather(problem) if p]
        return problems[0] if problems else None

    @staticmethod
    def _check_manifest(manifest: Any, step: int) -> Optional[str]:
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return f"{MANIFEST} has no 'files' table"
        if manifest.get("step") != step:
            return f"{MANIFEST} says step {manifest.get('step')!r}, the folder says step {step}"
        if not isinstance(manifest.get("format"), int) or manifest["format"] > MANIFEST_FORMAT:
            return f"{MANIFEST} format {manifest.get('format')!r} is not one this titan_fp8 reads (<= {MANIFEST_FORMAT})"
        if ".metadata" not in manifest["files"]:
            return f"{MANIFEST} does not list the DCP .metadata file"
        for name, info in manifest["files"].items():
            if (os.path.basename(name) != name or not isinstance(info, dict)
                    or not isinstance(info.get("size"), int) or not isinstance(info.get("crc32"), str)):
                return f"{MANIFEST} has a malformed entry for {name!r}"
        return None

    @staticmethod
    def _check_file(path: str, name: str, info: dict, checksum: bool) -> Optional[str]:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"missing file {name} (listed in {MANIFEST})"
        size = os.path.getsize(full)
        if size != info["size"]:
            kind = "truncated" if size < info["size"] else "larger than written"
            return f"{name} is {kind}: {size} bytes, {MANIFEST} says {info['size']}"
        if checksum:
            crc = file_crc32(full)
            if crc != info["crc32"]:
                return f"{name} is corrupted: crc32 {crc}, {MANIFEST} says {info['crc32']}"
        return None

    # -- load --------------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if not _is_coordinator():
            return
        probe = os.path.join(self.folder, ".write_probe")
        try:
            os.makedirs(self.folder, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise CheckpointError(f"checkpoint.folder: cannot write to {self.folder}: {e.strerror or e}") from None

    def _pick(self, step: Optional[int]) -> Optional[int]:
        """The step to load: `step` if given (it must be good), else the newest good one."""
        steps = self.complete_steps()
        if _is_coordinator() and os.path.isdir(self.folder):
            for name in sorted(os.listdir(self.folder)):
                if _STEP_DIR.match(name) and int(name[5:]) not in steps:
                    logger.warning("ignoring %s: no %s (an incomplete or foreign folder)",
                                   os.path.join(self.folder, name), MANIFEST)
        if step is not None and step >= 0:
            if step not in steps:
                raise CheckpointError(f"checkpoint.load_step={step}: no complete checkpoint at "
                                      f"{self.step_dir(step)} (found steps: {steps or 'none'})")
            problem = self.verify(step)
            if problem:
                raise CheckpointError(f"{self.step_dir(step)}: unusable checkpoint: {problem}")
            return step
        rejected = []
        for s in reversed(steps):
            problem = self.verify(s)
            if problem is None:
                return s
            rejected.append(f"step-{s}: {problem}")
            logger.warning("checkpoint %s is unusable: %s; falling back to the previous one", self.step_dir(s),
                           problem)
        if rejected:
            raise CheckpointError(f"{self.folder}: no usable checkpoint ({'; '.join(rejected)}); move the "
                                  "folder away to start from scratch")
        return None

    def _check_compatible(self, path: str, state: dict[str, Any]) -> frozenset[str]:
        """Refuse, naming the key, a checkpoint whose model keys or shapes differ from `state['model']`;
        returns the keys it lacks that may start fresh (`fresh_if_missing`)."""
        if "model" not in state or not hasattr(state["model"], "state_dict"):
            return frozenset()
        try:
            saved = FileSystemReader(path).read_metadata().state_dict_metadata
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read the DCP metadata ({type(e).__name__}: {e})") from None
        saved_model = {k[len("model."):]: getattr(v, "size", None) for k, v in saved.items()
                       if k.startswith("model.")}
        current = {k: _shape(v) for k, v in state["model"].state_dict().items()}
        hint = self._model_args_difference(path)
        fresh = frozenset(k for k in current if k not in saved_model and self.fresh_if_missing(k))
        for key, shape in current.items():
            if key in fresh:
                continue
            if key not in saved_model:
                raise CheckpointError(f"{path}: checkpoint was saved for a different model: it has no "
                                      f"'{key}'{hint}")
            if shape is not None and saved_model[key] is not None and tuple(saved_model[key]) != shape:
                raise CheckpointError(f"{path}: checkpoint was saved for a different model: '{key}' has shape "
                                      f"{tuple(saved_model[key])} in the checkpoint, {shape} in this model{hint}")
        extra = sorted(set(saved_model) - set(current))
        if extra:
            raise CheckpointError(f"{path}: checkpoint was saved for a different model: it has '{extra[0]}' "
                                  f"that this model lacks{hint}")
        return fresh

    def _model_args_difference(self, path: str) -> str:
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                saved = json.load(f).get("model_args") or {}
        except (OSError, ValueError):
            return ""
        ours = self.metadata.get("model_args") or {}
        diffs = [f"{k} {saved[k]!r} vs {ours[k]!r}" for k in sorted(set(saved) & set(ours)) if saved[k] != ours[k]]
        return f" (model args differ, checkpoint vs this run: {', '.join(diffs)})" if diffs else ""

    def load(self, state: dict[str, Any], step: Optional[int] = None) -> Optional[int]:
        """Load `step` (or the newest good checkpoint) into `state`; returns the step or None.

        Called once before training: it also checks that the folder is writable, so that a bad folder
        is a one-line error now rather than a crash at the first save."""
        self._check_writable()
        step = self._pick(step)
        if step is None:
            return None
        path = self.step_dir(step)
        fresh = self._check_compatible(path, state)
        if fresh:
            logger.info("%s lacks %d model keys that start fresh (e.g. %s)", path, len(fresh), min(fresh))
            for name in ("model", "optimizer"):
                if isinstance(state.get(name), (ModelState, OptimizerState)):
                    state[name].skip = fresh
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = {}
        ours = self.metadata.get("config_hash")
        if ours and manifest.get("config_hash") not in (None, ours):
            logger.info("%s was saved with a different config (hash %s, now %s)", path,
                        manifest.get("config_hash"), ours)
        start = time.perf_counter()
        try:
            dcp.load(state, checkpoint_id=path)
        except CheckpointError:
            raise
        except Exception as e:  # DCP raises deep errors (shape mismatch, missing keys): name the folder
            msg = str(e).strip().splitlines()
            raise CheckpointError(f"{path}: cannot load checkpoint: {msg[-1] if msg else type(e).__name__}") from e
        logger.info("resumed from %s in %.2fs", path, time.perf_counter() - start)
        return step
