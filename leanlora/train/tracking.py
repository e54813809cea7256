"""Experiment trackers of the CLI loop (``train.report_to``): TensorBoard, and anything transformers integrates.

Every tracker takes ``log(scalars, step)`` with names in transformers' Trainer convention
(``loss``, ``learning_rate``, ``grad_norm``, ``eval_accuracy``, ...) and writes them under its
tags (``train/loss``, ``eval/accuracy``), so a leanlora run and a Trainer run of the same model
line up in one dashboard.

* ``tensorboard`` writes through ``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard``.
  A resumed run purges the events past its checkpoint's step, which the interrupted run had logged.
* Any other name is a ``transformers`` integration (``trackio``, ``wandb``, ``mlflow``, ...): its
  own ``TrainerCallback`` is driven with a ``TrainingArguments`` for the run folder and the step
  as ``TrainerState.global_step``. Their settings come from their environment variables, as
  under the Trainer (trackio logs to a local database unless ``TRACKIO_SPACE_ID`` names a Space).

Each ``log`` call reaches the backend at once (TensorBoard's writer is flushed), so a run that
dies loses nothing already logged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from leanlora.config import ConfigError

def _integrations() -> dict[str, Any]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return INTEGRATION_TO_CALLBACK


def installed_backends() -> list[str]:
    """The backends whose packages are importable here (what ``report_to: all`` means)."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    found = set(get_available_reporting_integrations())
    return sorted(found | ({"tensorboard"} if importlib.util.find_spec("tensorboard") is not None else set()))


def resolve_backends(names: tuple[str, ...] | list[str]) -> list[str]:
    """``train.report_to`` as a list of backends; unknown or uninstalled names are refused."""
    names = [n for n in names if n != "none"]
    if not names:
        return []
    if "all" in names:
        return installed_backends()
    known = sorted({"tensorboard", *_integrations()})  # every name it accepts besides all/none, installed or not
    if unknown := [n for n in names if n not in known]:
        raise ConfigError(f"train.report_to: unknown tracker(s) {unknown}; available: {known} "
                          "(or 'all' for every installed one, 'none' for no tracker)")
    if missing := [n for n in names if n not in installed_backends()]:
        raise ConfigError(f"train.report_to: {missing} not installed here (pip install {' '.join(missing)}); "
                          f"installed: {installed_backends() or 'none'}")
    return list(dict.fromkeys(names))


class TensorBoardTracker:
    """Scalars into a TensorBoard event file in ``log_dir``."""

    def __init__(self, log_dir: str | Path, resumed_at: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides the events that the interrupted one wrote after its checkpoint
        # (readers drop events at or after purge_step); those up to the checkpoint stay
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at + 1 if resumed_at else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        from transformers.integrations.integration_utils import rewrite_logs

        # transformers' tags: eval_x -> eval/x, anything else -> train/x
        for name, value in rewrite_logs(scalars).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CallbackTracker:
    """A transformers integration callback (``TrainerCallback``) driven outside the Trainer."""

    def __init__(self, callback, run_dir: str | Path, model=None) -> None:
        from transformers import TrainerControl, TrainerState, TrainingArguments

        self.callback, self.model = callback, model
        run_dir = Path(run_dir)
        # project: trackio's (and swanlab's) project name; the Trainer's default is "huggingface"
        self.args = TrainingArguments(output_dir=str(run_dir), run_name=run_dir.name, report_to=[], project="leanlora")
        self.state, self.control = TrainerState(), TrainerControl()
        callback.on_train_begin(self.args, self.state, self.control, model=model)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.state.global_step = step
        self.callback.on_log(self.args, self.state, self.control, model=self.model, logs=dict(scalars))

    def close(self) -> None:
        self.callback.on_train_end(self.args, self.state, self.control, model=self.model)


def open_trackers(names: list[str], run_dir: str | Path, resumed_at: int = 0, model=None) -> list[Any]:
    """One tracker per backend in ``names`` (from :func:`resolve_backends`) for the run in ``run_dir``:
    each has ``log(scalars, step)`` and ``close()``."""
    return [TensorBoardTracker(Path(run_dir) / "tensorboard", resumed_at) if name == "tensorboard"
            else CallbackTracker(_integrations()[name](), run_dir, model) for name in names]
