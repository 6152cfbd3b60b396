"""QAT side by side with torchao's QAT: same checkpoint, same batches, same optimizer, held-out loss.

Every arm starts from the checkpoint's weights with a fresh AdamW (its moments first filled from
--warmup_batches training batches at lr 0, identical for every arm), then trains --steps steps on the
same training batches (the ones after the checkpoint's step) at --lr, constant or decaying linearly to
--final_lr:

  fp32       plain fine-tune. PTQ = its final weights fake-quantised in titan_fp8's format (and in
             torchao's, when torchao is importable)
  titan_fp8  QAT with titan_fp8.quant.prepare_qat_ (what `train.py --qat.enable` runs; every Linear, the
             output head and the token embedding). Its fake-quantised forward is the exported artifact's
             reference path bit for bit (tests/test_export.py)
  titan_fp8_range_learning
             the same with learned per-group weight scales (`--qat.range_learning`): they start where
             --scale_init says (as `--qat.scale_init`: the weights' ranges by default) and train (LSQ
             gradient) at --scale_lr_ratio x the lr, without weight decay
  torchao    torchao's Int8DynActInt4WeightQATQuantizer (every Linear) + Int4WeightOnlyEmbeddingQATQuantizer
             (when torchao is importable: `pip install -e .[bench]`)

Recovery of a QAT arm = (PTQ - QAT) / (PTQ - fp32) on held-out loss, against the PTQ of its own
library's format (the formats agree: int4 symmetric per group, scale = amax / 7.5, int8 asymmetric
per-token activations; titan_fp8 stores bf16 scales, torchao fp32). Scheme: 8da4w only (the one both have).
This is a fine-tuning comparison in its own small loop (no FSDP, no compile); scripts/qat_experiment.py is
the trainer-driven mid-run experiment.

    python scripts/qat_compare.py --checkpoint W/baseline/checkpoint/step-600 --steps 200 --lr 3e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qat_experiment import heldout_loss  # noqa: E402

SCHEME = "int8_dynamic_activation_int4_weight"


def torchao_prepare(group_size: int):
    """A function that applies torchao's 8da4w QAT fake quantisation to a model, or None without torchao."""
    try:
        from torchao.quantization.qat import Int4WeightOnlyEmbeddingQATQuantizer, Int8DynActInt4WeightQATQuantizer
    except Exception:  # torchao absent or not importable with this torch
        return None

    def prepare(model):
        Int8DynActInt4WeightQATQuantizer(groupsize=group_size).prepare(model)
        Int4WeightOnlyEmbeddingQATQuantizer(group_size=group_size).prepare(model)
        return model

    return prepare


