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


def test_suffix_groups_train_at_a_ratio_without_decay_and_the_schedule_resumes_across_group_counts():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight_scale = torch.nn.Parameter(torch.ones(4, 1))
    kw = dict(name="AdamW", lr=1e-2, eps=1e-8, weight_decay=0.1, betas=(0.9, 0.95), implementation="foreach")
    opt = build_optimizer(model, **kw, lr_ratio_by_suffix={"weight_scale": 0.25})
    main, scales = opt.param_groups
    assert len(main["params"]) == 4 and main["weight_decay"] == 0.1
    assert scales["params"] == [model[1].weight_scale] and scales["weight_decay"] == 0.0 and scales["lr"] == 2.5e-3
    sched_kw = dict(warmup_steps=2, total_steps=10, decay_type="linear", decay_ratio=None, min_lr_factor=0.0)
    sched = build_lr_scheduler(opt, **sched_kw)
    # A checkpoint of a run with one group (no learned scales) at step 5 resumes into this two-group run.
    plain = build_optimizer(torch.nn.Linear(4, 4), **kw)
    old = build_lr_scheduler(plain, **sched_kw)
    for _ in range(5):
        plain.step()
        old.step()
    sched.load_state_dict(old.state_dict())
    assert sched.last_epoch == 5 and sched.base_lrs == [1e-2, 2.5e-3]
    opt.step()
    sched.step()
    factor = lr_factor(6, **sched_kw)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 * factor, 2.5e-3 * factor])
