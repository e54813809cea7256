"""train.precision: autocast dtypes per device, fp16's gradient scaler (skips overflowing steps,
checkpointed, restored bit-exact on resume), refused combinations, and the old train.bf16 key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leanlora.config import ConfigError
from leanlora.train.loop import train
from leanlora.train.precision import optimizer_step, resolve_precision
from leanlora.train.runconfig import TrainConfig, load_run_config
from train_fixtures import Crash, crash_after_saving, resumable_run_yaml

QUIET = dict(progress=False, log=lambda *_: None)
CPU = torch.device("cpu")


def _autocast_dtype(precision) -> torch.dtype:
    with precision.autocast():
        return torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype


def test_autocast_on_the_cpu_follows_train_precision():
    resolved = {name: resolve_precision(TrainConfig(precision=name), CPU) for name in ("auto", "bf16", "fp16", "fp32")}
    assert {k: p.name for k, p in resolved.items()} == {"auto": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
    assert [_autocast_dtype(p) for p in resolved.values()] == [torch.float32, torch.bfloat16, torch.float16,
                                                               torch.float32]
    assert [p.grad_scaler() is not None for p in resolved.values()] == [False, False, True, False]


@pytest.mark.parametrize("settings,message", [
    (dict(distributed="fsdp2"), "train.precision=fp16 with train.distributed=fsdp2 is not supported"),
])
def test_fp16_combinations_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve_precision(TrainConfig(precision="fp16", **settings), CPU)


def test_a_step_with_inf_gradients_is_skipped_and_the_scale_halved():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = resolve_precision(TrainConfig(precision="fp16"), CPU).grad_scaler()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(3, 4)).float().pow(2).mean()
    scaler.scale(loss).backward()
    model.weight.grad[0, 0] = float("inf")
    norm = optimizer_step(opt, scaler, max_grad_norm=1.0, want_norm=True)
    assert norm is not None and torch.isinf(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped
    assert scaler.get_scale() == 2.0 ** 15 and all(p.grad is None for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(3, 4)).float().pow(2).mean()
    scaler.scale(loss).backward()
    norm = optimizer_step(opt, scaler, max_grad_norm=0.0, want_norm=True)   # a clean step updates
    assert torch.isfinite(norm) and not torch.equal(before[0], model.weight)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return resumable_run_yaml(tmp_path_factory.mktemp("precision"))


def test_fp16_on_the_cpu_trains_and_resumes_with_its_scaler_bit_exact(config, tmp_path, monkeypatch):
    run = load_run_config(config, ["train.precision=fp16", "train.device=cpu"])
    full = train(run, tmp_path / "full", **QUIET)
    assert all(torch.isfinite(torch.tensor(full.losses)))
    crash_after_saving(monkeypatch, 8)
    with pytest.raises(Crash):
        train(run, tmp_path / "crashed", **QUIET)
    monkeypatch.undo()
    saved = json.loads((tmp_path / "crashed" / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert set(saved["loop"]["grad_scaler"]) >= {"scale", "_growth_tracker"}
    resumed = train(None, tmp_path / "crashed", resume=True, **QUIET)
    assert resumed.losses == full.losses[8:]
    a, b = (load_file(str(tmp_path / d / "adapter" / "leanlora_adapter.safetensors")) for d in ("full", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads((tmp_path / d / "metrics.json").read_text())["log_history"] for d in ("full", "crashed")]
    assert logged[0] == logged[1] and all(r["loss_scale"] > 0 for r in logged[0])
    # the scaler went on from its checkpointed state: same scale, same count of clean steps since it changed
    final = [json.loads((tmp_path / d / "checkpoints" / "step-00000012" / "state.json").read_text())["loop"]
             for d in ("full", "crashed")]
    assert final[0]["grad_scaler"] == final[1]["grad_scaler"]


def test_fp16_refuses_fp16_trained_weights(config, tmp_path):
    run = load_run_config(config, ["train.precision=fp16", "adapter.adapter_dtype=float16", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="train.precision=fp16 needs trained weights in float32"):
        train(run, tmp_path / "half", **QUIET)


def test_the_old_bf16_key_reads_as_precision(tmp_path):
    with pytest.warns(FutureWarning, match="train.bf16 is replaced by train.precision; bf16: false reads as"):
        assert load_run_config(None, ["train.bf16=false"]).train.precision == "fp32"
    old = tmp_path / "run.yaml"
    old.write_text("train:\n  bf16: true\n  max_steps: 3\n")   # a run.yaml written before train.precision
    with pytest.warns(FutureWarning):
        assert load_run_config(old).train.precision == "auto"
    with pytest.raises(ConfigError, match="override 'train.bf16=true': train.bf16=True contradicts "
                                          "train.precision='fp16'"):
        load_run_config(None, ["train.bf16=true", "train.precision=fp16"])
