#!/usr/bin/env bash
# Train on one machine: torchrun --standalone with NGPU ranks, extra arguments passed to train.py.
#
#   NGPU=8 CONFIG_FILE=configs/llama3_8b.toml scripts/run_train.sh --training.steps 100
#   NGPU=2 scripts/run_train.sh --float8.enable --float8.recipe_name tensorwise --float8.enable_fsdp_float8_all_gather
#
# Environment (all optional):
#   NGPU          ranks to start (default: the number of visible GPUs, 1 without GPUs; CPU ranks use gloo)
#   CONFIG_FILE   TOML config (default configs/debug.toml)
#   LOG_RANK      comma-separated local ranks whose output is shown (default 0; all ranks still run)
#   TORCHRUN      launcher command (default: torchrun)
# SIGTERM and SIGUSR1 sent to this script reach every rank (torchrun forwards them): each finishes its step,
# writes a checkpoint (with --checkpoint.enable) and exits 0; torchrun itself then exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${NGPU:-}" ]]; then
    NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "${NGPU}" -ge 1 ]] || NGPU=1
fi
CONFIG_FILE=${CONFIG_FILE:-configs/debug.toml}
LOG_RANK=${LOG_RANK:-0}

# torchrun forwards these to the ranks (default list + SLURM's preemption warning); give ranks time to
# finish the step and checkpoint before it kills them.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
# Fewer allocator retries under FSDP's changing buffer sizes.
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}

exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node="${NGPU}" \
    --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
    train.py --config "${CONFIG_FILE}" "$@"