def fine_tune(model, train_batches, warm_batches, *, lr: float, final_lr: float, weight_decay: float, max_norm: float,
              scale_lr_ratio: float, device) -> float:
    """Train in place; returns seconds. Same optimizer, parameter groups and clipping as the trainer."""
    from titan_fp8.optim import build_optimizer
    from titan_fp8.quant import LEARNED_SCALE_NAME

    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, name="AdamW", lr=1.0, eps=1e-8, weight_decay=weight_decay, betas=(0.9, 0.95),
                          implementation="foreach", lr_ratio_by_suffix={LEARNED_SCALE_NAME: scale_lr_ratio})
    ratios = [group["lr"] for group in opt.param_groups]  # built at lr 1: each group's lr ratio

    def step(x, y, step_lr):
        for group, ratio in zip(opt.param_groups, ratios):
            group["lr"] = step_lr * ratio
        loss = F.cross_entropy(model(x.to(device)).flatten(0, 1).float(), y.to(device).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for x, y in warm_batches:  # lr 0: fills Adam's moments, changes no weight
        step(x, y, 0.0)
    t0 = time.perf_counter()
    n = len(train_batches)
    for i, (x, y) in enumerate(train_batches):
        step(x, y, lr + (final_lr - lr) * (i / (n - 1) if n > 1 else 0.0))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint folder (step-N or step-N-model)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of every arm at the first step")
    p.add_argument("--final_lr", type=float, default=None,
                   help="linear decay from --lr to this at the last step (default: constant --lr)")
    p.add_argument("--group_size", type=int, default=256, choices=(32, 64, 128, 256))
    p.add_argument("--local_batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--eval_seq_len", type=int, default=256,
                   help="held-out batches: the whole validation split in rows of this length (256 x 8: the same "
                        "batches as scripts/qat_experiment.py)")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--warmup_batches", type=int, default=10)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--max_norm", type=float, default=1.0)
    p.add_argument("--scale_lr_ratio", type=float, default=0.03,
                   help="learned scales' lr / the lr (titan_fp8_range_learning arm; as --qat.scale_lr_ratio)")
    p.add_argument("--scale_init", default="range", choices=("range", "mse", "activation_mse"),
                   help="where the titan_fp8_range_learning arm's scales start (as --qat.scale_init; activation_mse: "
                        "statistics of the first training batch, as the trainer)")
    p.add_argument("--data_offset", type=int, default=0,
                   help="skip this many more training batches (repeats on other data)")
    p.add_argument("--dataset", default="stdlib")
    p.add_argument("--dataset_path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_torchao", action="store_true")
    p.add_argument("--no_range_learning", action="store_true", help="skip the titan_fp8_range_learning arm")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    final_lr = a.lr if a.final_lr is None else a.final_lr
    if min(a.steps, a.warmup_batches, a.data_offset, a.lr, final_lr) < 0:
        print("error: --steps, --warmup_batches, --data_offset, --lr and --final_lr must be >= 0", file=sys.stderr)
        return 2
    if min(a.seq_len, a.local_batch_size, a.eval_seq_len, a.eval_batch_size) < 1:
        print("error: --seq_len, --local_batch_size, --eval_seq_len and --eval_batch_size must be >= 1", file=sys.stderr)
        return 2

    import export as export_script

    from titan_fp8.data import build_dataloader
    from titan_fp8.quant import (QuantScheme, calibrate_learned_scales_, initialize_learned_scales_, prepare_qat_,
                                 set_fake_quant_)

    try:
        base, manifest = export_script.load_checkpoint(a.checkpoint)
        tok, _ = export_script.resolve_tokenizer(None, None, manifest, base.args.vocab_size)
    except (export_script.ExportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if device.type == "cuda":  # TF32 matmuls (fp32 storage and accumulation): every arm alike, 3-6x faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base = base.to(device)  # the RoPE table too: a (non-persistent) buffer
    scheme = QuantScheme.from_name(SCHEME, group_size=a.group_size)
    ours_prepare = lambda m: prepare_qat_(m, scheme)  # noqa: E731

    def ours_range_learning_prepare(m):
        prepare_qat_(m, scheme, range_learning=True)
        if a.scale_init == "activation_mse":  # the float model's inputs on the first training batch
            set_fake_quant_(m, False)
            calibrate_learned_scales_(m, lambda: m(train[0][0].to(device)))
            set_fake_quant_(m, True)
        initialize_learned_scales_(m, a.scale_init)

    ao_prepare = None if a.no_torchao else torchao_prepare(a.group_size)

    def data(split, infinite, seq_len, batch_size):
        return build_dataloader(dataset=a.dataset, dataset_path=a.dataset_path, tokenizer=tok, seq_len=seq_len,
                                local_batch_size=batch_size, split=split, infinite=infinite)

    start = int(manifest.get("step", 0)) + a.data_offset  # continue the data where the checkpoint stopped
    it = iter(data("train", True, a.seq_len, a.local_batch_size))
    batches = [next(it) for _ in range(start + a.warmup_batches + a.steps)][start:]
    warm, train = batches[:a.warmup_batches], batches[a.warmup_batches:]
    val = list(data("validation", False, a.eval_seq_len, a.eval_batch_size))

    def arm(prepare):
        model = copy.deepcopy(base)
        if prepare is not None:
            prepare(model)
        secs = fine_tune(model, train, warm, lr=a.lr, final_lr=final_lr, weight_decay=a.weight_decay,
                         max_norm=a.max_norm, scale_lr_ratio=a.scale_lr_ratio, device=device)
        return model, secs

    res = {"checkpoint": a.checkpoint, "first_batch": start, "steps": a.steps, "lr": a.lr, "final_lr": final_lr,
           "group_size": a.group_size, "scale_lr_ratio": a.scale_lr_ratio, "scale_init": a.scale_init,
           "scheme": SCHEME, "heldout_tokens": sum(y.numel() for _, y in val), "torch": torch.__version__,
           "device": str(device), "arms": {}}
    model, secs = arm(None)
    fp32 = heldout_loss(model, val, device)
    res["arms"]["fp32"] = {"loss": fp32, "seconds": secs}
    ptq = {"titan_fp8": heldout_loss(_fake_quantised(model, ours_prepare), val, device)}
    if ao_prepare is not None:
        ptq["torchao"] = heldout_loss(_fake_quantised(model, ao_prepare), val, device)
    print(f"[qat_compare] fp32 fine-tune: {fp32:.4f}; PTQ " + ", ".join(f"{k} {v:.4f}" for k, v in ptq.items()),
          flush=True)
    arms = (("titan_fp8", ours_prepare, "titan_fp8"),
            ("titan_fp8_range_learning", None if a.no_range_learning else ours_range_learning_prepare, "titan_fp8"),
            ("torchao", ao_prepare, "torchao"))
    for name, prepare, fmt in arms:
        if prepare is None:
            res["arms"][name] = {"skipped": "--no_range_learning" if fmt == "titan_fp8" else
                                 "--no_torchao" if a.no_torchao else "torchao not importable"}
            continue
        model, secs = arm(prepare)
        qat = heldout_loss(model, val, device)
        gap = ptq[fmt] - fp32
        rec = (ptq[fmt] - qat) / gap if gap > 0 else float("nan")
        res["arms"][name] = {"ptq_loss": ptq[fmt], "qat_loss": qat, "recovery": rec, "seconds": secs,
                             "ptq_ppl": math.exp(ptq[fmt]), "qat_ppl": math.exp(qat)}
        print(f"[qat_compare] {name}: PTQ {ptq[fmt]:.4f}, QAT {qat:.4f}: recovers {rec:.0%} of PTQ's degradation "
              f"({secs:.0f} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _fake_quantised(model, prepare):
    """A copy of model with fake quantisation applied (in place): the PTQ model of that library's format."""
    quantised = copy.deepcopy(model)
    prepare(quantised)
    return quantised


if __name__ == "__main__":
    sys.exit(main())
