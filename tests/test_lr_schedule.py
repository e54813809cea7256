"""train.schedule comes from transformers.get_scheduler: the curves match their closed forms (the
earlier hand-written ones for linear, cosine and constant), device-tensor learning rates are
updated in place, bad settings are refused by key, and a crashed run with a WSD schedule resumes
bit-exact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leanlora.config import ConfigError
from leanlora.train.loop import train
from leanlora.train.lr_schedule import build_scheduler
from leanlora.train.runconfig import TrainConfig, load_run_config
from train_fixtures import Crash, crash_after_saving, resumable_run_yaml

QUIET = dict(progress=False, log=lambda *_: None)


def _optimizer(lrs=(1.0, 0.5)) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def _factors(tc: TrainConfig, total: int, log=print) -> list[float]:
    """The multiplier of group 0's lr used by each step 0..total-1."""
    opt = _optimizer()
    sched = build_scheduler(opt, tc, total, log)
    out = []
    for _ in range(total):
        out.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return out


def _curve(total: int, warmup: int, after) -> list[float]:
    """Linear warm-up from 0, then ``after(progress)`` with progress from 0 to 1 over the rest."""
    return [s / warmup if s < warmup else after((s - warmup) / (total - warmup)) for s in range(total)]


def test_linear_cosine_and_constant_match_the_closed_forms():
    total, warmup = 50, 3  # ceil(0.06 * 50)
    expected = {
        "linear": _curve(total, warmup, lambda p: max(0.0, 1 - p)),
        "cosine": _curve(total, warmup, lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        "constant": _curve(total, warmup, lambda p: 1.0),  # with a warm-up: constant_with_warmup
    }
    lines: list[str] = []
    for name, want in expected.items():
        got = _factors(TrainConfig(schedule=name, warmup_ratio=0.06), total, lines.append)
        assert got == pytest.approx(want, abs=1e-12), name
    assert any("runs as transformers' constant_with_warmup" in line for line in lines)
    assert _factors(TrainConfig(schedule="constant", warmup_ratio=0), 5) == [1.0] * 5


def test_warmup_steps_override_the_ratio_and_cosine_ends_at_its_minimum():
    got = _factors(TrainConfig(schedule="cosine_with_min_lr", warmup_steps=4, warmup_ratio=0.5, min_lr_ratio=0.1), 20)
    assert got[:4] == pytest.approx([0, 0.25, 0.5, 0.75])
    p = [(s - 4) / 16 for s in range(4, 20)]
    assert got[4:] == pytest.approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q)) for q in p])
    assert min(got[4:]) > 0.1


def test_a_warmup_longer_than_the_run_is_named_with_the_rate_it_reaches():
    lines: list[str] = []
    got = _factors(TrainConfig(schedule="linear", warmup_steps=100, lr=2e-4), 10, lines.append)
    assert got == pytest.approx([s / 100 for s in range(10)])  # the run is all warm-up
    assert lines == ["warning: train.warmup_steps=100 is longer than the run's 10 optimizer steps: the learning "
                     "rate rises all run and reaches 9% of train.lr=0.0002; lower train.warmup_steps or set it to 0 "
                     "and use train.warmup_ratio"]
    quiet: list[str] = []
    _factors(TrainConfig(schedule="linear", warmup_steps=10), 10, quiet.append)
    assert quiet == []


def test_warmup_stable_decay_holds_the_rate_then_decays_over_its_fraction():
    total, m = 40, 0.05
    got = _factors(TrainConfig(schedule="warmup_stable_decay", warmup_steps=4, decay_ratio=0.25, min_lr_ratio=m,
                               decay_type="linear"), total)
    assert got[:4] == pytest.approx([m + (1 - m) * s / 4 for s in range(4)])   # warm-up starts at the minimum
    assert got[4:30] == [1.0] * 26                                                 # stable: 40 - 4 - 10 steps
    assert got[30:] == pytest.approx([m + (1 - m) * (1 - (s - 30) / 10) for s in range(30, 40)])


def test_device_tensor_learning_rates_are_filled_in_place():
    # a captured step (step_graph.capturable_optimizer) turns each group's lr into a 0-dim tensor
    # after the scheduler was built; the graph reads those very tensors at every replay
    opt = _optimizer()
    sched = build_scheduler(opt, TrainConfig(schedule="cosine", warmup_steps=2), 10)
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]))
    held = [g["lr"] for g in opt.param_groups]
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] is t for g, t in zip(opt.param_groups, held)] == [True, True]
    factor = 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert [float(t) for t in held] == pytest.approx([factor, 0.5 * factor])


@pytest.mark.parametrize("override,message", [
    ("train.schedule=cosine_warm", r"train.schedule='cosine_warm' is invalid: allowed \['linear', 'cosine'"),
    ("train.min_lr_ratio=0.1", r"train.min_lr_ratio=0.1 applies to train.schedule in \['cosine_with_min_lr'"),
    ("train.decay_type=exp", r"train.decay_type='exp' is invalid"),
    ("train.warmup_steps=-1", r"train.warmup_steps=-1 is invalid"),
])
def test_bad_schedule_settings_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_a_wsd_schedule_longer_than_the_run_is_refused():
    tc = TrainConfig(schedule="warmup_stable_decay", warmup_steps=6, decay_ratio=0.5)
    with pytest.raises(ConfigError, match="6 warm-up \\+ 5 decay steps .* exceed the run's 10 steps"):
        build_scheduler(_optimizer(), tc, 10)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return resumable_run_yaml(tmp_path_factory.mktemp("schedule"))


def test_a_crashed_wsd_run_resumes_bit_exact(config, tmp_path, monkeypatch):
    run = load_run_config(config, ["train.schedule=warmup_stable_decay", "train.warmup_steps=2",
                                   "train.decay_ratio=0.5", "train.min_lr_ratio=0.1"])
    full = train(run, tmp_path / "full", **QUIET)
    crash_after_saving(monkeypatch, 8)   # inside the decay (steps 6-11)
    with pytest.raises(Crash):
        train(run, tmp_path / "crashed", **QUIET)
    monkeypatch.undo()
    resumed = train(None, tmp_path / "crashed", resume=True, **QUIET)
    assert resumed.losses == full.losses[8:]
    a, b = (load_file(str(tmp_path / d / "adapter" / "leanlora_adapter.safetensors")) for d in ("full", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    logged = [json.loads((tmp_path / d / "metrics.json").read_text())["log_history"] for d in ("full", "crashed")]
    assert logged[0] == logged[1]
    # each record's rate is the next step's: stable at lr up to step 6, then the cosine decay to 0.1 lr
    lrs = {r["step"]: r["learning_rate"] / 1e-2 for r in logged[0]}
    assert lrs[2] == lrs[4] == lrs[6] == pytest.approx(1.0)
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))
