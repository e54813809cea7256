"""Rank sweep: evaluate ONE nested-rank adapter at every rank and pick the rank to deploy.

    for b in ranks:  set_rank(model, b);  score_b = eval_fn(model)
    best   = argmax_b score_b                                  (argmin when lower is better)
    chosen = min { b : score_b within ``tolerance`` of best }  (absolute, in score units)

Each row also carries the deployed cost at that rank, summed over adapted layers:
    adapter bytes     Σ b·in·bits(A)/8 + out·b·bits(B)/8
    adapter MACs/tok  Σ b·(in + out)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from torch import nn

from leanlora.inject import adapted_layers, shared_state
from leanlora.targets import module_matches


def _nested(name: str, layer: nn.Module):
    ranks = layer.ranks
    if not callable(getattr(ranks, "set_rank", None)):
        raise TypeError(f"module {name!r} uses {type(ranks).__name__}; set_rank needs nested ranks "
                        "(AdapterConfig(ranks='nested'))")
    return ranks


def set_rank(model: nn.Module, b: int | None, modules: Iterable[str] | None = None) -> list[str]:
    """Use rank ``b`` in eval mode for every adapted module, or only those matching ``modules``.

    ``modules`` names modules as ``target_modules`` does (a list of names or dotted suffixes, or one
    full-name regex string). ``b=None`` goes back to
    each layer's default. Returns the names changed; raises ValueError naming the module and value
    when b is outside a layer's ranks, before any layer changes.
    """
    shared_state(model)
    patterns = None if modules is None else modules if isinstance(modules, str) else tuple(modules)
    picked = [(n, l) for n, l in adapted_layers(model) if patterns is None or module_matches(patterns, n)]
    if not picked:
        raise ValueError(f"set_rank: modules={patterns!r} match no adapted module")
    ranks = [(n, _nested(n, l)) for n, l in picked]
    for n, r in ranks:
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= r.rank):
            raise ValueError(f"set_rank: b={b!r} is outside the ranks 1..{r.rank} of module {n!r}")
    for _, r in ranks:
        r.set_rank(b)
    return [n for n, _ in ranks]


def rank_cost(model: nn.Module, b: int | None = None) -> tuple[int, int]:
    """(adapter bytes, adapter MACs per token) with every layer at rank b (None: each layer's eval rank)."""
    total_bytes = total_macs = 0
    for _, layer in adapted_layers(model):
        r = layer.ranks.active_rank() if b is None else min(b, layer.ranks.rank)
        total_bytes += (r * layer.in_features * layer.quant_a.bits() + layer.out_features * r * layer.quant_b.bits()) // 8
        total_macs += r * (layer.in_features + layer.out_features)
    return total_bytes, total_macs


@dataclass
class SweepRow:
    rank: int | float              # the nested rank b, or the mean rank over modules at a budget
    score: float
    adapter_bytes: int
    macs_per_token: int
    bops_vs_lora16: float | None = None   # BOPs over a plain LoRA-16 of the same modules and r
    budget: float | None = None           # the budget of a gated / learned-bits point


def _point(row: SweepRow) -> int | float:
    """What a row is chosen by: its budget, or its rank."""
    return row.rank if row.budget is None else row.budget


@dataclass
class SweepResult:
    """Scores of one adapter at each rank (nested) or budget (gated ranks, learned bits), and the
    point chosen from them: ``best_rank`` / ``chosen_rank`` hold budgets for a budget sweep."""

    rows: list[SweepRow]
    best_rank: int
    chosen_rank: int
    tolerance: float = 0.0
    higher_is_better: bool = True
    metric: str = "score"
    extra: dict = field(default_factory=dict)

    def row(self, point: int | float) -> SweepRow:
        return next(r for r in self.rows if _point(r) == point)

    def table(self) -> str:
        """Markdown table: rank, score, adapter bytes, MACs/token, BOPs / LoRA-16, budget; best and chosen marked."""
        lines = [f"| rank | {self.metric} | adapter bytes | adapter MACs/token | BOPs / LoRA-16 | budget | |",
                 "|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            mark = " ".join(m for m, on in (("best", _point(r) == self.best_rank),
                                             ("chosen", _point(r) == self.chosen_rank)) if on)
            rank = f"{r.rank:.2f}" if isinstance(r.rank, float) else f"{r.rank}"
            bops = "-" if r.bops_vs_lora16 is None else f"{r.bops_vs_lora16:.4f}"
            budget = "-" if r.budget is None else f"{r.budget:g}"
            lines.append(f"| {rank} | {r.score:.4f} | {r.adapter_bytes:,} | {r.macs_per_token:,} | {bops} | {budget} "
                         f"| {mark} |")
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def choose_rank(scores: dict[int, float], tolerance: float = 0.0, higher_is_better: bool = True) -> tuple[int, int]:
    """(best rank, smallest rank whose score is within ``tolerance`` of the best); NaN scores never win."""
    finite = {b: s for b, s in scores.items() if s == s}
    if not finite:
        raise ValueError("sweep: every score is NaN; nothing to choose from")
    sign = 1.0 if higher_is_better else -1.0
    best = max(sorted(finite), key=lambda b: sign * finite[b])  # ties: the smaller rank (max keeps the first)
    chosen = min(b for b, s in finite.items() if sign * (finite[best] - s) <= tolerance)
    return best, chosen


