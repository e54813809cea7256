"""How often a three-seed median misses a margin by chance: the resolving power of a quality bar.

Issue-style bars compare the median of three seeds of a method with that of a reference (for
example "within 1.0 point of LoRA"). This asks what such a bar says when the two are the *same*
method: from one method's recorded seeds of a task (eight, say), every way to draw two disjoint
sets of three is taken, and the share in which one median falls more than ``--margin`` under the
other is the chance that a method no different from the reference fails the bar on that task.
``--per-seed-margin`` asks the same of a per-seed bar ("every seed within 3 points"): over every
ordered choice of three pairs of distinct seeds, the share in which some pair's second score is
that far under its first (this treats two methods' runs of one seed as no more alike than two
seeds of one method).

    python -u benchmarks/seed_noise.py benchmarks/results/glue_rte_cola_8seeds_blora_plain_vs_diag_h100.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


def chance_of_missing(scores: list[float], margin: float, per_side: int = 3) -> float:
    """Share of ordered pairs of disjoint ``per_side``-subsets of ``scores`` whose second median is
    more than ``margin`` under the first."""
    if len(scores) < 2 * per_side:
        raise ValueError(f"{len(scores)} seeds cannot make two disjoint sets of {per_side}")
    misses = pairs = 0
    index = range(len(scores))
    for first in itertools.combinations(index, per_side):
        rest = [i for i in index if i not in first]
        reference = statistics.median(scores[i] for i in first)
        for second in itertools.combinations(rest, per_side):
            pairs += 1
            misses += statistics.median(scores[i] for i in second) < reference - margin
    return misses / pairs


def chance_any_seed_misses(scores: list[float], margin: float, seeds: int = 3) -> float:
    """Share of ordered choices of ``seeds`` pairs of distinct entries of ``scores`` in which some
    pair's second is more than ``margin`` under its first."""
    if len(scores) < 2 * seeds:
        raise ValueError(f"{len(scores)} seeds cannot make {seeds} pairs of distinct seeds")
    misses = choices = 0
    for pick in itertools.permutations(range(len(scores)), 2 * seeds):
        choices += 1
        misses += any(scores[pick[2 * i + 1]] < scores[pick[2 * i]] - margin for i in range(seeds))
    return misses / choices


def seeds_by_task(rows: list[dict], method: str) -> dict[tuple[str, int], dict[int, float]]:
    """(task, steps) -> {seed: score} of ``method``'s finished runs (a repeated seed: the last row)."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    for row in rows:
        if row.get("method") == method and "score" in row and "error" not in row:
            out.setdefault((row["task"], row["steps"]), {})[row["seed"]] = row["score"]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="quality.py JSONL rows")
    ap.add_argument("--method", default="lean_lora")
    ap.add_argument("--margin", type=float, default=1.0, help="points")
    ap.add_argument("--per-side", type=int, default=3, help="seeds a median is taken over")
    ap.add_argument("--per-seed-margin", type=float, default=3.0, help="points, for a bar on every seed")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    results = []
    for (task, steps), seeds in sorted(seeds_by_task(rows, args.method).items()):
        if len(seeds) < 2 * args.per_side:
            continue
        scores = [seeds[s] for s in sorted(seeds)]
        res = {"task": task, "steps": steps, "method": args.method, "seeds": len(scores),
               "spread": [round(min(scores), 2), round(max(scores), 2)],
               "chance_of_missing": round(chance_of_missing(scores, args.margin, args.per_side), 3),
               "chance_a_seed_misses": round(chance_any_seed_misses(scores, args.per_seed_margin, args.per_side), 3)}
        results.append(res)
        print(f"{task:>6} {steps:>5} steps  {len(scores)} seeds ({min(scores):.1f}-{max(scores):.1f}):  "
              f"P(median of {args.per_side} more than {args.margin} under another's) = "
              f"{res['chance_of_missing']:.2f};  "
              f"P(one of {args.per_side} seeds more than {args.per_seed_margin} under its pair) = "
              f"{res['chance_a_seed_misses']:.2f}")
    return results


if __name__ == "__main__":
    main()
