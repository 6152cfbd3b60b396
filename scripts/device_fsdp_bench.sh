#!/usr/bin/env bash
# FSDP2 end-to-end throughput on 2 GPUs: bf16 vs float8 tensorwise (+ fp8 all-gather + precomputed scales)
# vs float8 rowwise, through scripts/run_train.sh, on the Llama3-8B shapes with 4 layers
# (batch 2 x 8192 per GPU, vocab 128256, bf16 params / fp32 reduce, per-block compile, selective op AC).
#
#   OUT=/tmp/bench scripts/device_fsdp_bench.sh            # writes $OUT/fsdp_bench.json and $OUT/<recipe>.log
#
# The runs' dump folders (metrics.jsonl, ...) and exit codes go to DUMP (default $OUT): on the device tool, whose
# $OUT returns at most 8 files, set DUMP=/tmp/fsdp_dump so that only the JSON, gpus.txt and the logs come back.
#
# Prints one table: tokens/s per GPU (steps 11..STEPS, tokens over wall time), peak active memory (max over
# ranks), MFU against the card's bf16 dense peak (as torchtitan reports it, for fp8 recipes too), last loss.
# Budget: ~8 minutes on 2x H100 (cold compile caches); a recipe that fails or runs past RUN_TIMEOUT is
# reported as such and the others still run.
#
# The full model (issue 7's run on fewer GPUs): N_LAYERS=32 LOCAL_BATCH=1 NGPU=4 STEPS=100 RUN_TIMEOUT=290.
#
# Environment: OUT (default ./outputs/fsdp_bench), NGPU (2), STEPS (30), RUN_TIMEOUT (seconds per recipe, 170),
# N_LAYERS (4; the 8B flavor has 32), LOCAL_BATCH (sequences of 8192 per GPU, 2), LOG_FREQ (10: a log step reads
# the loss and waits for the GPU; logging every step cost tensorwise ~3 % on 4 H100s),
# BUDGET (seconds for all recipes, 510: a recipe gets min(RUN_TIMEOUT, what is left); under 60 s left it is skipped),
# RECIPES (default "bf16 tensorwise rowwise"; "delayed" also works), EXTRA_ARGS (appended to every run).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/fsdp_bench}
NGPU=${NGPU:-2}
STEPS=${STEPS:-30}
RUN_TIMEOUT=${RUN_TIMEOUT:-170}
RECIPES=${RECIPES:-bf16 tensorwise rowwise}
N_LAYERS=${N_LAYERS:-4}
LOCAL_BATCH=${LOCAL_BATCH:-2}
LOG_FREQ=${LOG_FREQ:-10}
BUDGET=${BUDGET:-510}  # seconds for all runs (the device allows 600 per command)
DUMP=${DUMP:-$OUT}
mkdir -p "$OUT" "$DUMP"
export TITAN_FP8_CACHE=${TITAN_FP8_CACHE:-/tmp/titan_fp8_cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/titan_fp8_inductor_cache}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python - <<'PY' || exit 1
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPUs")
# Train/cache the embedded-corpus tokenizer once, before two ranks race to do it.
from titan_fp8.data import build_tokenizer
build_tokenizer(None, vocab_size=4096)
PY

COMMON=(--model.n_layers "$N_LAYERS" --training.seq_len 8192 --training.local_batch_size "$LOCAL_BATCH" --training.steps "$STEPS"
        --compile.enable --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op
        --training.mixed_precision_param bfloat16 --training.mixed_precision_reduce float32
        --metrics.log_freq "$LOG_FREQ" --metrics.no_enable_tensorboard --validation.no_enable --checkpoint.no_enable)

recipe_args() {
    case "$1" in
        bf16) echo "--float8.no_enable" ;;
        tensorwise) echo "--float8.enable --float8.recipe_name tensorwise --float8.enable_fsdp_float8_all_gather --float8.precompute_float8_dynamic_scale_for_fsdp" ;;
        rowwise) echo "--float8.enable --float8.recipe_name rowwise --float8.no_enable_fsdp_float8_all_gather --float8.no_precompute_float8_dynamic_scale_for_fsdp" ;;
        delayed) echo "--float8.enable --float8.recipe_name delayed --float8.enable_fsdp_float8_all_gather --float8.precompute_float8_dynamic_scale_for_fsdp" ;;
        *) echo "unknown recipe $1" >&2; return 1 ;;
    esac
}

for recipe in $RECIPES; do
    elapsed=$(( $(date +%s) - start ))
    remaining=$(( BUDGET - elapsed ))
    if (( remaining < 60 )); then
        echo "=== $recipe: skipped (${elapsed}s elapsed of the ${BUDGET}s budget)" | tee "$OUT/$recipe.log"
        echo "skipped" > "$DUMP/$recipe.rc"
        continue
    fi
    limit=$(( remaining < RUN_TIMEOUT ? remaining : RUN_TIMEOUT ))
    rm -rf "${DUMP:?}/$recipe"
    # shellcheck disable=SC2046
    args=("${COMMON[@]}" $(recipe_args "$recipe") ${EXTRA_ARGS:-} --job.dump_folder "$DUMP/$recipe")
    echo "=== $recipe: NGPU=$NGPU CONFIG_FILE=configs/llama3_8b.toml scripts/run_train.sh ${args[*]}"
    t0=$(date +%s)
    NGPU=$NGPU CONFIG_FILE=configs/llama3_8b.toml timeout --kill-after=15 "$limit" \
        scripts/run_train.sh "${args[@]}" > "$OUT/$recipe.log" 2>&1
    rc=$?
    echo "$rc" > "$DUMP/$recipe.rc"
    echo "=== $recipe: exit $rc after $(( $(date +%s) - t0 ))s"
    grep -E "step +($STEPS|1) |Error|error:" "$OUT/$recipe.log" | tail -n 4
