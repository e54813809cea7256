"""Reports: the cost table (text and JSON) and a plot of learned rank and bits per layer.

``write_report(model_or_dir, out_dir)`` takes a model holding an adapter, or an adapter folder
(``leanlora_config.json`` + ``leanlora_adapter.safetensors``). A folder is read without its base model:
the adapter is loaded onto a skeleton of weightless linear layers of the recorded shapes (a
zero-stride view, no memory), which is all that ranks, bits, MACs and bytes depend on.

Files written: ``cost.txt`` (the table), ``cost.json`` (:meth:`CostReport.to_dict`) and
``ranks_bits.png``: three heat maps, rows = module type (q_proj, v_proj, ...), columns = layer
index (the first integer in the module name), cells = effective rank / bits of A / bits of B.
Given the run's ``metrics.json``, also ``curves.png``: the training and eval loss, the cost
(BOPs and bytes as shares of LoRA-16) and the mean rank and bits over the steps, from the log
records the training loop kept (:mod:`leanlora.train.step_log`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from leanlora.reports.cost import CostReport, cost_report


def _skeleton(meta: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with the adapted linears (weightless) and the modules_to_save tensors."""
    root = nn.Module()

    def parent_of(name: str) -> tuple[nn.Module, str]:
        *path, leaf = name.split(".")
        node = root
        for p in path:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        return node, leaf

    for name, info in meta["modules"].items():
        in_f, out_f = info["in_features"], info["out_features"]
        lin = nn.Linear(in_f, out_f, bias=False, device="meta")
        lin.weight = nn.Parameter(torch.zeros(()).expand(out_f, in_f), requires_grad=False)
        node, leaf = parent_of(name)
        node.add_module(leaf, lin)
    for name in meta.get("modules_to_save", []):
        for key, t in tensors.items():
            if key.startswith(name + "."):
                node, leaf = parent_of(key)
                node.register_parameter(leaf, nn.Parameter(torch.zeros_like(t), requires_grad=False))
    return root


def load_for_report(directory: str | os.PathLike) -> nn.Module:
    """The adapter in ``directory`` on a weightless skeleton (no base model needed)."""
    from leanlora.artifact.io import load, read_adapter_config, read_adapter_tensors

    _, meta = read_adapter_config(directory)
    skeleton = _skeleton(meta, read_adapter_tensors(directory))
    return load(skeleton, directory, check_base=False, quantize_base=False)


