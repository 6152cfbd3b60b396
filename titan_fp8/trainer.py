"""The training loop: build everything from a JobConfig, then train, validate, log and checkpoint.

Read top to bottom: `Trainer.__init__` builds the pieces in the order they depend on each other
(device -> process group -> tokenizer -> model on meta -> converters -> AC/compile/FSDP -> materialise ->
optimizer -> data -> checkpoints), `Trainer.train` is the loop, `train_step` one optimizer step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import signal
import time
from typing import Optional

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from titan_fp8.checkpoint import (CheckpointManager, ModelState, OptimizerState, PerRankState, RNGState,
                                  config_hash)
from titan_fp8.config import ConfigError, JobConfig
from titan_fp8.converters import build_converters
from titan_fp8.data import PrefetchingLoader, build_dataloader, build_tokenizer
from titan_fp8.loss import cross_entropy_loss
from titan_fp8.metrics import MetricsLogger, ThroughputMeter, device_peak_flops, memory_stats
from titan_fp8.models import Transformer, llama3_flavors
from titan_fp8.optim import build_lr_scheduler, build_optimizer
from titan_fp8.parallel import (ParallelDims, RowStreamLoader, build_mesh, dist_all, dist_max, dist_max_on_device,
                                dist_mean, dp_process_group, init_distributed, init_weights_like_unsharded,
                                parallelize_llama)
from titan_fp8.quant import LEARNED_SCALE_NAME

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under `training.nonfinite_policy = "error"`."""


