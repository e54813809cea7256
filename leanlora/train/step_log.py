"""What the training loop records every ``train.log_every`` steps.

One record per log step, kept in the run's ``metrics.json`` (``log_history``, the data of
``leanlora report``'s curves) and sent to every ``train.report_to`` tracker:

* ``loss``: the mean training loss of the steps since the previous record;
* ``learning_rate``: the adapter group's rate after this step's scheduler update (the next step's);
* ``grad_norm``: the global gradient norm of this step, before clipping;
* ``rank``, ``bits``: the mean expected rank and bits over the adapted layers (``gate_summary``);
* ``bops_vs_lora16``, ``bytes_vs_lora16``: the adapter's cost now, as the cost table counts it
  (:func:`leanlora.cost.cost_report`: BOPs and stored bytes as shares of a 16-bit LoRA of the same r);
* ``loss_scale``: the fp16 gradient scaler's scale, when there is one.

The loss is averaged from the loop's per-step losses (checkpointed), not from a running window,
so a resumed run writes the same records as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlora.cost import cost_report
from leanlora.summary import gate_summary


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
    record.update(gate_summary(model))
    total = cost_report(model).total
    record["bops_vs_lora16"], record["bytes_vs_lora16"] = total["bops_vs_lora"], total["bytes_vs_lora"]
    if scaler is not None:
        record["loss_scale"] = float(scaler.get_scale())
    return record


def last_logged_step(log_history: list[dict[str, Any]]) -> int:
    return log_history[-1]["step"] if log_history else 0


def tracked(record: dict[str, Any]) -> dict[str, float]:
    """A record's scalars for the trackers (the step travels separately)."""
    return {k: float(v) for k, v in record.items() if k != "step"}
