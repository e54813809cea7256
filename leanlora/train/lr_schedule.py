"""The learning-rate schedule of the training loop, built by ``transformers.get_scheduler``.

Each schedule is a ``LambdaLR`` whose multiplier scales every param group's own learning rate
(adapter, bank, logits and gates keep their ratios). Its ``state_dict`` is its step count, so a
checkpoint restores it exactly; it writes learning rates with ``fill_`` when they are device
tensors, which is how a captured training step (:mod:`leanlora.train.step_graph`) sees them.

Warm-up is ``train.warmup_steps`` when > 0, else ``ceil(train.warmup_ratio * total)`` steps, as
in ``transformers.TrainingArguments``. The names are transformers' own, with one exception kept
from leanlora's earlier schedule: ``constant`` with a warm-up runs as ``constant_with_warmup``
(transformers' ``constant`` has none), and the run's log says so.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from leanlora.config import ConfigError

SCHEDULES = ("linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial", "constant",
             "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay")
"""The schedules of ``transformers.SchedulerType`` that depend on the step alone (not
``reduce_lr_on_plateau``, which needs a metric, nor ``greedy``)."""

WITH_MIN_LR = ("cosine_with_min_lr", "warmup_stable_decay")


def _specific_kwargs(tc, total: int, warmup: int) -> dict:
    """What the schedule needs beyond warm-up and length (transformers' ``scheduler_specific_kwargs``)."""
    if tc.schedule == "cosine_with_min_lr":
        return {"min_lr_rate": tc.min_lr_ratio}
    if tc.schedule == "warmup_stable_decay":
        decay = math.ceil(tc.decay_ratio * total)
        if warmup + decay > total:
            raise ConfigError(f"train.schedule=warmup_stable_decay: {warmup} warm-up + {decay} decay steps "
                              f"(train.decay_ratio={tc.decay_ratio}) exceed the run's {total} steps; lower "
                              "train.warmup_steps / train.warmup_ratio or train.decay_ratio")
        return {"num_decay_steps": decay, "decay_type": tc.decay_type, "min_lr_ratio": tc.min_lr_ratio}
    return {}


def build_scheduler(optimizer: torch.optim.Optimizer, tc, total: int,
                    log: Callable[[str], None] = print) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler of ``tc`` (a :class:`~leanlora.train.runconfig.TrainConfig`) over ``total`` steps."""
    from transformers import get_scheduler

    # optimizer steps of linear warm-up from 0: tc.warmup_steps, else the ratio of total
    warmup = tc.warmup_steps if tc.warmup_steps > 0 else math.ceil(tc.warmup_ratio * total)
    if tc.warmup_steps > total:
        log(f"warning: train.warmup_steps={tc.warmup_steps} is longer than the run's {total} optimizer steps: the "
            f"learning rate rises all run and reaches {(total - 1) / tc.warmup_steps:.0%} of train.lr={tc.lr:g}; lower "
            "train.warmup_steps or set it to 0 and use train.warmup_ratio")
    name = tc.schedule
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
        log(f"train.schedule=constant with {warmup} warm-up steps runs as transformers' constant_with_warmup "
            "(set train.warmup_ratio=0 for no warm-up)")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=_specific_kwargs(tc, total, warmup))


def validate(tc) -> None:
    """Refuse schedule settings that would be ignored or out of range, naming the key (the choice
    fields, decay_type among them, were checked against their Literal by check_field_types)."""
    if tc.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={tc.schedule!r} is invalid: allowed {list(SCHEDULES)} "
                          "(transformers.get_scheduler's names)")
    if tc.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={tc.warmup_steps} is invalid: must be >= 0 (0: use warmup_ratio)")
    if not 0 <= tc.min_lr_ratio < 1:
        raise ConfigError(f"train.min_lr_ratio={tc.min_lr_ratio} is invalid: must be in [0, 1)")
    if tc.min_lr_ratio > 0 and tc.schedule not in WITH_MIN_LR:
        raise ConfigError(f"train.min_lr_ratio={tc.min_lr_ratio} applies to train.schedule in {list(WITH_MIN_LR)}, "
                          f"not to {tc.schedule!r}")
    if not 0 < tc.decay_ratio <= 1:
        raise ConfigError(f"train.decay_ratio={tc.decay_ratio} is invalid: must be in (0, 1]")


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """``scheduler.step()``, once per optimizer step of the loop, whether the optimizer stepped or not.

    The schedule follows the loop's step count: a step that fp16's gradient scaler skipped still
    moves it, so the learning rate at step s is the schedule's value at s in every run. torch warns
    when the first optimizer step was skipped that way; here that is expected, not a misuse.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