@dataclasses.dataclass
class _StepHealth:
    """What a step leaves for its non-finite check: device tensors, read only when the check runs."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    params: list  # the parameters whose gradients the norms below measured, in that order
    local_norms: torch.Tensor  # each gradient's norm on this rank's shard

    def finite(self) -> bool:
        return bool(torch.isfinite(self.loss) & torch.isfinite(self.grad_norm))

    def first_nonfinite_parameter(self, model: nn.Module) -> Optional[str]:
        bad = (~torch.isfinite(self.local_norms)).nonzero()
        if not len(bad):
            return None
        param = self.params[int(bad[0])]
        return next((name for name, p in model.named_parameters() if p is param), None)


@dataclasses.dataclass
class TrainState:
    """Loop counters that go into checkpoints."""

    step: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])


def _device_memory_bytes(device: torch.device) -> Optional[int]:
    """Total memory of the device (host RAM for CPU), or None when unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device: cuda requested but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class Trainer:
    def __init__(self, config: JobConfig):
        self.config = config
        t, job = config.training, config.job

        # -- device, processes, determinism ------------------------------------------------------------
        self.device = pick_device(t.device)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.rank, world_size = init_distributed(self.device.type)
        p = config.parallelism
        if p.tensor_parallel_degree != 1:
            raise NotImplementedError("parallelism.tensor_parallel_degree > 1: tensor parallelism is not "
                                      "implemented; use data-parallel (FSDP) degrees")
        self.dims = ParallelDims.resolve(p.data_parallel_shard_degree, p.data_parallel_replicate_degree,
                                         world_size)
        self.mesh = build_mesh(self.dims, self.device.type)
        self.dp_rank = self.rank  # data parallel spans all ranks (no tensor/pipeline parallelism)
        self.grad_accum_steps = self._grad_accum_steps(t.local_batch_size, t.global_batch_size,
                                                       self.dims.dp_degree)
        self._check_dump_folder(job.dump_folder)
        torch.manual_seed(t.seed)

        # -- tokenizer and model (built on meta, materialised after parallelisation) --------------------
        self.tokenizer = build_tokenizer(config.model.tokenizer_path,
                                         vocab_size=config.model.tokenizer_vocab_size)
        self.model_args = self._model_args(config)
        with torch.device("meta"):
            model = Transformer(self.model_args)
        # Delayed-scaling amaxes are synchronised over every data-parallel rank.
        self.converters = build_converters(config, process_group=dp_process_group(self.mesh),
                                           fsdp_enabled=self.mesh is not None)
        for converter in self.converters:
            converter.convert(model)

        param_dtype = _DTYPES[t.mixed_precision_param]
        ac = config.activation_checkpoint
        self.model = parallelize_llama(
            model, mesh=self.mesh, ac_mode=ac.mode, selective_ac_option=ac.selective_ac_option,
            compile_model=config.compile.enable and "model" in config.compile.components,
            param_dtype=param_dtype, reduce_dtype=_DTYPES[t.mixed_precision_reduce],
            reshard_after_forward=p.fsdp_reshard_after_forward, cpu_offload=p.fsdp_cpu_offload)
        self.model.to_empty(device="cpu" if p.fsdp_cpu_offload else self.device)
        # Every rank gets its shard of the very weights a 1-rank run initialises from this seed.
        init_weights_like_unsharded(
            self.model, lambda: self.model.init_weights(buffer_device=self.device if p.fsdp_cpu_offload else None))
        for converter in self.converters:
            converter.init_buffers(self.model)
        self.model.train()
        # Without FSDP the fp32 master weights compute under autocast; FSDP casts parameters itself.
        self.autocast_dtype = param_dtype if (self.mesh is None and param_dtype != torch.float32) else None
        compile_loss = config.compile.enable and "loss" in config.compile.components
        # The output head computes the loss itself (one logits-sized buffer instead of two), QAT's fake-quantised
        # head too; a float8 head (the "output" filter removed) cannot: then logits, and the loss on them.
        self.fused_loss = self.model.fuses_loss
        if self.fused_loss:
            self.model.output.compile_loss = compile_loss
        self.loss_fn = torch.compile(cross_entropy_loss, fullgraph=True) if compile_loss else cross_entropy_loss

        # -- optimizer and schedule ---------------------------------------------------------------------
        o, s = config.optimizer, config.lr_scheduler
        learned_scales = config.qat_enabled and config.qat.range_learning
        self.optimizer = build_optimizer(self.model, name=o.name, lr=o.lr, eps=o.eps,
                                         weight_decay=o.weight_decay, betas=tuple(o.betas),
                                         implementation=o.implementation,
                                         lr_ratio_by_suffix={LEARNED_SCALE_NAME: config.qat.scale_lr_ratio}
                                         if learned_scales else None)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, warmup_steps=s.warmup_steps, total_steps=t.steps,
                                               decay_type=s.decay_type, decay_ratio=s.decay_ratio,
                                               min_lr_factor=s.min_lr_factor)

        # -- data ---------------------------------------------------------------------------------------
        # Held one batch ahead (train_step reads the next step's batch while the GPU finishes this one);
        # its state_dict is the state before that batch, so checkpoints resume exactly.
        self.dataloader = PrefetchingLoader(self._dataloader("train"))
        self.train_state = TrainState()

        # -- checkpoints and metrics -------------------------------------------------------------------
        c = config.checkpoint
        self.checkpointer = CheckpointManager(
            os.path.join(job.dump_folder, c.folder), interval=c.interval, keep_latest_k=c.keep_latest_k,
            async_mode=c.async_mode, metadata={"model_args": dataclasses.asdict(self.model_args),
                                               "config_hash": config_hash(config.to_dict()),
                                               "global_batch_size": self.global_batch_size,
                                               # export.py rebuilds the QAT scheme and the tokenizer from these.
                                               "qat": dataclasses.asdict(config.qat) if config.qat_enabled else None,
                                               "tokenizer": {"path": (os.path.abspath(config.model.tokenizer_path)
                                                                      if config.model.tokenizer_path else None),
                                                             "vocab_size": self.tokenizer.vocab_size}},
            # A run saved without QAT range learning lacks the learned scales: they start from the weights.
            fresh_if_missing=(lambda key: key.endswith("." + LEARNED_SCALE_NAME)) if learned_scales else None,
        ) if c.enable else None
        self.metrics = MetricsLogger(job.dump_folder, enable_tensorboard=config.metrics.enable_tensorboard,
                                     rank=self.rank)
        peak, self.peak_name = device_peak_flops(self.device)
        flops_per_token = self.model_args.num_flops_per_token(t.seq_len)
        self.throughput = ThroughputMeter(flops_per_token, peak)
        self._stop_requested = False
        self._consecutive_skips = 0  # not checkpointed: a resumed run starts a fresh count
        self._unchecked_steps: collections.deque[_StepHealth] = collections.deque()  # nonfinite_policy "error"
        self._stop_vote: Optional[torch.Tensor] = None  # the stop flags' all-reduce of the previous step
        self._log_startup(world_size)

    # -- construction helpers ----------------------------------------------------------------------------

    @staticmethod
    def _grad_accum_steps(local_batch: int, global_batch: int, dp_degree: int) -> int:
        if global_batch == -1:
            return 1
        per_step = local_batch * dp_degree
        if global_batch % per_step != 0:
            raise ConfigError(f"training.global_batch_size={global_batch} must be a multiple of "
                              f"local_batch_size x data-parallel degree = {local_batch} x {dp_degree}")
        return global_batch // per_step

    def _model_args(self, config: JobConfig):
        if config.model.flavor not in llama3_flavors:
            raise ConfigError(f"model.flavor: expected one of {', '.join(llama3_flavors)}, "
                              f"got {config.model.flavor!r}")
        args = llama3_flavors[config.model.flavor]
        # The vocabulary comes from the tokenizer, as in torchtitan; n_layers may shrink a flavor for tests.
        vocab_size = config.model.vocab_size or self.tokenizer.vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                              f"({self.tokenizer.vocab_size})")
        # An absurd seq_len or batch would die late, OOM-killed while building the RoPE table or the first
        # logits: refuse it now when one micro-batch's fp32 logits alone exceed the device's memory.
        t = config.training
        logits_bytes = t.local_batch_size * t.seq_len * vocab_size * 4
        total = _device_memory_bytes(self.device)
        if total and logits_bytes > total:
            raise ConfigError(f"training.seq_len={t.seq_len} with local_batch_size={t.local_batch_size}: one "
                              f"micro-batch's fp32 logits (x vocab {vocab_size}) alone need "
                              f"{logits_bytes / 2**30:,.0f} GiB, more than the {total / 2**30:,.0f} GiB of "
                              f"{self.device.type} memory")
        return dataclasses.replace(args, vocab_size=vocab_size,
                                   n_layers=config.model.n_layers or args.n_layers,
                                   max_seq_len=max(args.max_seq_len, config.training.seq_len))

    def _check_dump_folder(self, folder: str) -> None:
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write_probe_{self.rank}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"job.dump_folder: cannot write to {folder}: {e.strerror}") from None

    @property
    def global_batch_size(self) -> int:
        return self.config.training.local_batch_size * self.dims.dp_degree * self.grad_accum_steps

    def _dataloader(self, split: str):
        t = self.config.training
        if split == "train":
            # One token stream per row of the global batch, this rank reading its rows: the same data for
            # any number of ranks, so N-rank runs match 1-rank runs and checkpoints reshard (parallel.py).
            return RowStreamLoader(
                lambda row, rows: build_dataloader(
                    dataset=t.dataset, dataset_path=t.dataset_path, tokenizer=self.tokenizer, seq_len=t.seq_len,
                    local_batch_size=1, dp_rank=row, dp_world_size=rows, split="train", infinite=True,
                    seed=t.seed),
                global_batch=self.global_batch_size, local_batch=t.local_batch_size, dp_rank=self.dp_rank,
                dp_degree=self.dims.dp_degree)
        return build_dataloader(dataset=t.dataset, dataset_path=t.dataset_path, tokenizer=self.tokenizer,
                                seq_len=t.seq_len, local_batch_size=t.local_batch_size, dp_rank=self.dp_rank,
                                dp_world_size=self.dims.dp_degree, split=split, infinite=(split == "train"),
                                seed=t.seed)

    def _checkpoint_state(self, saved_world_size: Optional[int] = None) -> dict:
        # The data loader keeps its state per global-batch row, so it reshards; the RNG state is per rank
        # and is only restored at the world size it was saved with (training itself draws no random numbers).
        state = {"model": ModelState(self.model), "optimizer": OptimizerState(self.model, self.optimizer),
                 "lr_scheduler": self.lr_scheduler, "train_state": self.train_state,
                 "dataloader": self.dataloader, "rng": PerRankState(RNGState(), self.rank, "rng")}
        if saved_world_size not in (None, self.dims.world_size):
            del state["rng"]
        return state

    def _resume_manifest(self) -> dict:
        """Manifest of the checkpoint a resume would load (newest, or checkpoint.load_step), or {}."""
        load_step = self.config.checkpoint.load_step
        steps = self.checkpointer.complete_steps()
        step = load_step if load_step >= 0 else (steps[-1] if steps else None)
        try:
            with open(os.path.join(self.checkpointer.step_dir(step), "manifest.json")) as f:
                return json.load(f)
        except (TypeError, OSError, ValueError):
            return {}

    def _load_checkpoint(self) -> Optional[int]:
        manifest = self._resume_manifest()
        saved_batch, saved_world = manifest.get("global_batch_size"), manifest.get("world_size")
        if saved_batch is not None and saved_batch != self.global_batch_size:
            raise ConfigError(f"training.global_batch_size: the checkpoint of step {manifest.get('step')} was "
                              f"saved with a global batch of {saved_batch} sequences, this run has "
                              f"{self.global_batch_size}; the data is split per global-batch row, so resume with "
                              f"the same global batch (any number of ranks that divides it)")
        if saved_world is not None and saved_world != self.dims.world_size:
            logger.info("resharding a checkpoint saved on %d ranks to %d ranks", saved_world, self.dims.world_size)
        load_step = self.config.checkpoint.load_step
        return self.checkpointer.load(self._checkpoint_state(saved_world),
                                      None if load_step < 0 else load_step)

    def _log_startup(self, world_size: int) -> None:
        if self.rank != 0:
            return
        n_params = sum(p.numel() for p in self.model.parameters())
        t = self.config.training
        logger.info("job: %s", self.config.job.description or "(no description)")
        logger.info("model %s %s: %d layers, dim %d, vocab %d, %.2fM parameters", self.config.model.name,
                    self.config.model.flavor, self.model_args.n_layers, self.model_args.dim,
                    self.model_args.vocab_size, n_params / 1e6)
        logger.info("device %s, world size %d, dp %d (shard %d x replicate %d), grad accumulation %d, "
                    "autocast %s", self.device, world_size, self.dims.dp_degree, self.dims.dp_shard,
                    self.dims.dp_replicate, self.grad_accum_steps, self.autocast_dtype)
        logger.info("batch: %d x %d tokens per rank per micro-batch; converters: %s; MFU peak: %s",
                    t.local_batch_size, t.seq_len, [c.name for c in self.converters] or "none", self.peak_name)
        logger.info("loss: %s", f"fused into the output head ({type(self.model.output).__name__}, one "
                    f"logits-sized buffer)" if self.fused_loss else
                    f"on the logits of the output head ({type(self.model.output).__name__})")

    # -- the loop ----------------------------------------------------------------------------------------

    def train(self) -> None:
        t = self.config.training
        if self.checkpointer is not None:
            resumed = self._load_checkpoint()
            if resumed is not None:
                logger.info("resuming at step %d", self.train_state.step)
        gc.disable()
        gc.collect()
        data_iter = iter(self.dataloader)
        self.throughput.reset()
        previous_handlers = self._install_signal_handlers()
        try:
            while self.train_state.step < t.steps:
                self.train_state.step += 1
                step = self.train_state.step
                if step % t.gc_freq == 0:
                    gc.collect(1)
                for converter in self.converters:
                    converter.pre_step(self.model, step)
                with self._maybe_profile(step):
                    loss, grad_norm = self.train_step(data_iter)
                # The GPU is done with the previous step by now, or nearly: reading its health leaves it no idle time.
                self._check_health(wait_for_this_step=False)
                if step % self.config.metrics.log_freq == 0 or step == t.steps:
                    self._check_health(wait_for_this_step=True)  # a non-finite step is never logged as done
                    self._log_step(step, loss, grad_norm)
                if self.config.validation.enable and (step % self.config.validation.freq == 0 or step == t.steps):
                    self._check_health(wait_for_this_step=True)
                    self.validate(step)
                stop = self._preemption_requested()
                if self.checkpointer is not None and (self.checkpointer.should_save(step, t.steps) or stop):
                    self._check_health(wait_for_this_step=True)  # never checkpoint weights a nan step wrote
                    self.checkpointer.save(step, self._checkpoint_state())
                elif self.checkpointer is not None:
                    self.checkpointer.maybe_finalize()  # seal a finished async save early
                if stop:
                    logger.warning("stop signal received: %s step %d, exiting",
                                   "checkpointed" if self.checkpointer is not None else "no checkpoint for", step)
                    break
            self._check_health(wait_for_this_step=True)
            if self.checkpointer is not None:
                self.checkpointer.close()
                if self.config.checkpoint.last_save_model_only and self.train_state.step == t.steps:
                    self.checkpointer.save_model_only(self.train_state.step, self.model,
                                                      _DTYPES[self.config.checkpoint.export_dtype])
        finally:
            gc.enable()
            self.metrics.close()
            for sig, handler in previous_handlers.items():  # the process may live on (tests, notebooks)
                signal.signal(sig, handler)

    def train_step(self, data_iter: PrefetchingLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns (loss, grad_norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum_steps):
            data_start = time.perf_counter()
            input_ids, labels = next(data_iter)
            input_ids = input_ids.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self.throughput.add(labels.numel(), time.perf_counter() - data_start)
            if micro == 0:  # QAT with scales started from input statistics: one no-grad forward, once
                for converter in self.converters:
                    converter.calibrate(self.model, lambda: self._no_grad_forward(input_ids))
            with self._autocast():
                if self.fused_loss:
                    loss = self.model(input_ids, labels=labels)
                else:
                    logits = self.model(input_ids)  # (B, T, vocab)
                    loss = self.loss_fn(logits, labels)
                    # The loss's backward frees the logits after reading them, unless this frame still holds
                    # them: held, they would sit beside their gradient at the memory peak.
                    del logits
                loss = loss / self.grad_accum_steps
            loss.backward()
            total_loss += loss.detach()

        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm, local_norms = self._grad_norm([p.grad for p in params])
        health = _StepHealth(self.train_state.step, total_loss, grad_norm, params, local_norms)
        # Read the next step's batch now, while the GPU still runs the backward (skip_step waits for it below).
        fetch_start = time.perf_counter()
        data_iter.fetch_ahead()
        if self.device.type == "cpu":  # no device runs meanwhile: the read is on the step's critical path
            self.throughput.add(0, time.perf_counter() - fetch_start)
        if self.config.training.nonfinite_policy == "skip_step":
            # Skipping must be decided before the optimizer steps: this waits for the GPU, every step.
            if not health.finite():
                self._handle_nonfinite(health)
                return total_loss, grad_norm
            self._consecutive_skips = 0
        else:
            # "error" decides nothing before the update, so the check waits until the GPU is done with this
            # step (_check_health, called from the loop): no per-step sync stalls the GPU. A nan update may
            # reach the weights in memory meanwhile, never a log record or a checkpoint.
            self._unchecked_steps.append(health)
        self._clip_grads(params, grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        for converter in self.converters:
            converter.post_optimizer_hook(self.model)
        return total_loss, grad_norm

    @torch.no_grad()
    def _no_grad_forward(self, input_ids: torch.Tensor) -> None:
        with self._autocast():
            self.model(input_ids)
        # FSDP keeps the groups that do not reshard after forward (the last block, norm + output) unsharded
        # until a backward that this forward never has: reshard them, or a converter writing parameters now
        # (learned QAT scales) would write the soon-discarded unsharded copies, not the shards.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @staticmethod
    def _grad_norm(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The global 2-norm of all gradients (as get_total_norm computes it) and each gradient's local-shard
        norm, kept to name the first non-finite gradient after the step without holding the gradients."""
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        if hasattr(total, "full_tensor"):  # DTensor under FSDP: per-shard norms -> the global norm
            total = total.full_tensor()
        local = torch.stack([n.to_local() if hasattr(n, "to_local") else n for n in norms])
        return total, local

    def _check_health(self, wait_for_this_step: bool) -> None:
        """Raise NonFiniteError for the first unchecked step with a non-finite loss or gradient norm. Without
        `wait_for_this_step` the current step stays unchecked, so nothing waits for the GPU to finish it."""
        keep = 0 if wait_for_this_step else 1
        while len(self._unchecked_steps) > keep:
            health = self._unchecked_steps.popleft()
            if not health.finite():
                self._unchecked_steps.clear()
                self._handle_nonfinite(health)

    def _clip_grads(self, params: list[nn.Parameter], grad_norm: torch.Tensor) -> None:
        """Same arithmetic as clip_grad_norm_, split so that the norm is checked before it scales anything."""
        max_norm = self.config.training.max_norm or float("inf")  # inf: measure the norm, scale by 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm, foreach=True)

    def _handle_nonfinite(self, health: _StepHealth) -> None:
        step, loss, grad_norm = health.step, health.loss, health.grad_norm
        t = self.config.training
        self._consecutive_skips += 1
        if t.nonfinite_policy == "skip_step" and (t.max_consecutive_skips == 0
                                                  or self._consecutive_skips <= t.max_consecutive_skips):
            self.optimizer.zero_grad(set_to_none=True)
            self.train_state.skipped_steps += 1
            for converter in self.converters:  # delayed float8: drop this step's non-finite amaxes now
                converter.post_optimizer_hook(self.model)
            logger.warning("step %d: non-finite loss %s / grad norm %s: step skipped (%d so far)", step,
                           float(loss), float(grad_norm), self.train_state.skipped_steps)
            return
        # Local shards only (no collectives): ranks may stop at different parameters.
        culprit = health.first_nonfinite_parameter(self.model)
        what = f"non-finite loss {float(loss)}" if not torch.isfinite(loss) else f"grad norm {float(grad_norm)}"
        where = f"first non-finite gradient in {culprit}" if culprit else "all gradients finite on this rank"
        if t.nonfinite_policy == "skip_step":
            raise NonFiniteError(f"step {step}: {what}, {where}; {self._consecutive_skips} non-finite steps in a row "
                                 f"exceed training.max_consecutive_skips={t.max_consecutive_skips}: the run has diverged")
        raise NonFiniteError(f"step {step}: {what}, {where} (set training.nonfinite_policy = \"skip_step\" "
                             "to skip such steps)")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- validation, logging, profiling, preemption ------------------------------------------------------

    @torch.no_grad()
    def validate(self, step: int) -> float:
        self.model.eval()
        losses = []
        max_batches = self.config.validation.steps
        batches = iter(self._dataloader("validation"))
        while max_batches == -1 or len(losses) < max_batches:
            batch = next(batches, None)
            # Under FSDP every forward is collective: stop when any rank's split runs out.
            if not dist_all(batch is not None, self.device, self.mesh):
                break
            input_ids, labels = batch
            with self._autocast():
                logits = self.model(input_ids.to(self.device))
                losses.append(cross_entropy_loss(logits, labels.to(self.device)))
        self.model.train()
        if not losses:
            logger.warning("validation split is empty: no validation loss")
            return float("nan")
        val_loss = float(dist_mean(torch.stack(losses).mean(), self.mesh))
        self.metrics.log(step, {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        return val_loss

    def _log_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        values = {"loss": float(dist_mean(loss, self.mesh)), "grad_norm": float(grad_norm),
                  "lr": self.lr_scheduler.get_last_lr()[0]}
        values.update(self.throughput.read())
        mem = memory_stats(self.device)
        values.update({k: dist_max(v, self.device, self.mesh) for k, v in mem.items()})
        values["skipped_steps"] = self.train_state.skipped_steps
        self.metrics.log(step, values)
        self.throughput.reset()

    def _maybe_profile(self, step: int):
        prof = self.config.profiling
        if not prof.enable_profiling or step % prof.profile_freq != 0:
            return contextlib.nullcontext()
        return _trace_step(os.path.join(self.config.job.dump_folder, prof.save_traces_folder,
                                        f"iteration_{step}"), self.rank, self.device)

    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGUSR1 ask for a checkpoint after the current step and a clean exit; returns the
        handlers they replace."""
        def request_stop(signum, frame):
            logger.warning("received %s: will checkpoint and exit after this step", signal.Signals(signum).name)
            self._stop_requested = True

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    def _preemption_requested(self) -> bool:
        """Whether any rank received a stop signal. Every rank must agree, or some would enter the checkpoint
        collective alone: the flags are all-reduced. Reading that result at once would make the CPU wait for
        the GPU every step, so each step reads the previous step's vote (all ranks read the same one) and
        starts the next: a signal stops the run one step later on several ranks."""
        if self.mesh is None:
            return self._stop_requested
        previous, self._stop_vote = self._stop_vote, dist_max_on_device(float(self._stop_requested), self.device)
        return previous is not None and bool(previous)


@contextlib.contextmanager
def _trace_step(folder: str, rank: int, device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as p:
        yield
    os.makedirs(folder, exist_ok=True)
    p.export_chrome_trace(os.path.join(folder, f"rank{rank}_trace.json"))
    logger.info("profiler trace written to %s", folder)
