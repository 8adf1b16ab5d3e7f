"""Learning-rate schedules: `train.lr_scheduler` gives diffusers' schedules, step by step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import optimization as dopt

from dermaflux.config import ConfigError, load_config
from dermaflux.train.model_setup import lr_scheduler

STEPS, WARMUP, BASE_LR = 20, 4, 0.5


def lrs(scheduler, optimizer, steps=STEPS) -> list[float]:
    """The lr each optimizer step 1..steps runs at (the scheduler steps after the optimizer, as DeepSpeed does)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def ours(name, **train):
    tc = load_config("tiny", extra={"train": {"lr_scheduler": name, "steps": STEPS, "warmup_steps": WARMUP,
                                              "lr": BASE_LR, **train}}).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    return lrs(lr_scheduler(opt, tc), opt)


def reference(builder, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    return lrs(builder(opt, **kwargs), opt)


@pytest.mark.parametrize("name,builder,kwargs,train", [
    ("constant", dopt.get_constant_schedule, {}, {}),
    ("constant_with_warmup", dopt.get_constant_schedule_with_warmup, {"num_warmup_steps": WARMUP}, {}),
    ("linear", dopt.get_linear_schedule_with_warmup, {"num_warmup_steps": WARMUP, "num_training_steps": STEPS}, {}),
    ("cosine", dopt.get_cosine_schedule_with_warmup, {"num_warmup_steps": WARMUP, "num_training_steps": STEPS}, {}),
    ("cosine_with_restarts", dopt.get_cosine_with_hard_restarts_schedule_with_warmup,
     {"num_warmup_steps": WARMUP, "num_training_steps": STEPS, "num_cycles": 3}, {"lr_num_cycles": 3}),
    ("polynomial", dopt.get_polynomial_decay_schedule_with_warmup,
     {"num_warmup_steps": WARMUP, "num_training_steps": STEPS, "power": 2.0}, {"lr_power": 2.0}),
    ("piecewise_constant", dopt.get_piecewise_constant_schedule, {"step_rules": "1:5,0.1:10,0.01"},
     {"lr_step_rules": "1:5,0.1:10,0.01"}),
])
def test_schedule_matches_diffusers(name, builder, kwargs, train):
    assert ours(name, **train) == pytest.approx(reference(builder, **kwargs), abs=1e-12)


def test_schedule_values_by_hand():
    warm = ours("constant_with_warmup")
    assert warm[:WARMUP + 1] == pytest.approx([BASE_LR * k / WARMUP for k in range(WARMUP)] + [BASE_LR])
    assert set(warm[WARMUP:]) == {BASE_LR}
    cosine = ours("cosine")
    middle = WARMUP + (STEPS - WARMUP) // 2  # half-way through the decay: half the lr
    assert cosine[middle] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = ours("linear")
    assert linear[-1] == pytest.approx(BASE_LR / (STEPS - WARMUP))  # one step before zero
    assert ours("constant") == [BASE_LR] * STEPS


def test_piecewise_needs_rules():
    with pytest.raises(ConfigError, match="lr_step_rules"):
        load_config("tiny", extra={"train": {"lr_scheduler": "piecewise_constant"}})
    with pytest.raises(ConfigError, match="lr_scheduler"):
        load_config("tiny", extra={"train": {"lr_scheduler": "cosine_annealing"}})
