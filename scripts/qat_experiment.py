"""QAT vs PTQ on the debug model (CPU, ~10 minutes) or a bigger one (GPU): how much of PTQ's damage does QAT recover?

Three models, same data, same number of steps, same schedule:
  baseline  train.py on --config (default configs/debug.toml) for --steps steps (the debug config trains
            in fp32: mixed_precision_param = float32; configs/llama3_small.toml in bf16)
  PTQ       the baseline's final checkpoint exported with --scheme (default 8da4w)
  QAT       resume the baseline's checkpoint at --qat_start (default steps/2) with `--qat.enable` (fake
            quantisation of every Linear and the embedding: `--qat.filter_fqns ""`, as export
            quantises) and train to --steps; then exported with the same scheme
The quantised models are the real artifacts, loaded by scripts/generate.py's loader and run with the
kernels of --device. Held-out loss is the mean next-token cross-entropy over the whole validation split of the
embedded corpus (27 batches of 8 x 256 tokens with Python 3.11's standard library). Recovery = (L_ptq - L_qat) / (L_ptq - L_base), also on
perplexity (torchao's ~68% is on wikitext perplexity for Llama3-8B).

    python scripts/qat_experiment.py --workdir /tmp/qat_exp            # writes results.json + results.md

On one GPU, the "small" flavor (76M parameters in the blocks; scripts/device_qat_scale.sh):

    python scripts/qat_experiment.py --config configs/llama3_small.toml --steps 1100 --qat_start 900 \
        --group_size 256 --device cuda

--dataset / --dataset_path / --seed apply to both training runs and (dataset) the held-out split, e.g. another
machine's stdlib carried as jsonl (scripts/export_corpus.py) so that a GPU image with a different Python trains
on the same documents: --dataset jsonl --dataset_path stdlib311.jsonl --seed 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import torch  # noqa: E402

QAT_SCHEME = "int8_dynamic_activation_int4_weight"


def train(workdir: str, name: str, config: str, steps: int, extra: list[str]) -> float:
    dump = os.path.join(workdir, name)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", config,
           "--job.dump_folder", dump, "--training.steps", str(steps), "--checkpoint.enable",
           "--checkpoint.keep_latest_k", "0", "--validation.no_enable", "--metrics.no_enable_tensorboard",
           "--metrics.log_freq", "50", *extra]
    t0 = time.perf_counter()
    print(f"[qat_experiment] {name}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


@torch.no_grad()
def heldout_loss(model, batches, device=None) -> float:
    """Mean next-token cross-entropy of model over batches (moved to device when given)."""
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        logits = model(x)
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        n += y.numel()
    return total / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/titan_fp8_qat_experiment")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "debug.toml"),
                   help="trainer config of both runs (configs/llama3_small.toml: the GPU-sized experiment)")
    p.add_argument("--device", default="cpu", help="where the held-out losses are computed (cpu or cuda)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--qat_start", type=int, default=None, help="default: steps // 2")
    p.add_argument("--scheme", default=QAT_SCHEME)
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--reuse", action="store_true", help="reuse finished training runs in --workdir")
    p.add_argument("--dataset", default=None,
                   help="training.dataset for both runs and the held-out split (default: the config's)")
    p.add_argument("--dataset_path", default=None, help="training.dataset_path, with --dataset")
    p.add_argument("--seed", type=int, default=None, help="training.seed of both runs (default: the config's)")
    p.add_argument("--qat_args", default="",
                   help="more trainer flags for the QAT run, e.g. \"--qat.range_learning --qat.scale_init activation_mse\"")
    a = p.parse_args(argv)
    if a.dataset_path and not a.dataset:
        p.error("--dataset_path needs --dataset (text, jsonl, parquet or hf)")
    start = a.qat_start or a.steps // 2
    os.makedirs(a.workdir, exist_ok=True)
    from titan_fp8.config import load_config

    training = load_config(["--config", a.config]).training
    dataset = a.dataset or training.dataset
    dataset_path = a.dataset_path if a.dataset else training.dataset_path
    # Both runs read the same data with the same seed; the QAT run resumes the baseline's data position.
    data_args = ["--training.dataset", dataset] + (["--training.dataset_path", dataset_path] if dataset_path else [])
    if a.seed is not None:
        data_args += ["--training.seed", str(a.seed)]

    import export as export_script
    import generate as generate_script

    from titan_fp8.data import build_dataloader, build_tokenizer
    from titan_fp8.quant import QuantScheme, prepare_qat_

    timings = {}
    base_ckpt = os.path.join(a.workdir, "baseline", "checkpoint")
    if not (a.reuse and os.path.isdir(os.path.join(base_ckpt, f"step-{a.steps}"))):
        shutil.rmtree(os.path.join(a.workdir, "baseline"), ignore_errors=True)
        timings["baseline_train_s"] = train(a.workdir, "baseline", a.config, a.steps,
                                            ["--checkpoint.interval", str(start), *data_args])
    qat_ckpt = os.path.join(a.workdir, "qat", "checkpoint")
    if not (a.reuse and os.path.isdir(os.path.join(qat_ckpt, f"step-{a.steps}"))):
        shutil.rmtree(os.path.join(a.workdir, "qat"), ignore_errors=True)
        os.makedirs(qat_ckpt)
        shutil.copytree(os.path.join(base_ckpt, f"step-{start}"), os.path.join(qat_ckpt, f"step-{start}"))
        timings["qat_train_s"] = train(a.workdir, "qat", a.config, a.steps, [
            "--checkpoint.interval", str(a.steps), "--qat.enable", "--qat.scheme", a.scheme,
            "--qat.group_size", str(a.group_size), "--qat.start_step", str(start + 1), "--qat.filter_fqns", "",
            *data_args, *a.qat_args.split()])

    tok = build_tokenizer(None, vocab_size=4096)
    batches = list(build_dataloader(dataset=dataset, dataset_path=dataset_path, tokenizer=tok, seq_len=256,
                                    local_batch_size=8, split="validation", infinite=False))
    n_tokens = sum(y.numel() for _, y in batches)
    rows = []
    device = torch.device(a.device)

    def add(name, loss, size=None, note=""):
        rows.append({"model": name, "loss": loss, "ppl": math.exp(loss), "artifact_bytes": size, "note": note})
        print(f"[qat_experiment] {name:40s} loss {loss:.4f}  ppl {math.exp(loss):8.3f}  {note}", flush=True)

    base_model, _ = export_script.load_checkpoint(os.path.join(base_ckpt, f"step-{a.steps}"))
    add("baseline (fp32)", heldout_loss(base_model.to(device), batches, device))
    qat_model, _ = export_script.load_checkpoint(os.path.join(qat_ckpt, f"step-{a.steps}"))
    add("QAT weights, not quantised (fp32)", heldout_loss(qat_model.to(device), batches, device), note="for reference")
    # The same two models fake-quantised in fp32 (the QAT forward, activations included): tells the artifact's
    # kernels apart from the quantisation itself.
    qat_scheme = QuantScheme.from_name(a.scheme, group_size=a.group_size)
    prepare_qat_(base_model, qat_scheme)
    add(f"PTQ {a.scheme}, fake-quantised (fp32)", heldout_loss(base_model, batches, device), note="reference path")
    if "--qat.range_learning" in a.qat_args.split():  # the QAT run's learned scales, loaded with its weights
        learned = lambda m: prepare_qat_(m, qat_scheme, range_learning=True)  # noqa: E731
        qat_model, _ = export_script.load_checkpoint(os.path.join(qat_ckpt, f"step-{a.steps}"), learned)
    else:
        prepare_qat_(qat_model, qat_scheme)
    add(f"QAT {a.scheme}, fake-quantised (fp32)", heldout_loss(qat_model.to(device), batches, device),
        note="reference path")
    del base_model, qat_model

    arts = os.path.join(a.workdir, "artifacts")
    for label, ckpt, scheme in [("baseline", base_ckpt, "bf16"), ("PTQ", base_ckpt, a.scheme), ("QAT", qat_ckpt, a.scheme),
                                ("PTQ", base_ckpt, "int4_weight_only"), ("PTQ", base_ckpt, "int8_weight_only"),
                                ("PTQ", base_ckpt, "float8_dynamic")]:
        out = os.path.join(arts, f"{label}-{scheme}")
        config, _ = export_script.export(os.path.join(ckpt, f"step-{a.steps}"), scheme, out,
                                         group_size=a.group_size, overwrite=True)
        model, _, _, kernels = generate_script.load_model(out, device=device)
        kinds = sorted(set(kernels.converted.values())) if kernels and kernels.converted else ["float"]
        add(f"{label} {scheme} artifact", heldout_loss(model, batches, device), config["files"]["model.safetensors"]["size"],
            note=f"kernels {','.join(kinds)}")

    by = {r["model"]: r for r in rows}
    base, ptq, qat = by["baseline (fp32)"], by[f"PTQ {a.scheme} artifact"], by[f"QAT {a.scheme} artifact"]
    rec_loss = (ptq["loss"] - qat["loss"]) / (ptq["loss"] - base["loss"])
    rec_ppl = (ptq["ppl"] - qat["ppl"]) / (ptq["ppl"] - base["ppl"])
    result = {"steps": a.steps, "qat_start": start, "scheme": a.scheme, "group_size": a.group_size,
              "heldout_tokens": n_tokens, "rows": rows, "recovery_loss": rec_loss, "recovery_ppl": rec_ppl,
              "config": os.path.relpath(a.config, REPO), "dataset": dataset, "seed": a.seed,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **timings}
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    bf16 = by["baseline bf16 artifact"]["artifact_bytes"]
    lines = ["| model | held-out loss | perplexity | artifact | vs bf16 |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        size = f"{r['artifact_bytes'] / 2**20:.2f} MiB" if r["artifact_bytes"] else ""
        ratio = f"{r['artifact_bytes'] / bf16:.3f}x" if r["artifact_bytes"] else ""
        lines.append(f"| {r['model']} | {r['loss']:.4f} | {r['ppl']:.3f} | {size} | {ratio} |")
    lines.append("")
    lines.append(f"PTQ degradation: +{ptq['loss'] - base['loss']:.4f} loss (+{ptq['ppl'] - base['ppl']:.3f} ppl); "
                 f"QAT: {qat['loss'] - base['loss']:+.4f} loss ({qat['ppl'] - base['ppl']:+.3f} ppl). "
                 f"QAT recovers {rec_loss:.0%} of PTQ's loss degradation, {rec_ppl:.0%} of its perplexity degradation.")
    text = "\n".join(lines)
    with open(os.path.join(a.workdir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
