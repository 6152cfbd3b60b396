#!/usr/bin/env bash
# Issue 5 on the `small` flavor over a corpus it does not memorise, several seeds at once on one GPU
# (docs/qat.md, "Several seeds on a corpus the small flavor does not memorise").
#
# CORPUS is a jsonl(.xz) file made on a machine whose stdlib is the corpus wanted (this repo's CPU machines:
# Python 3.11, 9.7M training tokens; the GPU image's 3.12 has 3.2M):
#     python scripts/export_corpus.py --output .dbg/stdlib311.jsonl.xz        # here; carried to the GPU
#     MODE=trainer CORPUS=.dbg/stdlib311.jsonl.xz bash scripts/device_qat_seeds.sh   # on the GPU
# MODE=trainer: per seed, qat_experiment.py with plain QAT and with learned scales started at the mse clip.
# MODE=compare: per seed, a baseline, then qat_compare.py from its step-900 checkpoint (ours plain, ours with
# mse-started learned scales, torchao's QAT when importable). Each seed's runs go in the background together;
# an H100 runs three seeds of either mode in about 8.5 minutes. Results: $OUT (or $WORK)/s<seed>_*.json and logs.
# CONFIG, DEVICE, STEPS and QAT_START override the defaults (a CPU smoke run of the mechanics: the debug config,
# DEVICE=cpu, a few steps).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-trainer}
CORPUS=${CORPUS:?CORPUS=path to a .jsonl or .jsonl.xz corpus}
SEEDS=${SEEDS:-"1 2 3"}
WORK=${WORK:-/tmp/titan_qat_seeds}
LOGDIR=${OUT:-$WORK}
CONFIG=${CONFIG:-configs/llama3_small.toml}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1100}
QAT_START=${QAT_START:-900}
mkdir -p "$WORK" "$LOGDIR"
export TITAN_FP8_CACHE=${TITAN_FP8_CACHE:-$WORK/cache}
DATA=$WORK/corpus.jsonl
python -c "import lzma, shutil, sys; src = sys.argv[1]
shutil.copyfileobj((lzma.open if src.endswith('.xz') else open)(src, 'rb'), open(sys.argv[2], 'wb'))" "$CORPUS" "$DATA" || exit 1
# One tokenizer build before the parallel runs (they would otherwise all train it at once).
python -c "from titan_fp8.data import build_tokenizer; build_tokenizer(None, vocab_size=4096)" || exit 1
DATA_ARGS="--dataset jsonl --dataset_path $DATA"
# The config's sequence length and its schedule's lr over the QAT phase, for qat_compare's batches and lrs.
read -r SEQ _BATCH LR_MID LR_END < <(python scripts/qat_schedule.py "$CONFIG" "$STEPS" "$QAT_START")
[ -n "${LR_END:-}" ] || { echo "could not read the schedule of $CONFIG" >&2; exit 1; }

trainer_seed() {
  local s=$1 w=$WORK/s$1
  local common="--config $CONFIG --steps $STEPS --qat_start $QAT_START --group_size 256 --device $DEVICE $DATA_ARGS --seed $s"
  python scripts/qat_experiment.py $common --workdir "$w/mse" \
    --qat_args "--qat.range_learning --qat.scale_init mse" > "$LOGDIR/s${s}_mse.log" 2>&1 \
    && cp "$w/mse/results.json" "$LOGDIR/s${s}_mse.json" || return
  mkdir -p "$w/plain" && cp -r "$w/mse/baseline" "$w/plain/"  # the same baseline, reused
  python scripts/qat_experiment.py $common --workdir "$w/plain" --reuse > "$LOGDIR/s${s}_plain.log" 2>&1 \
    && cp "$w/plain/results.json" "$LOGDIR/s${s}_plain.json"
}

compare_seed() {
  local s=$1 w=$WORK/s$1
  python train.py --config "$CONFIG" --job.dump_folder "$w/baseline" --training.steps "$STEPS" --checkpoint.enable \
    --checkpoint.keep_latest_k 0 --checkpoint.interval "$QAT_START" --validation.no_enable --metrics.no_enable_tensorboard \
    --training.dataset jsonl --training.dataset_path "$DATA" --training.seed "$s" > "$LOGDIR/s${s}_train.log" 2>&1 || return
  python scripts/qat_compare.py --checkpoint "$w/baseline/checkpoint/step-$QAT_START" --steps $((STEPS - QAT_START)) \
    --lr "$LR_MID" --final_lr "$LR_END" --group_size 256 --seq_len "$SEQ" --device "$DEVICE" --scale_init mse $DATA_ARGS \
    --json "$LOGDIR/s${s}_compare.json" > "$LOGDIR/s${s}_compare.log" 2>&1
}

for s in $SEEDS; do
  case $MODE in
    trainer) trainer_seed "$s" & ;;
    compare) compare_seed "$s" & ;;
    *) echo "MODE must be trainer or compare, got $MODE" >&2; exit 2 ;;
  esac
  sleep 15  # staggered: the compile phases overlap less
done
wait
python - "$LOGDIR" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "s*.json"))):
    r = json.load(open(f))
    if "arms" in r:  # qat_compare
        print(os.path.basename(f), " ".join(f"{k} {v['recovery']:.0%}" for k, v in r["arms"].items() if "recovery" in v))
    else:
        print(os.path.basename(f), f"recovery {r['recovery_loss']:.0%} (ppl {r['recovery_ppl']:.0%})")
PY
