"""Resuming a run with some settings changed on purpose: ``leanlora train --resume RUN train.lr=1e-4``.

A checkpoint holds the adapter, the optimizer's moments and the scheduler's step; the settings
below only steer what happens from that step on, so they may change. Everything else is refused
with the reason, because the restored state would not fit it or the steps already taken would
silently mean something else.

Changing the learning rate has to reach the restored scheduler: ``LambdaLR.load_state_dict``
brings back the base learning rates the run started with, and every later step would multiply
those. :func:`retune` puts this run's base rates back in and sets each group's current rate
for the restored step from the (possibly new) schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from leanlora.config import ConfigError
from leanlora.train.runconfig import RunConfig, load_run_config, parse_override

RESUMABLE = ("train.lr", "train.schedule", "train.warmup_ratio", "train.warmup_steps", "train.min_lr_ratio",
             "train.decay_ratio", "train.decay_type", "train.max_steps", "train.epochs", "train.max_grad_norm",
             "train.eval_every", "train.save_every", "train.log_every", "train.eval_batch_size", "train.report_to")

_REASONS = {
    "model": "the checkpoint's adapter was trained on that base model",
    "data": "the classes, the examples and the data order of the steps already taken come from it",
    "adapter": "the adapter's shapes and parameters are restored from the checkpoint as they were saved",
    "train.seed": "the data order and random draws of the steps already taken come from it",
    "train.batch_size": "the steps already taken and the data order of the rest depend on it",
    "train.grad_accum": "the steps already taken and the data order of the rest depend on it",
    "train.weight_decay": "the restored optimizer's groups keep the decay they were saved with",
}
_OTHER = "it is an execution setting of the run, not an optimisation setting, and is not checked for resuming"


def resume_config(run_file: Path, overrides: Sequence[str]) -> RunConfig:
    """The saved run config with ``overrides`` applied; an override of a key outside
    :data:`RESUMABLE` is refused naming the key and why."""
    for text in overrides:
        keys, _ = parse_override(text)
        key = ".".join(keys)
        if key not in RESUMABLE:
            reason = _REASONS.get(key) or _REASONS.get(keys[0]) or _OTHER
            raise ConfigError(f"override {text!r}: {key} cannot change when resuming: {reason}. "
                              f"Settings that can: {', '.join(RESUMABLE)}")
    return load_run_config(run_file, list(overrides))


def retune(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
           base_lrs: Sequence[float]) -> None:
    """Give a restored ``LambdaLR`` this run's ``base_lrs`` (taken before the checkpoint was loaded)
    and set every group's learning rate for the restored step. With unchanged settings this
    recomputes exactly the restored values (the same product), so resuming stays bit-exact."""
    if len(base_lrs) != len(optimizer.param_groups):
        raise ConfigError(f"the run has {len(base_lrs)} parameter groups, the checkpoint "
                          f"{len(optimizer.param_groups)}; resume without changing the adapter")
    scheduler.base_lrs = list(base_lrs)
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, rate in zip(optimizer.param_groups, base_lrs, rates):
        group["initial_lr"] = base
        if isinstance(group["lr"], torch.Tensor):  # a captured step (train.cuda_graph) reads it from the device
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    scheduler._last_lr = rates