def sweep_ranks(model: nn.Module, eval_fn: Callable[[nn.Module], float], ranks: Iterable[int] | None = None,
                tolerance: float = 0.0, higher_is_better: bool = True, metric: str = "score") -> SweepResult:
    """Evaluate ``eval_fn(model)`` (in eval mode, no grad) at each rank; restore the ranks after.

    ``ranks`` defaults to 1..r. ``tolerance`` is absolute, in the units of the score.
    """
    from leanlora.reports.cost import cost_report

    shared_state(model)
    layers = [(n, _nested(n, l)) for n, l in adapted_layers(model)]
    r_max = min(r.rank for _, r in layers)
    ranks = list(range(1, r_max + 1)) if ranks is None else sorted(set(int(b) for b in ranks))
    before = [(r, r.chosen) for _, r in layers]

    def row(b: int, score: float) -> SweepRow:
        return SweepRow(b, score, *rank_cost(model), float(cost_report(model).total["bops_vs_lora"]))

    try:
        return sweep_points(model, ranks, lambda b: set_rank(model, b), row, eval_fn, tolerance, higher_is_better,
                            metric)
    finally:
        for r, chosen in before:
            r.chosen = chosen


def sweep_points(model: nn.Module, points: Iterable, set_point: Callable, row: Callable[..., SweepRow],
                 eval_fn: Callable, tolerance: float, higher_is_better: bool, metric: str) -> SweepResult:
    """The sweep of :func:`sweep_ranks` and :func:`leanlora.reports.budget_sweep.sweep_budgets`: at each
    point ``set_point(point)``, then ``eval_fn(model)`` in eval mode without grad, and ``row(point, score)``
    for the table; the model's train mode is restored after."""
    from leanlora.train.tasks import evaluating

    rows, scores = [], {}
    with evaluating(model):
        for point in points:
            set_point(point)
            scores[point] = float(eval_fn(model))
            rows.append(row(point, scores[point]))
    best, chosen = choose_rank(scores, tolerance, higher_is_better)
    return SweepResult(rows, best, chosen, tolerance, higher_is_better, metric)


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> Path:
    """PNG of score vs rank (left axis) and adapter bytes (right axis), chosen rank marked."""
    from leanlora.reports.report import _pyplot, _save_figure

    plt = _pyplot()
    ranks = [_point(r) for r in result.rows]
    by_budget = any(r.budget is not None for r in result.rows)
    name = "budget" if by_budget else "b"
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(ranks, [r.score for r in result.rows], "o-", color="tab:blue", label=result.metric)
    ax.axvline(result.chosen_rank, color="tab:green", ls="--", lw=1, label=f"chosen {name}={result.chosen_rank:g}")
    if result.best_rank != result.chosen_rank:
        ax.axvline(result.best_rank, color="tab:red", ls=":", lw=1, label=f"best {name}={result.best_rank:g}")
    ax.set_xlabel("budget (fraction of LoRA-16 BOPs)" if by_budget else "rank b")
    ax.set_ylabel(result.metric)
    ax.set_xticks(ranks)
    ax2 = ax.twinx()
    ax2.plot(ranks, [r.adapter_bytes / 1024 for r in result.rows], "s:", color="tab:gray", ms=3)
    ax2.set_ylabel("adapter KiB", color="tab:gray")
    ax.legend(loc="best", fontsize=8)
    return _save_figure(fig, path)


def export_rank(model: nn.Module, b: int, directory: str | os.PathLike, *, peft: bool = False) -> Path:
    """Write the adapter at rank ``b``: a PEFT LoRA (``peft=True``, model unchanged apart from its
    eval rank) or a plain leanlora adapter pruned to b (the model's adapters are pruned in place)."""
    from leanlora.artifact.export import export_peft
    from leanlora.artifact.io import save

    set_rank(model, b)
    if peft:
        return export_peft(model, directory)
    for _, layer in adapted_layers(model):
        layer.prune_(b)
    return save(model, directory)
