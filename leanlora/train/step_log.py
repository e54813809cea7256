"""What the training loop records every ``train.log_every`` steps, and the adapter's part of any log.

One record per log step, kept in the run's ``metrics.json`` (``log_history``, the data of
``leanlora report``'s curves) and sent to every ``train.report_to`` tracker:

* ``loss``: the mean training loss of the steps since the previous record;
* ``learning_rate``: the adapter group's rate after this step's scheduler update (the next step's);
* ``grad_norm``: the global gradient norm of this step, before clipping;
* the adapter's state, :func:`adapter_values`, under the same ``leanlora/`` keys as in the Trainer's
  logs (:class:`leanlora.train.callbacks.LeanLoraCallback`), so both kinds of run chart alike;
* ``loss_scale``: the fp16 gradient scaler's scale, when there is one.

The loss is averaged from the loop's per-step losses (checkpointed), not from a running window,
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
    ctl = budget.controller(model)
    if ctl is not None:
        values["leanlora/budget"] = ctl.budget
    return values


def adapter_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the "adapter" param group (the first group when none has that role)."""
    group = next((g for g in optimizer.param_groups if g.get("role") == "adapter"), optimizer.param_groups[0])
    return float(group["lr"])


def _host(value: torch.Tensor) -> float:
    """A 0-dim tensor on the host; a DTensor (FSDP2's clipped norm) is gathered first."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def step_record(step: int, train_losses: list[float], since: int, optimizer: torch.optim.Optimizer,
                grad_norm: torch.Tensor | None, model: nn.Module,
                scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """The record of optimizer step ``step``; ``train_losses[since:step]`` are the steps it covers."""
    window = train_losses[since:step]
    record: dict[str, Any] = {"step": step, "loss": sum(window) / max(len(window), 1),
                              "learning_rate": adapter_lr(optimizer)}
    if grad_norm is not None:
        record["grad_norm"] = _host(grad_norm)
    record.update(adapter_values(model))
    if scaler is not None:
        record["loss_scale"] = float(scaler.get_scale())
    return record


def last_logged_step(log_history: list[dict[str, Any]]) -> int:
    return log_history[-1]["step"] if log_history else 0


def tracked(record: dict[str, Any]) -> dict[str, float]:
    """A record's scalars for the trackers (the step travels separately)."""
    return {k: float(v) for k, v in record.items() if k != "step"}
