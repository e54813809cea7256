"""``leanlora train --resume RUN key=value``: the settings that may change reach the restored
optimizer and scheduler; a resume cleans what a killed write left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import minilm_dir
from leanlora.cli import main
from leanlora.train.checkpoint import clean_leftovers
from leanlora.train.loop import lr_factor, train
from leanlora.train.runconfig import load_run_config
from train_fixtures import Crash, classification_yaml, crash_after_saving, tiny_bert_dir

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-changes")
    return classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=6, batch_size=16, eval_every=0,
                               save_every=2, lr=1e-2)


def _state(run_dir: Path) -> dict:
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return json.loads((run_dir / "checkpoints" / pointer["dir"] / "state.json").read_text())


def test_a_new_learning_rate_and_schedule_reach_the_restored_scheduler(config, tmp_path, monkeypatch):
    crash_after_saving(monkeypatch, 2)
    with pytest.raises(Crash):
        train(load_run_config(config, ["data.eval_file="]), tmp_path / "r", **QUIET)
    monkeypatch.undo()
    assert _state(tmp_path / "r")["scheduler"]["base_lrs"] == [1e-2, 1e-2]  # adapter and head groups

    changes = ["train.lr=2e-3", "train.schedule=cosine", "train.warmup_ratio=0", "train.max_steps=8"]
    resumed = train(None, tmp_path / "r", resume=True, overrides=changes, **QUIET)
    assert resumed.steps == 8 and len(resumed.losses) == 6
    state = _state(tmp_path / "r")
    assert state["step"] == 8 and state["scheduler"]["base_lrs"] == [2e-3, 2e-3]
    want = 2e-3 * lr_factor(8, 8, 0, "cosine")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([want, want], abs=1e-12)
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [2e-3, 2e-3]
    saved = load_run_config(tmp_path / "r" / "run.yaml").train  # and the next resume keeps them
    assert (saved.lr, saved.schedule, saved.warmup_ratio, saved.max_steps) == (2e-3, "cosine", 0.0, 8)


def test_the_rate_of_the_first_resumed_step_follows_the_new_settings(config, tmp_path, monkeypatch):
    """The group's rate is set for the restored step at once, not after the next scheduler step."""
    from leanlora.train import loop

    train(load_run_config(config, ["data.eval_file=", "train.max_steps=2"]), tmp_path / "r", **QUIET)
    seen = []
    real = loop.adamw

    def recording(groups, **kwargs):
        optimizer = real(groups, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(loop, "adamw", recording)
    train(None, tmp_path / "r", resume=True, overrides=["train.lr=4e-3", "train.max_steps=4", "train.schedule=constant",
                                                      "train.warmup_ratio=0"], **QUIET)
    assert seen == [[4e-3, 4e-3], [4e-3, 4e-3]]


def test_a_finished_run_can_be_extended_through_the_cli(config, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", str(config), "--out", str(out), "--no-progress", "data.eval_file="]) == 0
    assert main(["train", "--resume", str(out), "train.max_steps=8", "train.save_every=4", "--no-progress"]) == 0
    assert f"resumed {out} at step 6 of 8 with train.max_steps=8 train.save_every=4" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and len(metrics["train_losses"]) == 8
    assert _state(out)["step"] == 8


def test_a_resume_removes_what_a_killed_write_left(config, tmp_path, monkeypatch):
    crash_after_saving(monkeypatch, 4)
    with pytest.raises(Crash):
        train(load_run_config(config, ["data.eval_file="]), tmp_path / "r", **QUIET)
    monkeypatch.undo()
    run = tmp_path / "r"
    step = run / "checkpoints" / "step-00000004"
    leftovers = [step / ".optimizer.safetensors.k2j4.tmp", run / "checkpoints" / ".latest.json.a1b2.tmp",
                 run / ".metrics.json.x9.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    (run / ".best.q7.tmp").mkdir()                      # a folder write cut short
    (run / ".best.q7.tmp" / "adapter.safetensors").write_bytes(b"half")
    orphan = run / "checkpoints" / "step-00000099"      # a checkpoint killed before latest.json moved
    orphan.mkdir()
    (orphan / "adapter.safetensors").write_bytes(b"half")
    keep = run / "notes.txt"
    keep.write_text("mine")

    removed = clean_leftovers(run)
    assert sorted(removed) == sorted([*leftovers, run / ".best.q7.tmp", orphan])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step-00000004"]
    assert keep.read_text() == "mine"

    for path in leftovers:  # and train(resume=True) calls it
        path.write_bytes(b"half")
    train(None, run, resume=True, **QUIET)
    assert not any(p.exists() for p in leftovers) and _state(run)["step"] == 6
