"""DCP checkpoints: save every N steps, resume from the newest complete one, keep the latest K.

Layout under `{dump_folder}/{checkpoint.folder}/`:
  step-N/            a complete, resumable checkpoint (model, optimizer, lr scheduler, dataloader, RNG,
                     train state) written by torch.distributed.checkpoint, plus `manifest.json`
  step-N-model/      the final model-only save in `export_dtype` (when `last_save_model_only`)
  .step-N.partial/   a save in progress; renamed to step-N only once every rank has finished
A checkpoint is complete when it was renamed and its manifest exists: a killed save is never loaded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

# Without a process group DCP warns on every call that it assumes a single process: that is our intent.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


# ----------------------------------------------------------------------------------------------------
# Stateful wrappers: what goes into a checkpoint
# ----------------------------------------------------------------------------------------------------


class ModelState(Stateful):
    """Model weights and buffers (float8 amax histories included) keyed by FQN, sharded or not."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    """Optimizer state flattened to FQN keys, so it reshards across world sizes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)


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
# Manager
# ----------------------------------------------------------------------------------------------------


def _is_coordinator() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, folder: str, *, interval: int, keep_latest_k: int, async_mode: str = "disabled",
                 metadata: Optional[dict] = None):
        self.folder = folder
        self.interval = interval
        self.keep_latest_k = keep_latest_k
        self.async_mode = async_mode
        self.metadata = dict(metadata or {})
        self._pending: Optional[tuple[int, Future]] = None

    # -- discovery ---------------------------------------------------------------------------------

    def step_dir(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
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
        partial = os.path.join(self.folder, f".step-{step}.partial")
        if _is_coordinator():
            if os.path.exists(partial):
                shutil.rmtree(partial)
            os.makedirs(partial, exist_ok=True)
        _barrier()
        start = time.perf_counter()
        if self.async_mode == "async":
            future = dcp.async_save(state, checkpoint_id=partial)
            self._pending = (step, future)
            logger.info("checkpoint step-%d staged in %.2fs (writing in the background)", step,
                        time.perf_counter() - start)
        else:
            dcp.save(state, checkpoint_id=partial)
            self._finalize(step)
            logger.info("checkpoint step-%d saved in %.2fs", step, time.perf_counter() - start)

    def wait(self) -> None:
        """Finish an async save in flight (before the next save, and before exit)."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()
        self._finalize(step)
        logger.info("checkpoint step-%d written", step)

    def _finalize(self, step: int) -> None:
        _barrier()
        if _is_coordinator():
            partial = os.path.join(self.folder, f".step-{step}.partial")
            manifest = dict(self.metadata, step=step, time=time.time(), torch=torch.__version__,
                            files={f: os.path.getsize(os.path.join(partial, f)) for f in sorted(os.listdir(partial))})
            with open(os.path.join(partial, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            final = self.step_dir(step)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            self._purge()
        _barrier()

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for step in self.complete_steps()[:-self.keep_latest_k]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
            logger.info("removed old checkpoint step-%d (keep_latest_k=%d)", step, self.keep_latest_k)

    def save_model_only(self, step: int, model: nn.Module, dtype: torch.dtype) -> str:
        """Final weights-only save in `dtype` (for export), beside the resumable checkpoints."""
        self.wait()
        out = os.path.join(self.folder, f"step-{step}-model")
        sd = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in get_model_state_dict(model).items()}
        dcp.save({"model": sd}, checkpoint_id=out)
        logger.info("model-only checkpoint (%s) saved to %s", dtype, out)
        return out

    # -- load --------------------------------------------------------------------------------------

    def load(self, state: dict[str, Any], step: Optional[int] = None) -> Optional[int]:
        """Load `step` (or the newest complete checkpoint) into `state`; returns the step or None."""
        steps = self.complete_steps()
        if step is None or step < 0:
            if not steps:
                return None
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"checkpoint.load_step={step}: no complete checkpoint at "
                                  f"{self.step_dir(step)} (found steps: {steps or 'none'})")
        path = self.step_dir(step)
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
