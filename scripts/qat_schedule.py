"""Print a config's batch shape and its schedule's lr over a QAT phase, for the device QAT scripts.

    python scripts/qat_schedule.py CONFIG STEPS QAT_START   ->   "seq_len local_batch_size lr_first lr_last"

Trainer step i+1 runs at lr(i), so a QAT phase over steps QAT_START+1..STEPS of a STEPS-step run runs at
lr(QAT_START)..lr(STEPS-1): what qat_compare.py's --lr / --final_lr take to follow the same schedule.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from titan_fp8.config import load_config  # noqa: E402
from titan_fp8.optim import lr_factor  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: qat_schedule.py CONFIG STEPS QAT_START", file=sys.stderr)
        return 2
    cfg = load_config(["--config", argv[0]])
    steps, start = int(argv[1]), int(argv[2])
    s = cfg.lr_scheduler

    def lr(i: int) -> float:
        return cfg.optimizer.lr * lr_factor(i, warmup_steps=s.warmup_steps, total_steps=steps,
                                            decay_type=s.decay_type, decay_ratio=s.decay_ratio,
                                            min_lr_factor=s.min_lr_factor)

    print(cfg.training.seq_len, cfg.training.local_batch_size, lr(start), lr(steps - 1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
