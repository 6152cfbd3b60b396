"""Job configuration: one frozen dataclass per TOML section, loaded as defaults < TOML < CLI.

Keys follow torchtitan's names where torchtitan has them, so a torchtitan user can read our TOML files.
Every bad input raises `ConfigError` with a one-line message naming the key; `train.py` turns that into
`error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line and names the key."""


def _opt(default: Any, help: str, choices: tuple | None = None, factory: bool = False):
    metadata = {"help": help, "choices": choices}
    if factory:
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    dump_folder: str = _opt("./outputs", "folder for checkpoints, TensorBoard events and metrics.jsonl")
    description: str = _opt("", "free-text description of the job, logged at start")


@dataclass(frozen=True)
class Model:
    name: str = _opt("llama3", "model family", choices=("llama3",))
    flavor: str = _opt("debugmodel", "model size: debugmodel, small, 8B, 70B, 405B")
    n_layers: int = _opt(0, "override the flavor's number of layers (0 = the flavor's own)")
    tokenizer_path: Optional[str] = _opt(
        None, "sentencepiece .model file; unset = BPE trained on the embedded corpus and cached")
    tokenizer_vocab_size: int = _opt(4096, "vocab size of the BPE trained when tokenizer_path is unset")
    vocab_size: int = _opt(0, "model vocabulary (0 = the tokenizer's); larger pads the embedding and output, "
                              "e.g. 128256 to match Llama3's shapes")
    converters: list[str] = _opt([], "model converters applied before parallelism: float8, qat",
                                 factory=True)


@dataclass(frozen=True)
class Optimizer:
    name: str = _opt("AdamW", "optimizer", choices=("AdamW", "Adam"))
    lr: float = _opt(8e-4, "peak learning rate")
    eps: float = _opt(1e-8, "Adam epsilon")
    weight_decay: float = _opt(0.1, "decoupled weight decay")
    betas: list[float] = _opt([0.9, 0.95], "Adam betas (two numbers)", factory=True)
    implementation: str = _opt("fused", "fused (fastest where supported), foreach, or for-loop",
                               choices=("fused", "foreach", "for-loop"))


@dataclass(frozen=True)
class LRScheduler:
    warmup_steps: int = _opt(200, "linear warmup steps from lr/(warmup_steps+1) to lr")
    decay_type: str = _opt("linear", "decay shape after warmup", choices=("linear", "cosine", "sqrt"))
    decay_ratio: Optional[float] = _opt(
        None, "fraction of steps spent decaying at the end (WSD); unset = decay right after warmup")
    min_lr_factor: float = _opt(0.0, "final lr as a fraction of the peak lr")