def _layer_index(name: str) -> int:
    m = re.search(r"\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else 0


def plot_ranks_bits(report: CostReport, path: str | os.PathLike) -> Path:
    """PNG with heat maps of effective rank and bits of A and B, module type × layer index."""
    plt = _pyplot()
    kinds = sorted({r.module for r in report.layers})
    idxs = sorted({_layer_index(r.name) for r in report.layers})
    panels = [("effective rank", "rank"), ("bits of A", "bits_a"), ("bits of B", "bits_b")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.5 * len(idxs) + 2), 1.2 + 2.2 * len(panels) * max(1, len(kinds)) / 3))
    for ax, (title, key) in zip(axes, panels):
        grid = torch.full((len(kinds), len(idxs)), float("nan"))
        for r in report.layers:
            grid[kinds.index(r.module), idxs.index(_layer_index(r.name))] = float(getattr(r, key))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        mid = 0.5 * (float(grid.nan_to_num(float("inf")).min()) + float(grid.nan_to_num(float("-inf")).max()))
        for i, j in (~grid.isnan()).nonzero().tolist():  # dark text on the bright (yellow) end of viridis
            v = float(grid[i, j])
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7, color="k" if v > mid else "w")
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xticks(range(len(idxs)), [str(i) for i in idxs])
        ax.set_xlabel("layer")
        ax.set_title(title + (f" (of r={report.layers[0].r})" if key == "rank" and report.layers else ""))
        fig.colorbar(im, ax=ax)
    return _save_figure(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


Series = dict[str, tuple[list[int], list[float]]]


def curves(metrics: dict) -> dict[str, Series]:
    """The curves of a run's ``metrics.json`` (as a dict), by panel: ``loss`` (each step's task
    loss, the mean of each log record, the eval loss), ``prior`` (what the gates' prior added to each
    step's loss, in runs that had one), ``cost`` (BOPs and stored bytes in % of LoRA-16) and
    ``rank``/``bits`` (means over the adapted layers), each as (steps, values). Runs without log
    records draw rank and bits from their evaluations and no cost."""
    logged, evals = metrics.get("log_history", []), metrics.get("history", [])
    losses = metrics.get("train_losses", [])

    def series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        kept = [r for r in records if key in r]
        return [r["step"] for r in kept], [scale * r[key] for r in kept]

    loss: Series = {"train (each step)": (list(range(1, len(losses) + 1)), list(losses))}
    if logged:
        loss["train (mean)"] = series(logged, "loss")
    if any("loss" in r for r in evals):
        loss["eval"] = series(evals, "loss")
    cost: Series = {"BOPs": series(logged, "leanlora/bops_vs_lora16", 100),
                    "bytes": series(logged, "leanlora/bytes_vs_lora16", 100)} if logged else {}
    # log records name the adapter's state under leanlora/ (step_log.adapter_values); evaluations
    # hold rank and bits too, under their plain names, in runs that kept no log records
    gates, prefix = (logged, "leanlora/") if logged else (evals, "")
    priors = metrics.get("train_priors", [])
    prior: Series = {"prior (each step)": (list(range(1, len(priors) + 1)), list(priors))} if any(priors) else {}
    return {"loss": loss, "prior": prior, "cost": cost, "rank": {"rank": series(gates, prefix + "rank")},
            "bits": {"bits": series(gates, prefix + "bits")}}


def plot_curves(metrics: dict, path: str | os.PathLike) -> Path:
    """PNG of :func:`curves`: loss (with the prior on its own axis), cost as a share of LoRA-16, and
    mean rank with mean bits."""
    plt = _pyplot()
    drawn = curves(metrics)
    fig, (loss_ax, cost_ax, rank_ax) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    for ax, panel in ((loss_ax, "loss"), (cost_ax, "cost")):
        for label, (x, y) in drawn[panel].items():
            thin = label == "train (each step)"
            ax.plot(x, y, lw=0.6 if thin else 1.5, alpha=0.45 if thin else 1.0, marker=None if thin else ".",
                    label=label)
        if drawn[panel]:
            ax.legend(fontsize=8)
    if not drawn["cost"]:  # say why the panel is empty rather than draw a bare frame
        cost_ax.text(0.5, 0.5, "no log records in metrics.json", ha="center", va="center", transform=cost_ax.transAxes)
    loss_ax.set_ylabel("loss")
    if drawn["prior"]:  # its own axis: during a budget's ramp it runs many times above the task loss
        prior_ax = loss_ax.twinx()
        prior_ax.plot(*drawn["prior"]["prior (each step)"], lw=1.0, ls="--", color="C7")
        prior_ax.set_ylabel("prior (dashed)", color="C7")
    cost_ax.set_ylabel("% of LoRA-16")
    rank_ax.plot(*drawn["rank"]["rank"], marker=".", color="C0")
    rank_ax.set_ylabel("mean rank", color="C0")
    bits_ax = rank_ax.twinx()
    bits_ax.plot(*drawn["bits"]["bits"], marker=".", color="C1")
    bits_ax.set_ylabel("mean bits", color="C1")
    rank_ax.set_xlabel("optimizer step")
    return _save_figure(fig, path)


def write_report(model_or_adapter_dir: nn.Module | str | os.PathLike, out_dir: str | os.PathLike,
                 metrics: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write cost.txt, cost.json and ranks_bits.png to ``out_dir``, and curves.png when ``metrics``
    names a run's metrics.json; returns their paths."""
    model = model_or_adapter_dir
    report = cost_report(model if isinstance(model, nn.Module) else load_for_report(model))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "cost.txt", "json": out / "cost.json", "plot": out / "ranks_bits.png"}
    paths["table"].write_text(report.format_table() + "\n")
    paths["json"].write_text(report.to_json() + "\n")
    plot_ranks_bits(report, paths["plot"])
    if metrics is not None:
        paths["curves"] = plot_curves(json.loads(Path(metrics).read_text()), out / "curves.png")
    return paths


def _save_figure(fig, path: str | Path) -> Path:
    """Write a figure as a PNG (creating its folder) and release it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
