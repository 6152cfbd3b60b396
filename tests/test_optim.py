import math

import pytest
import torch

from titan_fp8.optim import build_lr_scheduler, build_optimizer, lr_factor


def _factors(**kw):
    return [lr_factor(s, **kw) for s in range(kw["total_steps"])]


def test_warmup_then_linear_decay():
    f = _factors(warmup_steps=4, total_steps=14, decay_type="linear", decay_ratio=None, min_lr_factor=0.0)
    assert f[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert f[4] == 1.0                              # peak right after warmup
    assert all(a > b for a, b in zip(f[4:], f[5:]))  # strictly decreasing
    assert f[-1] == pytest.approx(0.1)


def test_wsd_stable_phase_and_min_factor():
    f = _factors(warmup_steps=2, total_steps=12, decay_type="cosine", decay_ratio=0.5, min_lr_factor=0.2)
    assert f[2:7] == [1.0] * 5                      # stable until the last 50% of post-warmup steps
    assert f[7] == pytest.approx(1.0)
    assert min(f) >= 0.2 and f[-1] < 1.0


def test_sqrt_decay_shape():
    f = _factors(warmup_steps=0, total_steps=5, decay_type="sqrt", decay_ratio=None, min_lr_factor=0.0)
    assert f == pytest.approx([1 - math.sqrt(p / 5) for p in range(5)])


def test_scheduler_and_optimizer_build():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, name="AdamW", lr=1e-2, eps=1e-8, weight_decay=0.1, betas=(0.9, 0.95),
                          implementation="foreach")
    sched = build_lr_scheduler(opt, warmup_steps=1, total_steps=3, decay_type="linear", decay_ratio=None,
                               min_lr_factor=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-2)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
