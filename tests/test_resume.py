"""Checkpoints: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run;
a NaN loss stops the run naming the step and keeps the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import minilm_dir
from leanlora.train.checkpoint import latest_checkpoint
from leanlora.train.loop import TrainingDiverged, train
from leanlora.train.runconfig import load_run_config
from train_fixtures import (Crash, classification_yaml, crash_after_saving, nan_loss_at, tiny_bert_dir,
                            write_sentiment_tsv)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 160


def _run_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "leanlora", "train", *args, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _latest_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    cfg = classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=STEPS, batch_size=8, lr=1e-2,
                              save_every=5, eval_every=40, log_every=50)
    write_sentiment_tsv(root / "data" / "train.tsv", 64, seed=1)   # 8 steps per epoch: many epoch boundaries
    # adapter dropout draws from the global RNG every step, so a wrong RNG restore would show
    cfg.write_text(cfg.read_text().replace("  r: 4\n", "  r: 4\n  dropout: 0.1\n"))
    return cfg


def test_sigkill_then_resume_equals_uninterrupted(config, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _run_cli(str(config), "--out", str(full))
    victim = _run_cli(str(config), "--out", str(killed))
    deadline = time.time() + 120
    while _latest_step(killed) < 30 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    at_kill = _latest_step(killed)
    assert 30 <= at_kill < STEPS, "the run finished before it could be killed; raise STEPS"
    assert not (killed / "adapter").exists()

    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    resumed = _run_cli("--resume", str(killed))
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert f"resumed {killed} at step {at_kill}" in log

    a = load_file(str(full / "adapter" / "leanlora_adapter.safetensors"))
    b = load_file(str(killed / "adapter" / "leanlora_adapter.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert ma["train_losses"] == mb["train_losses"] and len(ma["train_losses"]) == STEPS
    assert ma["best_step"] == mb["best_step"] and ma["history"] == mb["history"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(config, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, call=7)
    run = load_run_config(config, ["train.max_steps=20", "train.save_every=3", "train.eval_every=0"])
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7 .* last good checkpoint is .*step-00000006"):
        train(run, tmp_path / "nan", progress=False, log=lambda *_: None)
    last = latest_checkpoint(tmp_path / "nan")
    assert last is not None and last.name == "step-00000006"
    assert (last / "adapter.safetensors").is_file() and (last / "state.json").is_file()
    assert not (tmp_path / "nan" / "adapter").exists()


def test_fresh_run_refuses_a_folder_with_checkpoints(config, tmp_path):
    from leanlora.config import ConfigError

    run = load_run_config(config, ["train.max_steps=3", "train.save_every=3"])
    train(run, tmp_path / "r", progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="already holds a run with checkpoints; continue it with --resume"):
        train(run, tmp_path / "r", progress=False, log=lambda *_: None)
    # resuming a finished run does no more steps and keeps the result
    again = train(None, tmp_path / "r", resume=True, progress=False, log=lambda *_: None)
    assert again.steps == 3 and again.losses == []


@pytest.mark.parametrize("overrides", [
    ["adapter.ranks=nested"],                                            # DyLoRA: b drawn per step
    ["adapter.factors=bank", "adapter.bank.vector_length=16", "adapter.bank.num_vectors=8"],   # VB-LoRA
    ["adapter.ranks=gated", "adapter.precision=learned"],                # B-LoRA: sampled gates
], ids=["nested", "bank", "gated-learned"])
def test_crash_and_resume_is_bit_exact_for_every_method(config, tmp_path, monkeypatch, overrides):
    run = load_run_config(config, ["train.max_steps=24", "train.save_every=4", "train.eval_every=8", *overrides])
    quiet = dict(progress=False, log=lambda *_: None)
    full = train(run, tmp_path / "full", **quiet)

    crash_after_saving(monkeypatch, 12)
    with pytest.raises(Crash):
        train(run, tmp_path / "crashed", **quiet)
    monkeypatch.undo()
    resumed = train(None, tmp_path / "crashed", resume=True, **quiet)
    assert resumed.steps == 24 and len(resumed.losses) == 12
    assert resumed.losses == full.losses[12:]
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "crashed"))
    assert ma.get("train_priors") == mb.get("train_priors") and ma["log_history"] == mb["log_history"]
    a = load_file(str(tmp_path / "full" / "adapter" / "leanlora_adapter.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "adapter" / "leanlora_adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_checkpoint_that_kept_no_priors_resumes(config, tmp_path, monkeypatch):
    """Checkpoints written before the prior was kept apart from the loss have no ``train_priors``:
    those steps count as having none, and the run goes on to record the rest."""
    run = load_run_config(config, ["train.max_steps=12", "train.save_every=4", "adapter.ranks=gated",
                                   "adapter.budget=off"])  # the prior λ·R, on every step
    quiet = dict(progress=False, log=lambda *_: None)
    crash_after_saving(monkeypatch, 8)
    with pytest.raises(Crash):
        train(run, tmp_path / "old", **quiet)
    monkeypatch.undo()
    state_file = latest_checkpoint(tmp_path / "old") / "state.json"
    state = json.loads(state_file.read_text())
    assert len(state["loop"].pop("train_priors")) == 8
    state_file.write_text(json.dumps(state))
    resumed = train(None, tmp_path / "old", resume=True, **quiet)
    priors = json.loads((tmp_path / "old" / "metrics.json").read_text())["train_priors"]
    assert resumed.steps == 12 and priors[:8] == [0.0] * 8 and all(p > 0 for p in priors[8:])


@pytest.mark.parametrize("adapter", [[], ["adapter.ranks=gated", "adapter.precision=learned", "adapter.factors=bank",
                                          "adapter.bank.vector_length=4"]], ids=["lora", "bank-gated-learned"])
def test_the_loss_is_read_back_once_per_optimizer_step(config, tmp_path, adapter, monkeypatch):
    """Each host read of a device value stalls the host until the GPU catches up. The loop reads the
    step's loss once, after the last micro-batch's backward, and the adapter's forward, prior and
    schedules read nothing; the loop also times every step it runs."""
    import traceback
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    package = str(ROOT / "leanlora")
    # what the log records read (rank, bits, cost, the gradient norm), on log steps only
    log_records = {str(ROOT / "leanlora" / f) for f in ("reports/summary.py", "reports/cost.py", "train/step_log.py")}
    readers: Counter = Counter()

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:  # Tensor.item(), float(t), bool(t)
                frames = [f for f in traceback.extract_stack()[:-1]
                          if not any(w in f.filename for w in ("_dynamo", "_compile.py", "_python_dispatch"))]
                files = [f.filename for f in frames]
                if any(f in log_records for f in files):
                    readers["log records (log steps)"] += 1
                elif any(f.name == "cost_summary" for f in frames):
                    readers["cost of the final adapter (metrics.json)"] += 1
                elif any(f.name == "freeze" and f.filename.endswith("budget.py") for f in frames):
                    readers["the budget's freeze (once a run)"] += 1
                elif any(f.name == "save_checkpoint" for f in frames) and files[-1].endswith("budget.py"):
                    readers["the budget's state in a checkpoint"] += 1
                elif files[-1].startswith(package):
                    readers[Path(files[-1]).relative_to(package).as_posix()] += 1
                else:  # Adam's CPU step counters, transformers' check for padding
                    readers["torch or transformers"] += 1
            return func(*args, **(kwargs or {}))

    from leanlora.train import loop

    copies = []  # the step's task loss and prior come back together, as one copy to the host
    monkeypatch.setattr(loop, "host_values", lambda t: copies.append(t.numel()) or t.cpu().tolist())
    run = load_run_config(config, ["train.max_steps=6", "train.grad_accum=2", "train.eval_every=0",
                                   "train.save_every=0", "train.log_every=100", "data.eval_file=", *adapter])
    with ScalarReads():
        result = train(run, tmp_path / "reads", progress=False, log=lambda *_: None)
    assert result.steps == 6 and len(result.step_seconds) == 6 and min(result.step_seconds) > 0
    assert copies == [2] * 6 and readers["train/loop.py"] == 0, (copies, readers)
    # the finite-weight flag rides on the loss read each step, and is read alone only before a save (one here)
    assert readers["train/finite.py"] == 1, readers
    # besides: save's all-finite check (one read per saved adapter), the log record of the one log
    # step (the last), and the cost of the final adapter, once, for metrics.json
    assert readers["artifact/finite.py"] <= 1, readers
    assert set(readers) <= {"train/loop.py", "train/finite.py", "artifact/finite.py", "log records (log steps)",
                            "torch or transformers",
                            "cost of the final adapter (metrics.json)", "the budget's freeze (once a run)",
                            "the budget's state in a checkpoint"}, readers
