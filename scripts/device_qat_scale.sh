#!/usr/bin/env bash
# Issue 5 on a bigger model than the debug one: the "small" flavor (76M parameters in the blocks) trained on one GPU
# for 1100 steps of 8 x 1024 tokens on the embedded corpus (configs/llama3_small.toml), then
#   1. scripts/qat_experiment.py: trainer-driven QAT 8da4w over the last QAT_START..STEPS steps of the schedule
#      vs the bf16 baseline and its PTQ, all three as exported artifacts (the issue's acceptance experiment);
#   2. scripts/qat_compare.py from the same mid-run checkpoint: plain fine-tune vs our QAT vs torchao's QAT on
#      the same batches with the schedule's learning rates (torchao when importable);
#   3. scripts/qat_compare.py as a fine-tune of the finished model at its final learning rate (the
#      FINETUNE_STEPS batches after 10 warm-up batches after STEPS).
# About 4.5 minutes on an H200 (263 s, 2026-11-27). Results in $OUT (or $WORK): qat_scale_*.json / .md and the log.
#
#   bash scripts/device_qat_scale.sh
#
# CONFIG, DEVICE, STEPS, QAT_START, GROUP and FINETUNE_STEPS override the defaults (a CPU smoke run of the
# mechanics: a shrunken copy of the config with DEVICE=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/titan_qat_scale}
LOGDIR=${OUT:-$WORK}
CONFIG=${CONFIG:-configs/llama3_small.toml}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1100}
QAT_START=${QAT_START:-900}
GROUP=${GROUP:-256}
FINETUNE_STEPS=${FINETUNE_STEPS:-70}
mkdir -p "$WORK" "$LOGDIR"
exec > >(tee "$LOGDIR/device_qat_scale.log") 2>&1
export TITAN_FP8_CACHE=${TITAN_FP8_CACHE:-$WORK/cache}

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

# The config's batch shape and schedule, for qat_compare's data and learning rates.
read -r SEQ BATCH LR_MID LR_END < <(python scripts/qat_schedule.py "$CONFIG" "$STEPS" "$QAT_START")
echo "seq $SEQ batch $BATCH; mid-run lr $LR_MID -> $LR_END"
python - "$SEQ" "$BATCH" <<'PY'
import sys
from titan_fp8.data import build_dataloader, build_tokenizer
seq, batch = int(sys.argv[1]), int(sys.argv[2])
n = sum(1 for _ in build_dataloader(dataset="stdlib", dataset_path=None, tokenizer=build_tokenizer(None, vocab_size=4096),
                                    seq_len=seq, local_batch_size=batch, split="train", infinite=False))
print(f"one epoch of the training split = {n} batches of {batch} x {seq}")
PY

echo "== 1. trainer-driven: baseline $STEPS steps, QAT from step $QAT_START, exported artifacts"
# A failure after the baseline (the QAT run or an export) still leaves its checkpoints for steps 2 and 3.
if python scripts/qat_experiment.py --config "$CONFIG" --workdir "$WORK/exp" --steps "$STEPS" \
    --qat_start "$QAT_START" --group_size "$GROUP" --device "$DEVICE"; then
  cp "$WORK/exp/results.json" "$LOGDIR/qat_scale_experiment.json"
  cp "$WORK/exp/results.md" "$LOGDIR/qat_scale_experiment.md"
else
  echo "!! step 1 failed (exit $?); going on with the baseline's checkpoints"
fi

CKPT=$WORK/exp/baseline/checkpoint
echo "== 2. side by side with torchao: mid-run (from step $QAT_START, lr $LR_MID -> $LR_END)"
python scripts/qat_compare.py --checkpoint "$CKPT/step-$QAT_START" --steps $((STEPS - QAT_START)) --lr "$LR_MID" \
  --final_lr "$LR_END" --group_size "$GROUP" --seq_len "$SEQ" --local_batch_size "$BATCH" --device "$DEVICE" \
  --no_range_learning --json "$LOGDIR/qat_scale_compare_midrun.json"

echo "== 3. side by side with torchao: fine-tune of the finished model (lr $LR_END, $FINETUNE_STEPS steps)"
python scripts/qat_compare.py --checkpoint "$CKPT/step-$STEPS" --steps "$FINETUNE_STEPS" --lr "$LR_END" \
  --group_size "$GROUP" --seq_len "$SEQ" --local_batch_size "$BATCH" --device "$DEVICE" \
  --no_range_learning --json "$LOGDIR/qat_scale_compare_finetune.json"
echo "== done"
