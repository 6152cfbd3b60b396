"""Export a training checkpoint to a serving artifact (safetensors + config.json + tokenizer).

    python scripts/export.py --checkpoint outputs/debug/checkpoint/step-200 \
        --scheme int8_dynamic_activation_int4_weight --output artifacts/debug-8da4w

Schemes: bf16 (no quantisation), int4_weight_only, int8_weight_only, int8_dynamic_activation_int4_weight,
float8_dynamic. Quantised: every Linear (the output head included) and the token embedding whose name
matches none of --filter_fqns (default: none, as a QAT run with `--qat.filter_fqns ""`). Weights are
quantised from the checkpoint's full-precision weights, with the same functions QAT fake-quantises with,
so exporting a QAT checkpoint with its QAT scheme, group size and filter reproduces its fake-quantised
forward. A QAT run with `--qat.range_learning` saved its learned scales: exported with its QAT scheme and
group size, each module uses them (modules without one: the weight's range). Norm weights stay in --dtype
(bfloat16).

The checkpoint is a `step-N/` folder (its manifest.json holds the model args) or the final
`step-N-model/` (the args are read from a sibling `step-*/manifest.json`). The tokenizer: --tokenizer
PATH, else the embedded-corpus BPE of --tokenizer_vocab_size (default: the model's vocab size; pass the
trainer's `model.tokenizer_vocab_size` when the model vocabulary was padded).

Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from titan_fp8.quant import (LEARNED_SCALE_NAME, SCHEMES, ArtifactError, QuantizedTensor,  # noqa: E402
                             QuantScheme, prepare_qat_, quantize_, save_artifact)

EXPORT_SCHEMES = ("bf16",) + SCHEMES
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExportError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint
# --------------------------------------------------------------------------------------------------


def read_manifest(checkpoint: str) -> dict:
    """The manifest of `checkpoint`, or of a sibling step-N folder for a `step-N-model` save."""
    if not os.path.isdir(checkpoint):
        raise ExportError(f"--checkpoint {checkpoint}: not a directory")
    candidates = [os.path.join(checkpoint, "manifest.json")]
    if not os.path.isfile(candidates[0]):
        parent = os.path.dirname(os.path.abspath(checkpoint))
        m = re.match(r"^step-(\d+)-model$", os.path.basename(os.path.abspath(checkpoint)))
        if m:
            candidates.append(os.path.join(parent, f"step-{m.group(1)}", "manifest.json"))
        candidates += sorted(glob.glob(os.path.join(parent, "step-*", "manifest.json")), reverse=True)
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    manifest = json.load(f)
            except (OSError, ValueError) as e:
                raise ExportError(f"{path}: unreadable manifest ({e})") from None
            if isinstance(manifest, dict) and isinstance(manifest.get("model_args"), dict):
                return manifest
            raise ExportError(f"{path}: manifest has no model_args")
    raise ExportError(f"--checkpoint {checkpoint}: no manifest.json with model_args here or in a sibling "
                      "step-N folder (pass a step-N checkpoint folder)")


def build_model(model_args: dict, device: str | torch.device = "meta"):
    """A Transformer for `model_args` (a dict of ModelArgs fields) on `device`."""
    from titan_fp8.models import Transformer
    from titan_fp8.models.llama3 import ModelArgs

    try:
        args = ModelArgs(**model_args)
    except (TypeError, ValueError) as e:
        raise ExportError(f"model_args: {e}") from None
    with torch.device(device):
        return Transformer(args)


def load_checkpoint(checkpoint: str, prepare=None):
    """(model in fp32 on CPU with the checkpoint's weights, manifest).

    prepare(model): runs on the built model before loading (e.g. QAT prepare with range learning, so that
    the learned scales load too). Learned scales the checkpoint lacks stay zero (= use the weight's range).
    """
    import warnings

    import torch.distributed.checkpoint as dcp

    from titan_fp8.models.llama3 import precompute_rope_cache

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")

    manifest = read_manifest(checkpoint)
    model = build_model(manifest["model_args"])
    if prepare is not None:
        prepare(model)
    model.to_empty(device="cpu")
    state = model.state_dict()
    learned = [k for k in state if k.endswith("." + LEARNED_SCALE_NAME)]
    if learned:
        with torch.no_grad():
            for k in learned:
                state[k].zero_()
        saved = _saved_model_keys(checkpoint)
        state = {k: v for k, v in state.items() if k in saved or k not in learned}
    try:
        dcp.load({"model": state}, checkpoint_id=checkpoint)
    except Exception as e:  # DCP raises deep errors (missing keys, shapes, truncated files)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ExportError(f"{checkpoint}: cannot load the model weights ({lines[-1] if lines else type(e).__name__})") from None
    model.rope_cache = precompute_rope_cache(model.args)
    return model.eval(), manifest


def _saved_model_keys(checkpoint: str) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    except Exception as e:
        raise ExportError(f"{checkpoint}: cannot read the DCP metadata ({type(e).__name__})") from None
    return {k[len("model."):] for k in keys if k.startswith("model.")}


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def resolve_tokenizer(path: str | None, vocab_size: int | None, manifest: dict, model_vocab: int):
    from titan_fp8.data import build_tokenizer

    recorded = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    path = path or recorded.get("path")
    if path:
        source = os.path.abspath(path)
    else:
        vocab_size = vocab_size or recorded.get("vocab_size") or model_vocab
        source = f"embedded stdlib BPE, vocab {vocab_size}"
    try:
        tok = build_tokenizer(path, vocab_size=vocab_size or model_vocab)
    except (ValueError, OSError) as e:
        raise ExportError(f"tokenizer: {e}") from None
    if tok.vocab_size > model_vocab:
        raise ExportError(f"tokenizer {tok.model_path} has {tok.vocab_size} tokens, more than the model's vocab "
                          f"{model_vocab}; pass the tokenizer the model was trained with (--tokenizer)")
    return tok, {"source": source, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def export(checkpoint: str, scheme: str, output: str, *, group_size: int | None = None,
           filter_fqns: list[str] | None = None, dtype: str = "bfloat16", tokenizer: str | None = None,
           tokenizer_vocab_size: int | None = None, overwrite: bool = False):
    """Write the artifact; returns (config dict, QuantReport or None for bf16)."""
    if scheme not in EXPORT_SCHEMES:
        raise ExportError(f"--scheme: expected one of {', '.join(EXPORT_SCHEMES)}, got {scheme!r}")
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        if not overwrite:
            raise ExportError(f"--output {output} exists and is not empty (pass --overwrite)")
        shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
    torch_dtype = _DTYPES[dtype]
    manifest = read_manifest(checkpoint)
    qat = manifest.get("qat") if isinstance(manifest.get("qat"), dict) else {}
    if group_size is None:
        group_size = int(qat.get("group_size", 32))
    if filter_fqns is None:
        filter_fqns = list(qat.get("filter_fqns", []))
    qscheme = None
    if scheme != "bf16":
        try:
            qscheme = QuantScheme.from_name(scheme, group_size)
        except ValueError as e:
            raise ExportError(f"--group_size: {e}") from None
    # Learned scales belong to the QAT run's scheme and group size; any other export quantises from ranges.
    learned = (qscheme is not None and bool(qat.get("range_learning")) and qat.get("scheme") == scheme
               and qscheme.group_size in (0, qat.get("group_size")))
    prepare = (lambda m: prepare_qat_(m, qscheme, filter_fqns, range_learning=True)) if learned else None
    model, manifest = load_checkpoint(checkpoint, prepare)
    tok, tok_info = resolve_tokenizer(tokenizer, tokenizer_vocab_size, manifest, model.args.vocab_size)

    report, stored_group = None, 0
    if qscheme is not None:
        stored_group = qscheme.group_size  # 0 for the per-channel schemes
        report = quantize_(model, qscheme, filter_fqns, dtype=torch_dtype)
        if not report.converted:
            raise ExportError(f"--filter_fqns {filter_fqns}: nothing left to quantise")
    state = {k: v if isinstance(v, QuantizedTensor) or not v.is_floating_point() else v.to(torch_dtype)
             for k, v in model.state_dict().items()}
    step = manifest.get("step")
    config = save_artifact(
        output, state, scheme=scheme, group_size=stored_group, dtype=torch_dtype,
        model_args=manifest["model_args"], tokenizer_path=tok.model_path, tokenizer_info=tok_info,
        source={"checkpoint": os.path.abspath(checkpoint), "step": step, "filter_fqns": filter_fqns,
                "quantized": sorted(report.converted) if report else [],
                "kept": report.skipped if report else {}, "time": time.time()})
    return config, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a step-N (or step-N-model) checkpoint folder")
    p.add_argument("--scheme", required=True, choices=EXPORT_SCHEMES)
    p.add_argument("--output", required=True, help="artifact directory to write")
    p.add_argument("--group_size", type=int, default=None,
                   help="int4 group size: 32, 64, 128, 256 (default: the checkpoint's QAT group size, else 32)")
    p.add_argument("--filter_fqns", default=None,
                   help="comma-separated: modules whose name contains any of these stay in --dtype "
                        "(default: none; e.g. 'output' to keep the head)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(_DTYPES),
                   help="dtype of unquantised tensors and compute dtype recorded for the quantised ones")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model the model was trained with")
    p.add_argument("--tokenizer_vocab_size", type=int, default=None,
                   help="vocab of the embedded-corpus BPE (default: the model's vocab size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    filter_fqns = None if a.filter_fqns is None else [s.strip() for s in a.filter_fqns.split(",") if s.strip()]
    try:
        config, report = export(a.checkpoint, a.scheme, a.output, group_size=a.group_size, filter_fqns=filter_fqns,
                        dtype=a.dtype, tokenizer=a.tokenizer, tokenizer_vocab_size=a.tokenizer_vocab_size,
                        overwrite=a.overwrite)
    except (ExportError, ArtifactError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = config["files"]["model.safetensors"]["size"]
    what = f"{len(report.converted)} modules quantised, {len(report.skipped)} kept in {a.dtype}" if report \
        else f"all weights in {a.dtype}"
    print(f"exported {a.checkpoint} -> {a.output}: scheme {a.scheme}"
          + (f" (group {config['group_size']})" if config["group_size"] else "")
          + f", {what}; model.safetensors {size:,} bytes ({size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
