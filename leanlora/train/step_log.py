"""What the training loop records every ``train.log_every`` steps, and the adapter's part of any log.

One record per log step, kept in the run's ``metrics.json`` (``log_history``, the data of
``leanlora report``'s curves) and sent to every ``train.report_to`` tracker:

* ``loss``: the mean task loss of the steps since the previous record, without the prior;
* ``leanlora/prior``: the mean prior added to it for training (λ·R, or under a budget the controller's
  λ_t · E[cost]), in runs that have one: a separate number because it measures the adapter's cost,
  not its fit, and during a budget's ramp it can be many times the task loss;
* ``learning_rate``: the adapter group's rate after this step's scheduler update (the next step's);
* ``grad_norm``: the global gradient norm of this step, before clipping;
* the adapter's state, :func:`adapter_values`, under the same ``leanlora/`` keys as in the Trainer's
  logs (:class:`leanlora.train.callbacks.LeanLoraCallback`), so both kinds of run chart alike;
* ``loss_scale``: the fp16 gradient scaler's scale, when there is one.

Both are averaged from the loop's per-step values (checkpointed), not from a running window,
so a resumed run writes the same records as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlora.reports.cost import cost_report
from leanlora import budget
from leanlora.reports.summary import gate_summary


def adapter_values(model: nn.Module) -> dict[str, float]:
    """The adapter's state now, for a log record.

    ``leanlora/rank`` and ``leanlora/bits``: mean expected rank and bits over the adapted layers
    (:func:`leanlora.gate_summary`); ``leanlora/bops``, ``leanlora/bops_vs_lora16`` and
    ``leanlora/bytes_vs_lora16``: the adapter's BOPs as :func:`leanlora.cost_report` counts them
    now (what finalize would keep), and its BOPs and stored bytes as fractions of a 16-bit LoRA of
    the same shape (the unit of ``adapter.budget``); ``leanlora/budget``: that target, when the
    run has one.
    """
    values = {f"leanlora/{k}": round(v, 4) for k, v in gate_summary(model).items()}
    total = cost_report(model).total
    values["leanlora/bops"] = float(total["bops"])
    values["leanlora/bops_vs_lora16"] = round(float(total["bops_vs_lora"]), 6)
    values["leanlora/bytes_vs_lora16"] = round(float(total["bytes_vs_lora"]), 6)
    if (ctl := budget.controller(model)) is not None:
        values["leanlora/budget"] = ctl.budget
    return values


def step_record(step: int, train_losses: list[float], log_history: list[dict[str, Any]],
                optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor | None, model: nn.Module,
                scaler: torch.amp.GradScaler | None = None, train_priors: list[float] | None = None) -> dict[str, Any]:
    """The record of optimizer step ``step``; it covers the steps of ``train_losses`` (and of
    ``train_priors``, the prior of each step, when the run has one) since the last record of
    ``log_history``. Its learning rate is the "adapter" param group's (the first group's when none
    has that role)."""
    start = log_history[-1]["step"] if log_history else 0
    window = train_losses[start:step]
    group = next((g for g in optimizer.param_groups if g.get("role") == "adapter"), optimizer.param_groups[0])
    record: dict[str, Any] = {"step": step, "loss": sum(window) / max(len(window), 1),
                              "learning_rate": float(group["lr"])}
    if grad_norm is not None:  # a DTensor (FSDP2's clipped norm) is gathered first
        full = getattr(grad_norm, "full_tensor", None)
        record["grad_norm"] = float(full() if full is not None else grad_norm)
    if train_priors and any(train_priors[:step]):  # from the first step with a prior to the run's end
        priors = train_priors[start:step]
        record["leanlora/prior"] = sum(priors) / max(len(priors), 1)
    record.update(adapter_values(model))
    if scaler is not None:
        record["loss_scale"] = float(scaler.get_scale())
    return record
