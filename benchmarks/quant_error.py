"""How much of a trained adapter's update survives quantizing its factors, and what the range choice costs.

Trains one leanlora row of ``quality.py`` (same recipe, one task, one seed), takes every adapted
layer's float factors A (r, in) and B (out, r) as training left them, and reports the relative
error ‖B~A~ − BA‖_F / ‖BA‖_F of the update (median over layers) when both factors are quantized
on the symmetric b-bit grid with

* ``tensor``: one range per factor, max|w| (what ``precision: fixed`` does);
* ``component``: one range per rank component (row of A, column of B), max over it;
* ``tensor, clipped`` / ``component, clipped``: the range shrunk to the fraction of max|w| in
  {0.20, 0.225, …, 1.0} that minimises the factor's own squared error (an MSE-optimal clip).

For a learned-bit row it also reports the range B-LoRA learned (exp(log_scale), a fraction of
max|w|, median over quantizers) and the widths it chose.

    python -u benchmarks/quant_error.py --model <minilm> --glue <glue> --task CoLA --steps 800 \\
        --method lean_lora --out quant_error.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
from leanlora.precision import fixed  # noqa: E402

CLIPS = torch.linspace(0.2, 1.0, 33).tolist()
A_REDUCE, B_REDUCE = (1,), (0,)  # the dims a component's range runs over: along a row of A, down a column of B


def fake_quant(w: torch.Tensor, bits: int, dims: tuple[int, ...], clip: float = 1.0) -> torch.Tensor:
    """``precision: fixed``'s symmetric grid (2^(b-1) - 1 steps a side) with its range, max|w| over
    ``dims``, shrunk to ``clip`` of it."""
    return fixed.fake_quant(w, clip * fixed.absmax_scale(w, bits, dims), bits, torch.round)


def clipped(w: torch.Tensor, bits: int, dims: tuple[int, ...]) -> torch.Tensor:
    """The quantized w at the clip in CLIPS that minimises ‖q(w) − w‖ (one clip for all of ``dims``' groups)."""
    return min((fake_quant(w, bits, dims, c) for c in CLIPS), key=lambda q: float((q - w).norm()))


def update_errors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int) -> dict[str, float]:
    """Median over layers of ‖B~A~ − BA‖ / ‖BA‖ for each way of choosing the range."""
    ways = {
        "tensor": lambda a, b: (fake_quant(a, bits, (0, 1)), fake_quant(b, bits, (0, 1))),
        "component": lambda a, b: (fake_quant(a, bits, A_REDUCE), fake_quant(b, bits, B_REDUCE)),
        "tensor, clipped": lambda a, b: (clipped(a, bits, (0, 1)), clipped(b, bits, (0, 1))),
        "component, clipped": lambda a, b: (clipped(a, bits, A_REDUCE), clipped(b, bits, B_REDUCE)),
    }
    out = {}
    for way, quantize in ways.items():
        errs = []
        for a, b in factors.values():
            delta = b @ a
            qa, qb = quantize(a, b)
            errs.append(float((qb @ qa - delta).norm() / delta.norm()))
        out[way] = statistics.median(errs)
    return out


def spread(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """How unlike the rank components are in size: largest over smallest norm, median over layers."""
    return {"b_columns": statistics.median(float(b.norm(dim=0).max() / b.norm(dim=0).min()) for _, b in factors.values()),
            "a_rows": statistics.median(float(a.norm(dim=1).max() / a.norm(dim=1).min()) for a, _ in factors.values())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--glue", required=True)
    ap.add_argument("--task", default="CoLA")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--method", default="lean_lora", help="a leanlora row of benchmarks/adapters.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--out", default=None, help="JSON file of the result")
    mine = ap.parse_args(argv)
    args = quality.parse_args(["--model", mine.model, "--glue", mine.glue, "--steps", f"{mine.task}={mine.steps}"])

    from leanlora.inject import adapted_layers

    seen: dict = {}

    def on_trained(model) -> None:
        factors, ranges, widths = {}, [], []
        for name, layer in adapted_layers(model):
            a, b = layer.factors()
            factors[name] = (a.detach().double().cpu(), b.detach().double().cpu())
            for q in (layer.quant_a, layer.quant_b):
                if hasattr(q, "log_scale"):
                    ranges.append(float(q.log_scale.detach().exp()))
                    widths.append(q.bits())
        seen.update(factors=factors, ranges=ranges, widths=widths)

    res = quality.run_job(args, mine.task, mine.method, mine.seed, {}, on_trained=on_trained)
    factors = seen["factors"]
    result = {"task": mine.task, "steps": mine.steps, "method": mine.method, "seed": mine.seed, "score": res.get("score"),
              "layers": len(factors), "component_spread": spread(factors),
              "update_error": {b: update_errors(factors, b) for b in (int(x) for x in mine.bits.split(","))}}
    if seen["ranges"]:
        result["learned_range"] = {"median": statistics.median(seen["ranges"]), "min": min(seen["ranges"]),
                                   "max": max(seen["ranges"]), "widths": sorted(set(seen["widths"]))}
    print(json.dumps(result, indent=2))
    print("| bits | " + " | ".join(next(iter(result["update_error"].values()))) + " |")
    print("|---" * (1 + len(next(iter(result["update_error"].values())))) + "|")
    for b, row in result["update_error"].items():
        print(f"| {b} | " + " | ".join(f"{100 * v:.1f} %" for v in row.values()) + " |")
    if mine.out:
        Path(mine.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
