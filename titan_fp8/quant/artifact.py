"""The serving artifact: a directory with `model.safetensors`, `config.json` and `tokenizer.model`.

model.safetensors   plain tensors only. A float parameter is stored under its name (`norm.weight`); a
                    quantised one as its fields under `<param>.<field>` (`layers.0.attention.wq.weight.qdata`,
                    `.scale`, `.zero_point`). The header's `__metadata__` holds `format`, `format_version`
                    and `titan_fp8` = JSON {scheme, group_size, dtype, model_args, tensors} (see config.json).
config.json         {"format": "titan_fp8.quantized", "format_version": 1, "scheme", "group_size", "dtype",
                     "model_args": {...ModelArgs fields}, "tokenizer": {"file", "sha256", "vocab_size",
                     "bos_id", "eos_id", "source"}, "tensors": {name: {"kind": "plain"|"quantized", "shape",
                     "dtype", ["scheme", "group_size", "block_size", "fields"]}}, "files": {name: {"size",
                     "sha256"}}, "source": {...}}
tokenizer.model     the sentencepiece model, copied.

Loading (`read_artifact`) reads JSON and safetensors only -- nothing is unpickled -- and checks, in order:
format and version, file sizes (truncation), sha256 (tampering), that the safetensors header agrees with
config.json, that every listed tensor exists with its dtype and shape and no other tensor does, and
that each quantised tensor's fields fit its scheme. `install_state_` then checks the tensors against a
model's parameters (missing, unexpected, shape). Every failure is an `ArtifactError` with a one-line message.

Imports only torch and safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

import torch
import torch.nn as nn

from .schemes import QuantScheme
from .tensor import QuantizedTensor

__all__ = ["ArtifactError", "FORMAT", "FORMAT_VERSION", "save_artifact", "read_artifact", "install_state_",
           "sha256_file", "WEIGHTS_FILE", "CONFIG_FILE", "TOKENIZER_FILE"]

FORMAT = "titan_fp8.quantized"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"

_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.uint8, torch.int32,
    torch.int64)}


class ArtifactError(ValueError):
    """An artifact that cannot be used; the message is one line naming the problem."""


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _parse_dtype(name: Any, where: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ArtifactError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[name]


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def _flatten(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}

    def put(key: str, t: torch.Tensor) -> None:
        if key in tensors:
            raise ValueError(f"two tensors would be stored under {key!r}")
        tensors[key] = t.detach().contiguous().cpu()

    for name, t in state.items():
        if isinstance(t, QuantizedTensor):
            fields = t.fields()
            entries[name] = {"kind": "quantized", "scheme": t.scheme.name, "group_size": t.scheme.group_size,
                             "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "block_size": list(t.block_size),
                             "fields": sorted(fields)}
            for field, v in fields.items():
                put(f"{name}.{field}", v)
        else:
            entries[name] = {"kind": "plain", "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
            put(name, t)
    return tensors, entries


def save_artifact(out_dir: str, state: dict[str, torch.Tensor], *, scheme: str, group_size: int, dtype: torch.dtype,
                  model_args: dict, tokenizer_path: Optional[str] = None, tokenizer_info: Optional[dict] = None,
                  source: Optional[dict] = None) -> dict:
    """Write the artifact directory (files written under temporary names, config.json last). Returns config."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors, entries = _flatten(state)
    header = {"scheme": scheme, "group_size": group_size, "dtype": _dtype_name(dtype), "model_args": model_args,
              "tensors": entries}
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(tensors, weights + ".tmp", metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                                   "titan_fp8": json.dumps(header, sort_keys=True)})
    os.replace(weights + ".tmp", weights)
    files = {WEIGHTS_FILE: {"size": os.path.getsize(weights), "sha256": sha256_file(weights)}}
    tok = None
    if tokenizer_path is not None:
        dst = os.path.join(out_dir, TOKENIZER_FILE)
        shutil.copyfile(tokenizer_path, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
        files[TOKENIZER_FILE] = {"size": os.path.getsize(dst), "sha256": sha256_file(dst)}
        tok = dict(tokenizer_info or {}, file=TOKENIZER_FILE, sha256=files[TOKENIZER_FILE]["sha256"])
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **header, "tokenizer": tok, "files": files,
              "source": source or {}}
    path = os.path.join(out_dir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return config


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not a directory")
    if not os.path.isfile(cfg_path):
        raise ArtifactError(f"{path}: not an artifact (no {CONFIG_FILE})")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{cfg_path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_path}: not a {FORMAT} artifact (format={config.get('format') if isinstance(config, dict) else None!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{cfg_path}: unsupported format_version {version!r} (this loader reads version {FORMAT_VERSION})")
    for key, kind in (("scheme", str), ("dtype", str), ("model_args", dict), ("tensors", dict), ("files", dict)):
        if not isinstance(config.get(key), kind):
            raise ArtifactError(f"{cfg_path}: field {key!r} missing or not a {kind.__name__}")
    return config


def _check_file(path: str, name: str, record: Any, verify_checksum: bool) -> str:
    full = os.path.join(path, name)
    if not isinstance(record, dict) or not isinstance(record.get("size"), int) or not isinstance(record.get("sha256"), str):
        raise ArtifactError(f"{path}/{CONFIG_FILE}: no size/sha256 recorded for {name}")
    if not os.path.isfile(full):
        raise ArtifactError(f"{full}: file missing")
    size = os.path.getsize(full)
    if size != record["size"]:
        raise ArtifactError(f"{full}: {size} bytes, expected {record['size']} (truncated or modified after export)")
    if verify_checksum and sha256_file(full) != record["sha256"]:
        raise ArtifactError(f"{full}: sha256 mismatch (the file was modified after export)")
    return full


def read_artifact(path: str, *, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                  verify_checksum: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate and load an artifact. Returns (config, {param name: Tensor | QuantizedTensor}).

    dtype: compute dtype for the model (float tensors are cast to it, quantised ones take it as their
    logical dtype); default: the dtype recorded at export.
    """
    from safetensors import SafetensorError, safe_open

    config = _read_config(path)
    weights = _check_file(path, WEIGHTS_FILE, config["files"].get(WEIGHTS_FILE), verify_checksum)
    if config.get("tokenizer") is not None:
        _check_file(path, TOKENIZER_FILE, config["files"].get(TOKENIZER_FILE), verify_checksum)
    dtype = dtype or _parse_dtype(config["dtype"], "config.json dtype")
    device = torch.device(device)
    entries = config["tensors"]
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(weights, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
                raise ArtifactError(f"{weights}: header says format {meta.get('format')!r} version "
                                    f"{meta.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
            try:
                header = json.loads(meta.get("titan_fp8", ""))
            except json.JSONDecodeError:
                raise ArtifactError(f"{weights}: header metadata 'titan_fp8' is not valid JSON") from None
            for key in ("scheme", "group_size", "dtype", "model_args", "tensors"):
                if header.get(key) != config.get(key):
                    raise ArtifactError(f"{path}: {CONFIG_FILE} and {WEIGHTS_FILE} disagree on {key!r}")
            keys = set(f.keys())
            expected = set()
            for name, e in entries.items():
                expected.update([name] if e.get("kind") == "plain" else (f"{name}.{fld}" for fld in e.get("fields", [])))
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            if missing:
                raise ArtifactError(f"{weights}: missing tensor {missing[0]}"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            if unexpected:
                raise ArtifactError(f"{weights}: unexpected tensor {unexpected[0]} (not listed in {CONFIG_FILE})")
            for name, e in entries.items():
                state[name] = _load_entry(f, name, e, dtype)
    except ArtifactError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()
        raise ArtifactError(f"{weights}: cannot read ({msg[0] if msg else type(e).__name__})") from None
    return config, state


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A copy in freshly allocated memory. On CPU safetensors maps the file, and a tensor's offset in it
    depends on the header's length: the CPU int8/int4 kernels use aligned vector loads and crash
    (SIGSEGV) on a misaligned pointer. The copy also detaches the model from later changes to the file."""
    return t.clone() if t.device.type == "cpu" else t


def _load_entry(f, name: str, e: dict, dtype: torch.dtype) -> torch.Tensor:
    where = f"tensor {name}"
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ArtifactError(f"{where}: bad shape {shape!r} in {CONFIG_FILE}")
    stored_dtype = _parse_dtype(e.get("dtype"), where)
    if e.get("kind") == "plain":
        t = _owned(f.get_tensor(name))
        if list(t.shape) != shape or t.dtype != stored_dtype:
            raise ArtifactError(f"{where}: stored {tuple(t.shape)} {t.dtype}, config says {tuple(shape)} {stored_dtype}")
        return t.to(dtype) if t.is_floating_point() else t
    if e.get("kind") != "quantized":
        raise ArtifactError(f"{where}: unknown kind {e.get('kind')!r}")
    try:
        scheme = QuantScheme.from_name(e.get("scheme"), e.get("group_size") or 32)
    except ValueError as err:
        raise ArtifactError(f"{where}: {err}") from None
    if scheme.group_size != e.get("group_size") or list(e.get("block_size") or []) != [1, scheme.group_size or shape[-1]]:
        raise ArtifactError(f"{where}: group_size/block_size {e.get('group_size')}/{e.get('block_size')} do not fit "
                            f"scheme {scheme.name}")
    fields = {fld: _owned(f.get_tensor(f"{name}.{fld}")) for fld in e.get("fields", [])}
    unknown = set(fields) - {"qdata", "scale", "zero_point"}
    if unknown:
        raise ArtifactError(f"{where}: unknown fields {sorted(unknown)}")
    try:
        return QuantizedTensor.from_tensors(fields.get("qdata"), fields.get("scale"), fields.get("zero_point"),
                                            scheme=scheme, shape=shape, dtype=dtype)
    except ValueError as err:
        raise ArtifactError(f"{where}: {err}") from None


# --------------------------------------------------------------------------------------------------
# Install into a model
# --------------------------------------------------------------------------------------------------


def install_state_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make `state` the model's parameters and persistent buffers (the model may live on the meta device).

    Every state_dict entry of the model must be present with the same shape, and nothing else.
    """
    expected = model.state_dict(keep_vars=True)
    missing = [n for n in expected if n not in state]
    if missing:
        raise ArtifactError(f"missing tensor {missing[0]} (the model has it, the artifact does not)"
                            + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        raise ArtifactError(f"unexpected tensor {unexpected[0]} (not a parameter or buffer of the model)")
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ArtifactError(f"shape mismatch for {name}: artifact {tuple(got.shape)}, model {tuple(want.shape)}")
    for name, t in state.items():
        prefix, _, leaf = name.rpartition(".")
        module = model.get_submodule(prefix) if prefix else model
        if leaf in module._parameters:
            setattr(module, leaf, nn.Parameter(t, requires_grad=False))
        else:
            module._buffers[leaf] = t
