"""The one learning-rate schedule every system steps: linear warm-up, then constant or a cosine to 0 at the end."""

import math

import pytest
import torch

from ldm.systems.optim import AdamW, lr_factor, warmup_schedule


def test_warmup_then_constant():
    assert [lr_factor(s, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0) == lr_factor(10**6) == 1.0


def test_cosine_runs_from_the_end_of_warmup_to_zero_at_the_last_step():
    assert lr_factor(0, total=100, decay="cosine") == 1.0
    assert lr_factor(50, total=100, decay="cosine") == pytest.approx(0.5)
    assert lr_factor(100, total=100, decay="cosine") == 0.0 == lr_factor(150, total=100, decay="cosine")
    # with warm-up, the cosine spans the remaining steps: half-way between step 10 and 110 is step 60
    assert lr_factor(9, warmup=10, total=110, decay="cosine") == 1.0
    assert lr_factor(60, warmup=10, total=110, decay="cosine") == pytest.approx(0.5)
    assert lr_factor(35, warmup=10, total=110, decay="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(50, total=None, decay="cosine") == 1.0  # an unbounded fit does not decay


def test_unknown_decay_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, decay="linear")
    with pytest.raises(ValueError, match="decay"):
        AdamW(decay="step")


def test_the_scheduler_applies_lr_factor_per_step():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = warmup_schedule(opt, warmup=2, total=6, decay="cosine")
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, 2, 6, "cosine") for s in range(6)])


def test_adamw_builds_lightnings_answer():
    params = [torch.nn.Parameter(torch.zeros(3))]
    out = AdamW(lr=1e-3, weight_decay=0.01, warmup_steps=5).build(params, total=100)
    assert isinstance(out["optimizer"], torch.optim.AdamW) and out["lr_scheduler"]["interval"] == "step"
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3 / 5)  # warm-up's first step
