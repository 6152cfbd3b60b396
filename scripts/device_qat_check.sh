#!/usr/bin/env bash
# Issue 5 on one GPU (written for an H100, torch 2.11 + CUDA 13): QAT training with checkpoints, export to
# every scheme, generation on CUDA with the low-precision kernels (and with --reference_kernels, and on CPU,
# for comparison), kernel-vs-reference numerics (tests/test_quant_gpu.py) and per-Linear kernel timings at
# Llama3-8B shapes (scripts/quant_kernel_bench.py). About 3-5 minutes.
#
#   bash scripts/device_qat_check.sh
#
# Work files go to $WORK (default /tmp/titan_qat_check); the log goes to $OUT/device_qat_check.log when $OUT
# is set (the device runner's result folder), else to $WORK. Needs the package's dependencies installed
# (pip install -e '.[dev]' with the CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/titan_qat_check}
LOGDIR=${OUT:-$WORK}
mkdir -p "$WORK" "$LOGDIR"
exec > >(tee "$LOGDIR/device_qat_check.log") 2>&1
export TITAN_FP8_CACHE=${TITAN_FP8_CACHE:-$WORK/cache}
PROMPT='def main():'

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'sm', torch.cuda.get_device_capability(0))"

echo "== kernels vs reference on CUDA"
python -m pytest -q tests/test_quant_gpu.py

echo "== Linear timings (Llama3-8B shapes, bf16 activations, int4 group 128)"
python scripts/quant_kernel_bench.py --device cuda

echo "== QAT training: debug model, 8da4w fake quantisation from step 10, checkpoints at 20 and 40"
rm -rf "$WORK/run"
python train.py --config configs/debug.toml --job.dump_folder "$WORK/run" --training.steps 40 \
  --checkpoint.enable --checkpoint.interval 20 --qat.enable --qat.scheme int8_dynamic_activation_int4_weight \
  --qat.start_step 10 --metrics.log_freq 10 --metrics.no_enable_tensorboard --validation.freq 20

echo "== export + generate per scheme"
for s in bf16 int4_weight_only int8_weight_only int8_dynamic_activation_int4_weight float8_dynamic; do
  python scripts/export.py --checkpoint "$WORK/run/checkpoint/step-40" --scheme "$s" --output "$WORK/art-$s" --overwrite
  echo "-- $s, CUDA, low-precision kernels"
  python scripts/generate.py --artifact "$WORK/art-$s" --prompt "$PROMPT" --max_new_tokens 200 --device cuda
  echo "-- $s, CUDA, --reference_kernels (dequantise)"
  python scripts/generate.py --artifact "$WORK/art-$s" --prompt "$PROMPT" --max_new_tokens 200 --device cuda --reference_kernels | tail -n 1
  echo "-- $s, CPU"
  python scripts/generate.py --artifact "$WORK/art-$s" --prompt "$PROMPT" --max_new_tokens 100 --device cpu | tail -n 1
done
ls -l "$WORK"/art-*/model.safetensors
echo "== done"