@dataclass(frozen=True)
class Training:
    dataset: str = _opt("stdlib", "stdlib (embedded corpus), text, jsonl, parquet or hf",
                        choices=("stdlib", "text", "jsonl", "parquet", "hf"))
    dataset_path: Optional[str] = _opt(None, "file or folder for the text/jsonl/parquet/hf datasets")
    local_batch_size: int = _opt(8, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int = _opt(
        -1, "sequences per optimizer step over all ranks; a multiple of local x dp gives grad accumulation "
            "(-1 = local x dp)")
    seq_len: int = _opt(2048, "tokens per sequence")
    steps: int = _opt(10000, "optimizer steps to train")
    max_norm: float = _opt(1.0, "gradient clipping max norm (0 disables clipping, the norm is still logged)")
    seed: int = _opt(42, "random seed for init, data order and dropout-free RNG state")
    deterministic: bool = _opt(False, "use deterministic algorithms (bitwise-reproducible runs on CPU)")
    mixed_precision_param: str = _opt("bfloat16", "dtype of parameters in compute (FSDP) or autocast",
                                      choices=("bfloat16", "float32"))
    mixed_precision_reduce: str = _opt("float32", "dtype of gradient reduction under FSDP",
                                       choices=("float32", "bfloat16"))
    gc_freq: int = _opt(50, "run Python garbage collection every N steps (automatic gc is disabled)")
    device: str = _opt("auto", "auto (cuda if available), cuda or cpu", choices=("auto", "cuda", "cpu"))
    nonfinite_policy: str = _opt("error", "what a non-finite loss or gradient does: error or skip_step",
                                 choices=("error", "skip_step"))
    max_consecutive_skips: int = _opt(10, "skip_step: stop with an error after this many skipped steps in a row "
                                          "(a diverged run would otherwise skip forever); 0 = no limit")


@dataclass(frozen=True)
class Parallelism:
    data_parallel_shard_degree: int = _opt(-1, "FSDP shard degree (-1 = all remaining ranks)")
    data_parallel_replicate_degree: int = _opt(1, "replicate degree (HSDP when both degrees > 1)")
    tensor_parallel_degree: int = _opt(1, "tensor parallel degree (not implemented: must be 1)")
    fsdp_reshard_after_forward: str = _opt("default", "default, always or never",
                                           choices=("default", "always", "never"))
    fsdp_cpu_offload: bool = _opt(False, "offload sharded parameters and optimizer state to CPU")


@dataclass(frozen=True)
class Checkpoint:
    enable: bool = _opt(False, "save DCP checkpoints and resume from the newest one")
    folder: str = _opt("checkpoint", "checkpoint folder, relative to job.dump_folder")
    interval: int = _opt(500, "save every N steps (and at the last step)")
    keep_latest_k: int = _opt(10, "keep only the newest K checkpoints (0 = keep all)")
    async_mode: str = _opt("disabled", "disabled or async (save in a background thread)",
                           choices=("disabled", "async"))
    last_save_model_only: bool = _opt(True, "the final save holds model weights only, in export_dtype")
    export_dtype: str = _opt("float32", "dtype of the final model-only save",
                             choices=("float32", "bfloat16", "float16"))
    load_step: int = _opt(-1, "resume from this step (-1 = the newest complete checkpoint)")


@dataclass(frozen=True)
class ActivationCheckpoint:
    mode: str = _opt("none", "none, full or selective", choices=("none", "full", "selective"))
    selective_ac_option: str = _opt("op", "'op' (save matmuls, recompute the rest) or N (every Nth block)")


@dataclass(frozen=True)
class Compile:
    enable: bool = _opt(False, "torch.compile each transformer block and the loss")
    components: list[str] = _opt(["model", "loss"], "what to compile: model, loss", factory=True)


@dataclass(frozen=True)
class Float8:
    enable: bool = _opt(False, "train Linear layers in float8 (same as model.converters = [\"float8\"])")
    recipe_name: str = _opt("tensorwise", "tensorwise, rowwise, rowwise_with_gw_hp or delayed",
                            choices=("tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed"))
    filter_fqns: list[str] = _opt(["output"], "Linears whose name contains any of these stay in high precision",
                                  factory=True)
    enable_fsdp_float8_all_gather: bool = _opt(False, "all-gather weights in float8 under FSDP2 "
                                                      "(tensorwise/delayed)")
    precompute_float8_dynamic_scale_for_fsdp: bool = _opt(
        False, "after optimizer.step(), compute all weight scales with one all-reduce (delayed: take the synced "
               "ones) and cast every weight shard to fp8 in one batched pass for the step's all-gathers "
               "(1 byte per local weight element)")
    amax_history_len: int = _opt(16, "delayed scaling: amax history length")
    margin: int = _opt(0, "delayed scaling: scale margin (scale / 2**margin)")
    amax_compute_algo: str = _opt("max", "delayed scaling: max over history or most_recent",
                                  choices=("max", "most_recent"))
    emulate: bool = _opt(False, "dequantise + matmul instead of _scaled_mm (GPUs without fp8 GEMMs)")
    filter_small_gemms: bool = _opt(False, "keep Linears whose fp8 GEMMs are predicted slower than bf16 at this "
                                           "micro-batch's token count in high precision (each logged with why)")
    cast_backend: Optional[str] = _opt(None, "fp8 casts: torch (ops fused by torch.compile) or triton (fused kernels: "
                                              "one amax pass + one pass writing both layouts) or triton_inline (the "
                                              "same kernels launched from torch.compile's own code: less CPU per "
                                              "call); default: the recipe's (triton for rowwise, torch otherwise)",
                                       choices=("torch", "triton", "triton_inline"))
    save_float8_for_backward: Optional[bool] = _opt(None, "save the fp8 input (both layouts cast in one forward pass) "
                                                          "for backward instead of the high-precision input; default: "
                                                          "off (compiled, the backward recasts the input inside the kernels that "
                                                          "recompute it; on: a little faster, more memory)")
    reuse_float8_weight: bool = _opt(False, "cast each weight to fp8 once per optimizer step and reuse it across "
                                            "gradient-accumulation micro-batches (not with FSDP)")


@dataclass(frozen=True)
class QAT:
    enable: bool = _opt(False, "quantization-aware training (same as model.converters = [\"qat\"])")
    scheme: str = _opt("int8_dynamic_activation_int4_weight", "fake-quantisation scheme",
                       choices=("int4_weight_only", "int8_weight_only", "int8_dynamic_activation_int4_weight",
                                "float8_dynamic"))
    group_size: int = _opt(32, "int4 group size (32, 64, 128 or 256)")
    start_step: int = _opt(0, "fake quantisation switches on at this step")
    # Empty by default, as torchao's QAT quantizers and as export.py: the serving artifact quantises the output
    # head and the embedding too (they are 40% of the debug model), so QAT must train with them quantised.
    filter_fqns: list[str] = _opt([], "Linears/embeddings whose name contains any of these are not quantised "
                                      "(export.py reads this from the checkpoint)", factory=True)
    range_learning: bool = _opt(False, "learn each weight group's quantisation scale (LSQ) instead of taking it from "
                                       "the weight's range every step; int8_dynamic_activation_int4_weight and "
                                       "int8_weight_only; export.py uses the learned scales")
    scale_lr_ratio: float = _opt(0.03, "learned scales train at this fraction of optimizer.lr, without weight decay")
    scale_init: str = _opt("range", "how learned scales start when fake quantisation switches on: the weight "
                                    "groups' ranges (where plain QAT starts), the clip with the least squared "
                                    "weight error (mse), or with the least squared output error, weighted by "
                                    "the inputs' mean squares over that step's first micro-batch (activation_mse)",
                           choices=("range", "mse", "activation_mse"))


@dataclass(frozen=True)
class Metrics:
    log_freq: int = _opt(10, "log metrics every N steps")
    enable_tensorboard: bool = _opt(True, "write TensorBoard events under job.dump_folder/tb")


@dataclass(frozen=True)
class Validation:
    enable: bool = _opt(False, "compute held-out loss periodically")
    freq: int = _opt(100, "validate every N steps (and at the last step)")
    steps: int = _opt(10, "validation batches per evaluation (-1 = the whole held-out split)")


@dataclass(frozen=True)
class Profiling:
    enable_profiling: bool = _opt(False, "capture torch.profiler traces")
    save_traces_folder: str = _opt("profile_traces", "trace folder, relative to job.dump_folder")
    profile_freq: int = _opt(100, "capture one traced step every N steps")


@dataclass(frozen=True)
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    qat: QAT = field(default_factory=QAT)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    profiling: Profiling = field(default_factory=Profiling)

    @property
    def float8_enabled(self) -> bool:
        return self.float8.enable or "float8" in self.model.converters

    @property
    def qat_enabled(self) -> bool:
        return self.qat.enable or "qat" in self.model.converters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore


# ----------------------------------------------------------------------------------------------------
# Type coercion
# ----------------------------------------------------------------------------------------------------


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(base)
    if name is None and typing.get_origin(base) is list:
        name = f"a list of {_type_name(typing.get_args(base)[0]).split(' ', 1)[1]}s"
    return name + (" or none" if optional else "")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _from_text(key: str, text: str, tp) -> Any:
    """Parse a CLI string into the field's type."""
    base, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            number = float(text)
            if not math.isfinite(number):  # inf/nan would only surface as a non-finite loss steps later
                raise ConfigError(f"--{key}: expected a finite number, got {text!r}")
            return number
        if base is str:
            return text
        if typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return [_from_text(key, p, item) for p in parts]
    except ConfigError:
        raise
    except ValueError:
        pass
    raise ConfigError(f"--{key}: expected {_type_name(tp)}, got {text!r}")


def _check_toml_value(key: str, value: Any, tp) -> Any:
    """Check a TOML value against the field's type; ints are accepted where numbers are expected."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):  # TOML has inf and nan literals
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif base is str:
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        value = str(value) if ok else value
    elif typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if isinstance(value, str):  # a comma-separated string is accepted as in the CLI
            return _from_text(key, value, tp)
        if isinstance(value, list):
            return [_check_toml_value(key, v, item) for v in value]
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_types(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _lookup(section: str, key: str, where: str):
    if section not in SECTIONS:
        raise ConfigError(f"{where}unknown section [{section}]{_did_you_mean(section, SECTIONS)}")
    types_ = _field_types(SECTIONS[section])
    if key not in types_:
        close = _did_you_mean(key, types_)
        raise ConfigError(f"{where}unknown key '{section}.{key}'" + close.replace("'", f"'{section}.", 1))
    return types_[key]


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _read_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 TOML file") from None
    values: dict[str, dict] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key '{section}' must be a [section] table"
                              f"{_did_you_mean(section, SECTIONS)}")
        for key, value in table.items():
            tp = _lookup(section, key, f"{path}: ")
            try:
                values.setdefault(section, {})[key] = _check_toml_value(f"{section}.{key}", value, tp)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    return values


def _parse_cli(argv: list[str]) -> tuple[Optional[str], dict]:
    """Split argv into the --config path and {section: {key: value}} overrides."""
    config_path = None
    values: dict[str, dict] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value")
        name, eq, inline = arg[2:].partition("=")
        if name in ("config", "job.config_file"):
            if eq:
                config_path = inline
            elif i + 1 < len(argv):
                config_path, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config: expected a path to a TOML file")
            i += 1
            continue
        if "." not in name:
            raise ConfigError(f"--{name}: options look like --section.key (e.g. --training.steps 20)")
        section, key = name.split(".", 1)
        # `--section.no_flag` turns a boolean off.
        if (not eq and key.startswith("no_") and section in SECTIONS
                and key not in _field_types(SECTIONS[section])
                and _unwrap_optional(_field_types(SECTIONS[section]).get(key[3:]))[0] is bool):
            values.setdefault(section, {})[key[3:]] = False
            i += 1
            continue
        tp = _lookup(section, key, f"--{name}: ")
        if eq:
            text = inline
        elif (_unwrap_optional(tp)[0] is bool
              and (i + 1 >= len(argv) or argv[i + 1].lower() not in _TRUE | _FALSE | {"none", "null"})):
            text = "true"  # a bare `--section.flag` (also for flags whose default None means "recipe's choice")
        elif i + 1 < len(argv):
            text, i = argv[i + 1], i + 1
        else:
            raise ConfigError(f"--{name}: expected {_type_name(tp)} after the option")
        values.setdefault(section, {})[key] = _from_text(name, text, tp)
        i += 1
    return config_path, values


def build_config(values: dict[str, dict]) -> JobConfig:
    """Make a validated JobConfig from {section: {key: value}} (missing keys take defaults)."""
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**values.get(name, {}))
    config = JobConfig(**sections)
    validate(config)
    return config


def load_config(argv: list[str] | None = None, *, toml_path: str | None = None) -> JobConfig:
    """defaults < TOML (--config or toml_path) < CLI overrides."""
    cli_path, cli_values = _parse_cli(list(argv or []))
    path = cli_path or toml_path
    values = _read_toml(path) if path else {}
    for section, table in cli_values.items():
        values.setdefault(section, {}).update(table)
    return build_config(values)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(config: JobConfig) -> None:
    for section in SECTIONS:
        obj = getattr(config, section)
        for f in dataclasses.fields(obj):
            choices = f.metadata.get("choices")
            value = getattr(obj, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{section}.{f.name}: expected one of {', '.join(choices)}, got {value!r}"
                                  f"{_did_you_mean(str(value), choices)}")

    m, o, s, t = config.model, config.optimizer, config.lr_scheduler, config.training
    _require(m.n_layers >= 0, "model.n_layers", f"must be >= 0, got {m.n_layers}")
    _require(m.vocab_size >= 0, "model.vocab_size", f"must be >= 0, got {m.vocab_size}")
    _require(m.tokenizer_vocab_size >= 256, "model.tokenizer_vocab_size",
             f"must be >= 256, got {m.tokenizer_vocab_size}")
    for c in m.converters:
        _require(c in ("float8", "qat"), "model.converters",
                 f"unknown converter {c!r}; expected float8 or qat{_did_you_mean(c, ('float8', 'qat'))}")
    if m.tokenizer_path is not None:
        _require(not os.path.isdir(m.tokenizer_path), "model.tokenizer_path",
                 f"{m.tokenizer_path} is a directory; expected a sentencepiece .model file")
        _require(os.path.isfile(m.tokenizer_path), "model.tokenizer_path",
                 f"file not found: {m.tokenizer_path}")

    _require(t.max_consecutive_skips >= 0, "training.max_consecutive_skips",
             f"must be >= 0, got {t.max_consecutive_skips}")
    _require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _require(o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps}")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas",
             f"expected two numbers in [0, 1), got {o.betas}")

    _require(s.warmup_steps >= 0, "lr_scheduler.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    _require(s.decay_ratio is None or 0 <= s.decay_ratio <= 1, "lr_scheduler.decay_ratio",
             f"must be in [0, 1], got {s.decay_ratio}")
    _require(0 <= s.min_lr_factor <= 1, "lr_scheduler.min_lr_factor",
             f"must be in [0, 1], got {s.min_lr_factor}")

    _require(t.local_batch_size >= 1, "training.local_batch_size", f"must be >= 1, got {t.local_batch_size}")
    _require(t.global_batch_size == -1 or t.global_batch_size >= 1, "training.global_batch_size",
             f"must be -1 or >= 1, got {t.global_batch_size}")
    _require(t.seq_len >= 2, "training.seq_len", f"must be >= 2, got {t.seq_len}")
    _require(t.steps >= 1, "training.steps", f"must be >= 1, got {t.steps}")
    _require(t.max_norm >= 0, "training.max_norm", f"must be >= 0, got {t.max_norm}")
    _require(t.gc_freq >= 1, "training.gc_freq", f"must be >= 1, got {t.gc_freq}")
    if t.dataset == "stdlib":
        _require(t.dataset_path is None, "training.dataset_path",
                 "must be unset for the embedded 'stdlib' corpus (set training.dataset to text/jsonl/...)")
    else:
        _require(t.dataset_path is not None, "training.dataset_path",
                 f"required for training.dataset = {t.dataset!r}")
        _require(os.path.exists(t.dataset_path), "training.dataset_path", f"not found: {t.dataset_path}")

    p = config.parallelism
    _require(p.data_parallel_shard_degree == -1 or p.data_parallel_shard_degree >= 1,
             "parallelism.data_parallel_shard_degree", f"must be -1 or >= 1, got {p.data_parallel_shard_degree}")
    _require(p.data_parallel_replicate_degree >= 1, "parallelism.data_parallel_replicate_degree",
             f"must be >= 1, got {p.data_parallel_replicate_degree}")
    _require(p.tensor_parallel_degree >= 1, "parallelism.tensor_parallel_degree",
             f"must be >= 1, got {p.tensor_parallel_degree}")

    c = config.checkpoint
    _require(c.interval >= 1, "checkpoint.interval", f"must be >= 1, got {c.interval}")
    _require(c.keep_latest_k >= 0, "checkpoint.keep_latest_k", f"must be >= 0, got {c.keep_latest_k}")
    _require(c.load_step >= -1, "checkpoint.load_step", f"must be -1 or a step >= 0, got {c.load_step}")
    _require(bool(c.folder), "checkpoint.folder", "must not be empty")

    ac = config.activation_checkpoint
    opt = ac.selective_ac_option
    _require(opt == "op" or (opt.isdigit() and int(opt) >= 1), "activation_checkpoint.selective_ac_option",
             f"expected 'op' or a positive integer, got {opt!r}")

    for comp in config.compile.components:
        _require(comp in ("model", "loss"), "compile.components",
                 f"unknown component {comp!r}; expected model or loss")

    f8 = config.float8
    _require(f8.amax_history_len >= 1, "float8.amax_history_len", f"must be >= 1, got {f8.amax_history_len}")
    _require(f8.margin >= 0, "float8.margin", f"must be >= 0, got {f8.margin}")
    if f8.enable_fsdp_float8_all_gather and config.float8_enabled:
        _require(f8.recipe_name in ("tensorwise", "delayed"), "float8.enable_fsdp_float8_all_gather",
                 f"needs recipe tensorwise or delayed, got {f8.recipe_name!r}")
    if f8.save_float8_for_backward and config.float8_enabled:
        _require(f8.recipe_name != "rowwise_with_gw_hp", "float8.save_float8_for_backward",
                 "rowwise_with_gw_hp runs grad_weight in high precision: there is no fp8 input copy to save")

    q = config.qat
    _require(q.group_size in (32, 64, 128, 256), "qat.group_size", f"expected 32, 64, 128 or 256, got {q.group_size}")
    _require(q.start_step >= 0, "qat.start_step", f"must be >= 0, got {q.start_step}")
    _require(not q.range_learning or q.scheme in ("int8_dynamic_activation_int4_weight", "int8_weight_only"),
             "qat.range_learning", f"needs symmetric integer weights (scheme int8_dynamic_activation_int4_weight or "
                                   f"int8_weight_only), got scheme {q.scheme}")
    _require(q.scale_lr_ratio > 0, "qat.scale_lr_ratio", f"must be > 0, got {q.scale_lr_ratio}")
    _require(q.scale_init == "range" or q.range_learning, "qat.scale_init",
             f"{q.scale_init} sets the starting value of learned scales: it needs qat.range_learning")

    _require(config.metrics.log_freq >= 1, "metrics.log_freq", f"must be >= 1, got {config.metrics.log_freq}")
    v = config.validation
    _require(v.freq >= 1, "validation.freq", f"must be >= 1, got {v.freq}")
    _require(v.steps == -1 or v.steps >= 1, "validation.steps", f"must be -1 or >= 1, got {v.steps}")
    _require(config.profiling.profile_freq >= 1, "profiling.profile_freq",
             f"must be >= 1, got {config.profiling.profile_freq}")


# ----------------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------------


def help_text() -> str:
    lines = [
        "usage: train.py [--config FILE.toml] [--section.key VALUE | --section.key=VALUE | --section.flag |"
        " --section.no_flag] ...",
        "",
        "Values: CLI > TOML > defaults. Lists are comma-separated (--model.converters float8,qat).",
    ]
    for section, cls in SECTIONS.items():
        lines.append("")
        lines.append(f"[{section}]")
        types_ = _field_types(cls)
        default_obj = cls()
        for f in dataclasses.fields(cls):
            default = getattr(default_obj, f.name)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_ = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_ += f" {{{'|'.join(choices)}}}"
            flag = f"--{section}.{f.name}"
            lines.append(f"  {flag:<52} {help_} (default: {shown!s}; {_type_name(types_[f.name])})")
    return "\n".join(lines)
