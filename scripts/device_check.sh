#!/usr/bin/env bash
# One call on one GPU for the numbers in docs/performance.md and docs/qat.md:
#   A (concurrently): CUDA tests of the float8 kernels and quant kernels; QAT 8da4w training of the debug
#      model, export to every scheme, generation on CUDA (tokens/s, weight memory).
#   B (alone on the GPU): scripts/bench_float8.py e2e, bf16 vs our recipes vs torchao (when carried in .whl).
# Usage on the device machine: bash scripts/device_check.sh   (logs and JSON under $OUT; about 8 minutes)
set -u
export PYTHONUNBUFFERED=1 TITAN_FP8_CACHE=/tmp/titan_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
export PATH=/opt/torch/.venv/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
E2E_VARIANTS=${E2E_VARIANTS:-bf16,tensorwise,torchao_tensorwise,rowwise,torchao_rowwise,rowwise+plain,delayed}

gpu_tests() {
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_float8_kernels.py tests/test_quant_gpu.py \
    tests/test_float8_numerics.py tests/test_float8_compile.py tests/test_model_gpu.py -k "cuda or gpu or triton"
  echo "gpu tests rc=$?"
}
qat_export_generate() {
  local w=/tmp/qat
  timeout 120 python3 train.py --config configs/debug.toml --job.dump_folder $w/run --training.steps 30 \
    --checkpoint.enable --checkpoint.interval 30 --qat.enable --qat.scheme int8_dynamic_activation_int4_weight \
    --qat.start_step 10 --metrics.log_freq 10 --metrics.no_enable_tensorboard --validation.freq 30 || echo "train rc=$?"
  for s in bf16 int4_weight_only int8_weight_only int8_dynamic_activation_int4_weight float8_dynamic; do
    python3 scripts/export.py --checkpoint $w/run/checkpoint/step-30 --scheme $s --output $w/art-$s --overwrite | tail -n 1
    echo "-- generate $s cuda"
    timeout 60 python3 scripts/generate.py --artifact $w/art-$s --prompt 'def main():' --max_new_tokens 200 --device cuda | tail -n 3
  done
  ls -l $w/art-*/model.safetensors
}
gpu_tests > "$OUT/gpu_tests.log" 2>&1 &
qat_export_generate > "$OUT/qat_gpu.log" 2>&1 &
wait
timeout ${E2E_TIMEOUT:-330} python3 scripts/bench_float8.py e2e --budget_s ${E2E_BUDGET:-250} --variants "$E2E_VARIANTS" \
  > "$OUT/e2e.log" 2>&1
echo "== gpu tests"; tail -n 6 "$OUT/gpu_tests.log"
echo "== qat/export/generate"; grep -E "rc=|step +30|tok/s|tokens/s|GiB|MiB|safetensors|rror" "$OUT/qat_gpu.log" | tail -n 30
echo "== e2e"; tail -n 14 "$OUT/e2e.log"
