"""Learning-rate schedules against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.train.schedule import WarmupSchedule


def schedule(kind: str, **kwargs) -> WarmupSchedule:
    return WarmupSchedule(None, kind, **{"lr": 1e-3, "warmup_steps": 4, "max_steps": 100, **kwargs})


@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, 2.5e-4), (2, 5e-4), (4, 1e-3), (9, 1e-3 * 2 / 3), (16, 5e-4), (100, 2e-4)],
)
def test_inverse_sqrt(step, expected):
    # warmup 4: lr·s/4 up to step 4, then lr·sqrt(4/s): sqrt(4/9) = 2/3, sqrt(4/16) = 1/2, sqrt(4/100) = 1/5
    assert schedule("inverse_sqrt").lr_at(step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("step", "expected"), [(1, 0.5), (2, 1.0), (7, 0.55), (12, 0.1), (50, 0.1)])
def test_cosine(step, expected):
    # warmup 2 to lr 1, then 0.1 + 0.9·(1 + cos(π·(s-2)/10))/2: step 7 is half way (cos = 0), step 12 the end
    s = WarmupSchedule(None, "cosine", lr=1.0, warmup_steps=2, max_steps=12, min_lr=0.1)
    assert s.lr_at(step) == pytest.approx(expected, abs=1e-12)


def test_cosine_quarter_point():
    s = WarmupSchedule(None, "cosine", lr=1.0, warmup_steps=0, max_steps=8, min_lr=0.0)
    assert s.lr_at(2) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_constant_and_no_warmup():
    assert [schedule("constant").lr_at(s) for s in (1, 4, 5, 1000)] == [2.5e-4, 1e-3, 1e-3, 1e-3]
    assert schedule("inverse_sqrt", warmup_steps=0).lr_at(4) == pytest.approx(5e-4)


def test_step_sets_the_optimizer_lr_and_state_resumes_the_curve():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=123.0)
    s = WarmupSchedule(optimizer, "inverse_sqrt", lr=1e-3, warmup_steps=4, max_steps=100)
    lrs = [s.step() for _ in range(6)]
    assert lrs[0] == pytest.approx(2.5e-4) and optimizer.param_groups[0]["lr"] == lrs[-1]
    resumed = WarmupSchedule(None, "inverse_sqrt", lr=1e-3, warmup_steps=4, max_steps=100)
    resumed.load_state_dict(s.state_dict())
    assert resumed.step() == s.step()


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        WarmupSchedule(None, "linear", lr=1.0, warmup_steps=0, max_steps=1)
    with pytest.raises(ValueError, match="step counts updates from 1"):
        schedule("constant").lr_at(0)
