"""train.report_to: the loop's log records and evaluations reach TensorBoard at their steps (read
back with TensorBoard's own event reader), a resumed run leaves one event per step, transformers'
integration callbacks are driven outside the Trainer, and unknown trackers are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import minilm_dir
from leanlora.config import ConfigError
from leanlora.train.loop import train
from leanlora.train.runconfig import load_run_config
from leanlora.train.tracking import CallbackTracker, open_trackers, resolve_backends
from train_fixtures import classification_yaml, tiny_bert_dir

pytest.importorskip("tensorboard", reason="tensorboard is a test dependency (pip install -e '.[test]')")
QUIET = dict(progress=False, log=lambda *_: None)
LOGGED = ("loss", "learning_rate", "grad_norm", "leanlora/rank", "leanlora/bits", "leanlora/bops",
          "leanlora/bops_vs_lora16", "leanlora/bytes_vs_lora16")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard reads the folder (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracking")
    return classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=8, batch_size=8, eval_every=3,
                               save_every=4, log_every=2, lr=1e-2)


def test_log_records_and_evaluations_reach_tensorboard_at_their_steps(config, tmp_path):
    run = load_run_config(config, ["train.report_to=[tensorboard]", "adapter.ranks=gated"])
    train(run, tmp_path / "run", **QUIET)
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    records = metrics["log_history"]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]   # every 2 steps, and at each evaluation (3, 6)
    for name in LOGGED:
        assert [s for s, _ in scalars[f"train/{name}"]] == [2, 3, 4, 6, 8], name
        assert [v for _, v in scalars[f"train/{name}"]] == pytest.approx([r[name] for r in records], rel=1e-6)
    for name in ("accuracy", "f1", "loss"):
        assert scalars[f"eval/{name}"] == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in metrics["history"]]
    assert [s for s, _ in scalars["eval/accuracy"]] == [3, 6, 8]
    assert all(r["leanlora/bops_vs_lora16"] > 0 and r["grad_norm"] > 0 for r in records)


def test_a_resumed_run_leaves_one_event_per_step(config, tmp_path, monkeypatch):
    from leanlora.train import tracking

    run = load_run_config(config, ["train.report_to=[tensorboard]"])
    train(run, tmp_path / "full", **QUIET)

    real_log = tracking.TensorBoardTracker.log

    def log_then_die_at_6(self, scalars, step):  # killed at step 6, two steps past its checkpoint
        real_log(self, scalars, step)
        if step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.TensorBoardTracker, "log", log_then_die_at_6)
    with pytest.raises(KeyboardInterrupt):
        train(run, tmp_path / "killed", **QUIET)
    monkeypatch.undo()
    train(None, tmp_path / "killed", resume=True, **QUIET)
    full, resumed = _scalars(tmp_path / "full" / "tensorboard"), _scalars(tmp_path / "killed" / "tensorboard")
    assert full.keys() == resumed.keys()
    for tag in full:
        assert resumed[tag] == full[tag], tag


def test_a_transformers_integration_callback_is_driven_outside_the_trainer(tmp_path):
    from transformers.integrations.integration_utils import TensorBoardCallback

    tracker = CallbackTracker(TensorBoardCallback(), tmp_path / "run")
    tracker.log({"loss": 1.5, "grad_norm": 0.25}, 3)
    tracker.log({"eval_accuracy": 0.75}, 3)
    tracker.log({"loss": 1.25}, 5)
    tracker.close()
    (log_dir,) = [p.parent for p in (tmp_path / "run").rglob("events.out.tfevents.*")]
    scalars = _scalars(log_dir)
    assert scalars["train/loss"] == [(3, 1.5), (5, 1.25)]
    assert scalars["train/grad_norm"] == [(3, 0.25)] and scalars["eval/accuracy"] == [(3, 0.75)]


def test_report_to_names_are_checked():
    assert resolve_backends(()) == [] and resolve_backends(["none"]) == []
    assert resolve_backends(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert "tensorboard" in resolve_backends(["all"])
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['tensorbored'\]; available: \[.*'tensorboard'.*"
                                          r"'trackio'.*'wandb'"):
        resolve_backends(["tensorbored"])


def test_a_known_tracker_that_is_not_installed_is_refused_before_the_run_loads(config, tmp_path, monkeypatch):
    from leanlora.train import tracking

    monkeypatch.setattr(tracking, "installed_backends", lambda: ["tensorboard"])
    run = load_run_config(config, ["train.report_to=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"train.report_to: \['wandb'\] not installed here \(pip install wandb\)"):
        train(run, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


def test_trackio_logs_to_its_local_database(tmp_path, monkeypatch):
    import importlib.util
    import sqlite3

    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed (optional: pip install trackio); the transformers callback path "
                    "is tested above with TensorBoard's")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))   # read when trackio is imported
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)            # no Space: nothing leaves the machine
    (tracker,) = open_trackers(["trackio"], tmp_path / "run")
    tracker.log({"loss": 1.5, "eval_accuracy": 0.75}, 7)
    tracker.close()
    # trackio keeps a project's metrics as JSON rows of an SQLite file named after the project
    with sqlite3.connect(tmp_path / "trackio" / "leanlora.db") as db:
        rows = [json.loads(m) for (m,) in db.execute("select metrics from metrics")]
    assert rows == [{"train/loss": 1.5, "eval/accuracy": 0.75, "train/global_step": 7}]


def test_without_a_progress_bar_each_logged_step_is_a_line_with_the_bars_fields(config, tmp_path):
    lines: list[str] = []
    train(load_run_config(config, ["adapter.ranks=gated"]), tmp_path / "run", progress=False, log=lines.append)
    records = json.loads((tmp_path / "run" / "metrics.json").read_text())["log_history"]
    steps = [line for line in lines if line.startswith("step ") and "/8: loss=" in line]
    assert [int(line.split("/")[0].split()[1]) for line in steps] == [r["step"] for r in records]
    first = records[0]
    assert f"loss={first['loss']:.4f}" in steps[0] and f"rank={first['leanlora/rank']:.2f}" in steps[0]


def test_the_logged_loss_is_the_task_loss_and_the_prior_is_logged_beside_it(config, tmp_path, monkeypatch):
    """A budget's penalty runs many times above the task loss during its ramp, and a loss that held it
    would read as divergence. With the prior a large constant (no gradient, so training is unchanged)
    the losses equal a run's without it, and the prior is recorded, and shown, on its own."""
    import torch

    from leanlora import distributed

    plain = train(load_run_config(config, []), tmp_path / "plain", **QUIET)
    monkeypatch.setattr(distributed, "regularizer", lambda model: torch.tensor(100.0))
    lines: list[str] = []
    shifted = train(load_run_config(config, []), tmp_path / "shifted", progress=False, log=lines.append)
    assert shifted.losses == plain.losses and len(plain.losses) == 8
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "shifted"))
    assert [r["loss"] for r in b["log_history"]] == [r["loss"] for r in a["log_history"]]
    assert [r["leanlora/prior"] for r in b["log_history"]] == [100.0] * 5
    assert b["train_priors"] == [100.0] * 8
    assert "train_priors" not in a and not any("leanlora/prior" in r for r in a["log_history"])
    assert all("prior=100," in line for line in lines if line.startswith("step ") and "/8: loss=" in line)