done

python - "$OUT" "$STEPS" "$RECIPES" "$NGPU" "${EXTRA_ARGS:-}" "$N_LAYERS" "$LOCAL_BATCH" "$DUMP" <<'PY'
import json, os, platform, subprocess, sys

out, steps, recipes, ngpu, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5]
n_layers, local_batch, dump = int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
first_measured = 11 if steps >= 20 else max(2, steps // 2)
if (n_layers, local_batch) == (4, 2):
    # torchao under FSDP2 on 2x H100, same shapes and settings (ARCHITECTURE.md "Measured anchors").
    torchao = {"source": "measured, 2x H100, 4 layers, batch 2 x 8192 per GPU",
               "bf16": {"tps": 51782, "memory_gib": 48.4}, "tensorwise": {"speedup": 1.17, "memory_gib": 49.7},
               "rowwise": {"speedup": 1.07}}
else:
    # torchao's README table: the whole Llama3-8B, 8x H100, batch 1 x 8192 per GPU, selective AC, compile.
    torchao = {"source": "torchao README, 8x H100, full Llama3-8B, batch 1 x 8192 per GPU",
               "bf16": {"tps": 6150, "memory_gib": 47.65}, "tensorwise": {"speedup": 1.2503, "memory_gib": 47.77},
               "rowwise": {"speedup": 1.1005, "memory_gib": 47.79}}
rows = {}
for recipe in recipes:
    rc_path = os.path.join(dump, f"{recipe}.rc")
    rc = open(rc_path).read().strip() if os.path.exists(rc_path) else "missing"
    path = os.path.join(dump, recipe, "metrics.jsonl")
    records = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    train = [r for r in records if "loss" in r]
    measured = [r for r in train if r["step"] >= first_measured and r.get("tps")]
    row = {"exit": rc, "steps_logged": len(train), "steps_measured": len(measured)}
    if measured:
        row["tps_per_gpu"] = len(measured) / sum(1.0 / r["tps"] for r in measured)  # tokens / wall time
        row["mfu_pct"] = (sum(r["mfu"] for r in measured) / len(measured)) if measured[0].get("mfu") is not None else None
        row["tflops_per_gpu"] = sum(r["tflops"] for r in measured) / len(measured)
    if train:
        row["peak_memory_gib"] = max(r.get("memory_gib") or 0 for r in train)
        row["peak_reserved_gib"] = max(r.get("memory_reserved_gib") or 0 for r in train)
        row["first_loss"], row["last_loss"] = train[0]["loss"], train[-1]["loss"]
    rows[recipe] = row
base = rows.get("bf16", {}).get("tps_per_gpu")
for recipe, row in rows.items():
    if base and row.get("tps_per_gpu"):
        row["speedup_vs_bf16"] = row["tps_per_gpu"] / base
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines()
except OSError:
    gpu = []
import torch
result = {"what": f"FSDP2 {ngpu}-GPU e2e: Llama3-8B shapes, {n_layers} layers, batch {local_batch} x 8192 per GPU, "
                  "vocab 128256, bf16 params, "
                  "fp32 reduce, per-block compile, selective op AC, fused AdamW"
                  + (f"; overridden by EXTRA_ARGS: {extra}" if extra else ""),
          "gpus": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
          "steps": steps, "measured_from_step": first_measured, "recipes": rows, "torchao_reference": torchao}
with open(os.path.join(out, "fsdp_bench.json"), "w") as f:
    json.dump(result, f, indent=1)

def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"

print()
print(f"FSDP2 on {len(gpu)}x {gpu[0] if gpu else '?'} (torch {torch.__version__}), steps {first_measured}-{steps}:")
print(f"{'recipe':<11} {'tok/s/GPU':>10} {'vs bf16':>8} {'peak GiB':>9} {'MFU %':>6} {'loss':>7}  exit")
for recipe, row in rows.items():
    print(f"{recipe:<11} {fmt(row.get('tps_per_gpu'), ',.0f'):>10} {fmt(row.get('speedup_vs_bf16'), '.3f'):>8} "
          f"{fmt(row.get('peak_memory_gib'), '.1f'):>9} {fmt(row.get('mfu_pct'), '.1f'):>6} "
          f"{fmt(row.get('last_loss'), '.3f'):>7}  {row['exit']}")
print(f"torchao reference ({torchao['source']}): bf16 {torchao['bf16']['tps']:,} tok/s/GPU "
      f"{torchao['bf16']['memory_gib']} GiB; tensorwise+fp8 all-gather {torchao['tensorwise']['speedup']:.2f}x "
      f"{torchao['tensorwise']['memory_gib']} GiB; rowwise {torchao['rowwise']['speedup']:.2f}x")
print(f"JSON: {os.path.join(out, 'fsdp_bench.json')}")
PY
echo "total $(( $(date +%s) - start ))s"
