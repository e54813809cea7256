"""Budget sweep: ONE trained gated / learned-bits adapter, re-thresholded at several budgets, scored at each.

    order = removal_order(model)                 one global order over every module's components and bit levels
    for β in budgets:  close the shortest prefix of the order whose removal brings BOPs <= β · LoRA-16
                       score_β = eval_fn(model)
    best   = argmax_β score_β;   chosen = min { β : score_β within ``tolerance`` of best }

No retraining: the gates are set (pinned) to each structure and restored afterwards. The order is
:func:`leanlora.budget.removal_order`'s: by gate probability, price and distortion for an adapter
trained without a budget, and the frozen order itself for one trained with ``adapter.budget``, so
that its own budget gives back exactly the structure it was trained to. The rows are the nested-rank
sweep's (:class:`leanlora.reports.sweep.SweepResult`), with the budget and the BOPs over LoRA-16 filled in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from torch import nn

from leanlora import budget as bud
from leanlora.inject import shared_state
from leanlora.reports.sweep import SweepResult, SweepRow, sweep_points


class BudgetPoints:
    """The global order of one adapter, computed once; :meth:`set` pins the structure of any budget."""

    def __init__(self, model: nn.Module) -> None:
        if not bud.gate_chains(model)[1]:
            config = shared_state(model).config
            raise ValueError(f"a budget sweep needs gated ranks or learned bits; this adapter has "
                             f"ranks={config.ranks!r}, precision={config.precision!r}")
        self.order, self.costs, self.full, self.chains = bud.removal_order(model)

    def set(self, budget: float) -> int:
        """Pin the gates to the structure of ``budget``; returns how many items it closes."""
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget={budget!r} is invalid: must be a fraction of LoRA-16 BOPs in (0, 1]")
        closed = bud.closed_items(self.order, self.costs, self.full, budget)
        bud.apply_pins(self.chains, bud.pinned_values(self.chains, self.order, len(closed)))
        return len(closed)


def sweep_budgets(model: nn.Module, eval_fn: Callable[[nn.Module], float], budgets: Iterable[float],
                  tolerance: float = 0.0, higher_is_better: bool = True, metric: str = "score") -> SweepResult:
    """Evaluate ``eval_fn(model)`` (eval mode, no grad) at each budget; the gates are restored after."""
    from leanlora.reports.cost import cost_report

    budgets = sorted({float(b) for b in budgets}, reverse=True)
    points = BudgetPoints(model)
    saved = {c.name: c.log_alpha.detach().clone() for c in points.chains}

    def row(budget: float, score: float) -> SweepRow:
        t = cost_report(model).total
        return SweepRow(float(t["mean_rank"]), score, int(t["adapter_bytes"]), int(t["macs"]),
                        float(t["bops_vs_lora"]), budget)

    try:
        return sweep_points(model, budgets, points.set, row, eval_fn, tolerance, higher_is_better, metric)
    finally:  # every gate back as it was
        bud.apply_pins(points.chains, saved)


def export_budget(model: nn.Module, budget: float, directory: str | os.PathLike, *, peft: bool = False) -> Path:
    """Write the adapter at ``budget``, finalized (pruned, packed): a leanlora adapter, or a PEFT LoRA
    with ``peft=True``. The model's gates are pinned to that structure and it is finalized in place."""
    from leanlora.artifact.export import export_peft
    from leanlora.artifact.finalize import finalize
    from leanlora.artifact.io import save

    BudgetPoints(model).set(budget)
    finalize(model)
    return export_peft(model, directory) if peft else save(model, directory)
