#!/usr/bin/env bash
# One-GPU device checks: GPU tests, the debug job, an 8B-shaped job with 4 layers, per-Linear float8 bench.
# Usage on the device machine: bash scripts/device_smoke.sh   (writes logs and JSON under $OUT)
set -u
export PYTHONUNBUFFERED=1 TITAN_FP8_CACHE=/tmp/titan_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_model_gpu.py tests/test_float8_numerics.py tests/test_float8_compile.py \
  -k "gpu or cuda" 2>&1 | tail -4
python3 train.py --config configs/debug.toml --job.dump_folder /tmp/dbg --training.steps 100 --metrics.log_freq 25 \
  2>&1 | grep -E "step +(25|50|75|100) |error" | tee "$OUT/debug_gpu.log"
for recipe in bf16 tensorwise rowwise; do
  extra=""; [ "$recipe" != bf16 ] && extra="--float8.enable --float8.recipe_name $recipe"
  python3 train.py --config configs/llama3_8b.toml --model.n_layers 4 --training.local_batch_size 2 \
    --training.steps 25 --metrics.log_freq 5 --job.dump_folder /tmp/b8_$recipe --metrics.no_enable_tensorboard $extra \
    2>&1 | grep -E "step +(20|25) |error|Error" | tee "$OUT/llama8b4_$recipe.log"
done
