"""Quality, size and adapter cost of leanlora methods against PEFT anchors: MiniLM on GLUE dev sets.

Every method goes through the same loop here (same data order per seed, batch, steps, schedule,
loss and evaluation), so differences come from the adapters alone. leanlora rows use
``leanlora.param_groups`` (role learning rates: bank, logits, gates); PEFT VB-LoRA gets the
same bank/logits learning rates by parameter name. Per run we record the dev score, trainable
parameters, stored bytes (the adapter's safetensors file after ``finalize`` for leanlora,
``save_pretrained`` for PEFT; both include the classifier head), adapter BOPs (``leanlora.cost_report``;
the same formula — MACs × weight bits × 16 activation bits — for PEFT, at the ranks in use) and
the train time. DyLoRA/QDyLoRA rows evaluate every rank from the one run and report the best.

MiniLM is launch-bound, so ``--workers N`` runs N jobs at once on the one GPU; train times are
then measured under that sharing (the same for every method) and say so in the output.

    python -u benchmarks/quality.py --model .carry/minilm --glue .carry/glue --tasks SST-2,RTE \\
        --seeds 0,1,2 --workers 4 --out $OUT/quality.jsonl --plot $OUT/pareto.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import METHODS, Shape, apply, trainable_count, unavailable  # noqa: E402

# (text columns, label column, header, kind, primary metric); CoLA has no header (column 3 = sentence).
TASKS = {
    "SST-2": (("sentence",), "label", True, "cls", "accuracy"),
    "CoLA": (("3",), "1", False, "cls", "matthews"),
    "MRPC": (("#1 String", "#2 String"), "Quality", True, "cls", "accuracy"),
    "RTE": (("sentence1", "sentence2"), "label", True, "cls", "accuracy"),
    "STS-B": (("sentence1", "sentence2"), "score", True, "reg", "pearson"),
}
TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
DEFAULT_METHODS = "lean_lora,lean_qdylora,lean_vblora,lean_blora,peft_lora,peft_vblora,peft_adalora"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="MiniLM folder (config.json, model.safetensors, tokenizer)")
    ap.add_argument("--glue", default="", help="folder holding the GLUE task folders")
    ap.add_argument("--tasks", default="SST-2,RTE")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default="SST-2=1000,CoLA=800,MRPC=600,RTE=600,STS-B=800",
                    help="optimizer steps per task (task=steps, comma separated)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--bank-vectors", type=int, default=0, help="VB-LoRA h (0: leanlora's default; paper GLUE: 90)")
    ap.add_argument("--bank-length", type=int, default=0,
                    help="VB-LoRA b; must divide 384 and 1536 (0: leanlora's default)")
    ap.add_argument("--workers", type=int, default=1, help="jobs run at once on the one device")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="a worker starts no new job after this many seconds (0: no limit); jobs run seed-major")
    ap.add_argument("--jobs", default="", help="explicit task:method:seed list (overrides tasks/methods/seeds)")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="no training: summarize and plot these result JSONL files (e.g. from several device calls)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="quality.jsonl")
    ap.add_argument("--plot", default=None, help="Pareto plot PNG (score vs BOPs and vs bytes)")
    ap.add_argument("--gate-lr", type=float, default=0.0, help="gate learning rate of gated rows (0: the row's own)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0,
                    help="clip the global gradient norm to this (0: no clipping); 1.0 is leanlora train's and "
                         "the HF Trainer's default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


# --- data ----------------------------------------------------------------------------------------

def read_task(folder: Path, task: str, split: str) -> tuple[list[tuple[str, ...]], list[float]]:
    import csv

    cols, label, header, _, _ = TASKS[task]
    with open(folder / task / f"{split}.tsv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    names = rows[0] if header else [str(i) for i in range(len(rows[0]))]
    rows = rows[1:] if header else rows
    idx = [names.index(c) for c in cols]
    li = names.index(label)
    rows = [r for r in rows if len(r) > max(idx + [li]) and r[li] != ""]
    return [tuple(r[i] for i in idx) for r in rows], [float(r[li]) for r in rows]


def encode(tok, texts, labels, max_len: int, device) -> dict[str, torch.Tensor]:
    cols = list(zip(*texts))
    enc = tok(*cols, truncation=True, max_length=max_len, padding="longest", return_tensors="pt")
    out = {k: v.to(device) for k, v in enc.items()}
    out["labels"] = torch.tensor(labels, device=device)
    return out


def take(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch trimmed to its longest sequence (fewer padded positions; launch-bound model)."""
    batch = {k: v[idx] for k, v in data.items()}
    n = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :n] if v.dim() == 2 else v) for k, v in batch.items()}


# --- one run -------------------------------------------------------------------------------------

def score(task: str, preds: list[float], labels: list[float]) -> dict[str, float]:
    from leanlora.train.metrics import classification_metrics, regression_metrics

    if TASKS[task][3] == "reg":
        return regression_metrics(preds, labels)
    return classification_metrics([int(p) for p in preds], [int(y) for y in labels], 2)


@torch.no_grad()
def evaluate(model, task: str, dev: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    preds = []
    n = dev["labels"].shape[0]
    for i in range(0, n, 256):
        batch = take(dev, torch.arange(i, min(i + 256, n), device=dev["labels"].device))
        batch.pop("labels")
        logits = model(**batch).logits.float()
        preds += (logits[:, 0] if TASKS[task][3] == "reg" else logits.argmax(-1)).tolist()
    model.train()
    return score(task, preds, dev["labels"].tolist())


def peft_cost(model, method) -> dict:
    """Bytes of ``save_pretrained`` and BOPs at the ranks in use (16-bit activations, fp32 weights)."""
    macs = 0
    for mod in model.modules():
        a = getattr(mod, "lora_A", None)
        if isinstance(a, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and "default" in a:
            w = a["default"]
            rank = (w.weight if hasattr(w, "weight") else w).shape[0]
            e = getattr(mod, "lora_E", None)
            if isinstance(e, torch.nn.ParameterDict) and "default" in e:
                rank = int((e["default"] != 0).sum())  # AdaLoRA: pruned singular values are zeroed
            macs += rank * (mod.in_features + mod.out_features)
        elif isinstance(getattr(mod, "vblora_logits_A", None), torch.nn.ParameterDict) and "default" in mod.vblora_logits_A:
            macs += mod.r["default"] * (mod.in_features + mod.out_features)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        nbytes = sum(p.stat().st_size for p in Path(d).rglob("*.safetensors"))
    return {"stored_bytes": nbytes, "bops": macs * 32 * 16, "macs": macs}


def lean_cost(model, method) -> dict:
    import leanlora

    out = {}
    rep = leanlora.cost_report(model).total
    out.update(bops=rep["bops"], macs=rep["macs"], predicted_bytes=rep["stored_bytes"],
               mean_rank=rep["mean_rank"], mean_bits=(rep["mean_bits_a"] + rep["mean_bits_b"]) / 2)
    try:
        leanlora.finalize(model)
        with tempfile.TemporaryDirectory() as d:
            leanlora.save(model, d, topk_only="bank" in method.axes)
            out["stored_bytes"] = sum(p.stat().st_size for p in Path(d).rglob("*.safetensors"))
    except Exception as err:  # report it; the cost report's count stands in
        out["finalize_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        out["stored_bytes"] = rep["stored_bytes"]
    return out


def default_bank(model: torch.nn.Module):
    """leanlora's default bank with its ``vector_length: auto`` made concrete for the targeted layers."""
    import leanlora
    from leanlora.inject import resolve_vector_length

    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)}
    return resolve_vector_length(leanlora.AdapterConfig(factors="bank"), shapes).bank


def run_job(args, task: str, name: str, seed: int, data_cache: dict, on_trained=None) -> dict:
    """Train ``name`` on ``task`` with ``seed`` and score it; ``on_trained(model)``, if given, sees the
    trained model before any evaluation (benchmarks/quant_error.py reads its factors there)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = torch.device(args.device)
    method = METHODS[name]
    if args.gate_lr and "gated" in method.axes:  # e.g. a shorter or longer run than the row's default
        method = dataclasses.replace(method, name=f"{method.name} [gate lr {args.gate_lr:g}]",
                                     overrides={**method.overrides, "gates": {"lr": args.gate_lr}})
    res = {"task": task, "method": name, "label": method.name, "seed": seed}
    why = unavailable(method)
    if why:
        return {**res, "skipped": why}
    if task not in data_cache:
        tok = AutoTokenizer.from_pretrained(args.model)
        folder = Path(args.glue)
        data_cache[task] = tuple(encode(tok, *read_task(folder, task, s), args.max_len, device)
                                 for s in ("train", "dev"))
    train, dev = data_cache[task]
    reg = TASKS[task][3] == "reg"
    steps = dict(kv.split("=") for kv in args.steps.split(","))
    n_steps = int(steps[task])
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=1 if reg else 2, dtype=torch.float32,
        problem_type="regression" if reg else "single_label_classification").to(device)
    if reg:
        train["labels"] = train["labels"].float()
    else:
        train["labels"] = train["labels"].long()
    import leanlora

    bank = default_bank(model) if method.library == "peft" else None  # PEFT's VB-LoRA: leanlora's default bank
    shape = Shape(targets=TARGETS, r=args.r, alpha=2.0 * args.r,
                  bank_vectors=args.bank_vectors or (bank.num_vectors if bank else 0),
                  bank_length=args.bank_length or (bank.vector_length if bank else "auto"), topk=2,
                  adalora_target_r=args.r // 2,
                  total_step=n_steps, modules_to_save=("classifier",))
    model, groups, hook = apply(method, model, shape, "SEQ_CLS", torch.float32, lr=args.lr)
    if method.kind == "vblora":  # leanlora's bank / logits learning rates (BankConfig defaults), by name
        bank_cfg = leanlora.BankConfig()
        bank = [p for n, p in model.named_parameters() if p.requires_grad and "vector_bank" in n]
        logits = [p for n, p in model.named_parameters() if p.requires_grad and "logits" in n]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and "vector_bank" not in n and "logits" not in n]
        groups = [{"params": bank, "lr": bank_cfg.bank_lr, "weight_decay": 0.0},
                  {"params": logits, "lr": bank_cfg.logits_lr, "weight_decay": 0.0},
                  {"params": rest, "lr": args.lr}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warm = max(1, n_steps // 16)
    res["trainable"] = trainable_count(model)
    lean = method.library == "leanlora"
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = train["labels"].shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    model.train()
    params = [p for pg in opt.param_groups for p in pg["params"]]
    norms, losses = [], []  # kept on the device, read once after the run
    if lean:
        leanlora.budget.start(model, n_steps)  # a budget's schedule is in fractions of the run
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(n_steps):
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos: pos + args.batch].to(device)
        pos += args.batch
        f = (step + 1) / warm if step < warm else (n_steps - step) / max(1, n_steps - warm)  # linear warm-up, decay
        for pg, lr in zip(opt.param_groups, base_lrs):
            pg["lr"] = lr * f
        if lean:
            leanlora.advance(model, step)
        loss = model(**take(train, idx)).loss
        if lean and method.has_prior:
            loss = loss + leanlora.regularizer(model).to(loss.device)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or math.inf))
        losses.append(loss.detach())
        opt.step()
        if hook is not None:
            hook(step)
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    res["train_s"] = time.perf_counter() - t0
    res["steps"] = n_steps
    res["final_loss"] = float(loss.detach())
    res["max_grad_norm"] = args.max_grad_norm
    res.update(training_trace(torch.stack(norms).float().cpu(), torch.stack(losses).float().cpu()))
    if not math.isfinite(res["final_loss"]):
        res["error"] = "training diverged (non-finite loss)"
    metric = TASKS[task][4]
    if on_trained is not None:
        on_trained(model)
    if lean and "nested" in method.axes:
        per_rank = {}
        for b in range(1, args.r + 1):
            leanlora.set_rank(model, b)
            per_rank[b] = evaluate(model, task, dev)[metric]
        best = max(per_rank, key=per_rank.get)
        leanlora.set_rank(model, best)
        res.update(per_rank=per_rank, best_rank=best, score_full_rank=per_rank[args.r])
    m = evaluate(model, task, dev)
    res["metrics"], res["score"] = m, 100 * m[metric]
    try:
        res.update(lean_cost(model, method) if lean else peft_cost(model, method))
    except Exception as err:
        res["cost_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    del model, opt
    return res


def training_trace(norms: torch.Tensor, losses: torch.Tensor) -> dict:
    """What the gradient norm (before clipping) and the loss did: spikes and the curve in tenths."""
    med = float(norms.median())
    tenths = [float(c.mean()) for c in losses.chunk(10)]
    return {"grad_norm": {"median": med, "p99": float(norms.quantile(0.99)), "max": float(norms.max()),
                          "argmax": int(norms.argmax()), "over_10x_median": int((norms > 10 * med).sum())},
            "loss_tenths": [round(x, 4) for x in tenths]}


# --- driver --------------------------------------------------------------------------------------

def jobs(args) -> list[tuple[str, str, int]]:
    if args.jobs:  # explicit task:method:seed list, e.g. to fill in what an earlier run left out
        return [(t, m, int(s)) for t, m, s in (j.split(":") for j in args.jobs.split(","))]
    return [(t, m, int(s)) for s in args.seeds.split(",") for t in args.tasks.split(",")
            for m in args.methods.split(",")]


def worker(args) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(f"{args.out}.part{args.worker}")
    cache: dict = {}
    t0 = time.perf_counter()
    for i, (task, name, seed) in enumerate(jobs(args)):
        if i % args.workers != args.worker:
            continue
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            res = {"task": task, "method": name, "seed": seed, "skipped": f"time budget {args.budget_s:.0f} s spent"}
            with out.open("a") as f:
                f.write(json.dumps(res) + "\n")
            continue
        try:
            res = run_job(args, task, name, seed, cache)
        except Exception as err:
            import traceback

            traceback.print_exc()
            res = {"task": task, "method": name, "seed": seed, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        res["workers"] = args.workers
        print(json.dumps(res), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(res) + "\n")


def summarize(rows: list[dict]) -> tuple[list[dict], str]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    summary, lines = [], ["| task | method | score (median) | seeds: scores | trainable | stored bytes | adapter BOPs/token | train s | notes |",
                          "|---|---|---|---|---|---|---|---|---|"]
    for (task, name), rs in sorted(groups.items()):
        ok = [r for r in rs if "score" in r and "error" not in r]
        note = "; ".join(sorted({r.get("skipped") or r.get("error") or r.get("finalize_error") or r.get("cost_error") or ""
                                 for r in rs} - {""}))
        if not ok:
            lines.append(f"| {task} | {METHODS[name].name} | – | | | | | | {note} |")
            continue
        med = lambda k: statistics.median(r[k] for r in ok if k in r) if any(k in r for r in ok) else float("nan")  # noqa: E731
        s = dict(task=task, method=name, label=METHODS[name].name, score=med("score"), trainable=med("trainable"),
                 stored_bytes=med("stored_bytes"), bops=med("bops"), train_s=med("train_s"), n=len(ok))
        if any("best_rank" in r for r in ok):
            note = (note + "; " if note else "") + "best rank per seed " + ",".join(str(r["best_rank"]) for r in ok) \
                + f"; full-rank score {statistics.median(100 * r['score_full_rank'] for r in ok):.1f}"
        if any("mean_rank" in r for r in ok) and METHODS[name].has_prior:
            note = (note + "; " if note else "") + f"mean rank {med('mean_rank'):.1f}, mean bits {med('mean_bits'):.1f}"
        summary.append(s)
        seeds = ", ".join(f"{r['score']:.1f}" for r in ok)
        lines.append(f"| {task} | {s['label']} | {s['score']:.1f} | {seeds} | "
                     f"{s['trainable']:,.0f} | {s['stored_bytes']:,.0f} | {s['bops']:,.0f} | {s['train_s']:.1f} | {note} |")
    return summary, "\n".join(lines)


def pareto_plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        pts = [s for s in summary if s["task"] == task]
        for j, (key, xlabel) in enumerate((("bops", "adapter BOPs per token"), ("stored_bytes", "stored bytes"))):
            ax = axes[i][j]
            for s in pts:
                ax.scatter(s[key], s["score"], marker="o" if s["method"].startswith("lean") else "x")
                ax.annotate(s["label"].replace("leanlora ", "").replace("PEFT ", "PEFT "), (s[key], s["score"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{task} dev score (median of seeds)")
            ax.grid(alpha=0.3)
    fig.suptitle("MiniLM-L6 on GLUE dev: score vs adapter cost (o leanlora, x PEFT)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker is not None:
        worker(args)
        return
    if args.merge is not None:
        rows = [json.loads(line) for p in args.merge for line in Path(p).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "skipped" not in r or "budget" not in r["skipped"]]
        summary, text = summarize(rows)
        print(text)
        Path(args.out).write_text(text + "\n")
        if args.plot and summary:
            pareto_plot(summary, args.plot)
        return
    if not (args.model and args.glue):
        sys.exit("quality.py: --model and --glue are required unless --merge is given")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in out.parent.glob(out.name + ".part*"):
        p.unlink()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-u", __file__] + (argv if argv is not None else sys.argv[1:])
    procs = [subprocess.Popen(cmd + ["--worker", str(w)]) for w in range(args.workers)]
    codes = [p.wait() for p in procs]
    rows = []
    for p in sorted(out.parent.glob(out.name + ".part*")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        p.unlink()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, text = summarize(rows)
    header = (f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}; "
              f"{args.workers} concurrent job(s); wall {time.perf_counter() - t0:.0f} s; worker exit codes {codes}")
    print(header + "\n" + text, flush=True)
    (out.with_suffix(".md")).write_text(header + "\n\n" + text + "\n")
    if args.plot and summary:
        pareto_plot(summary, args.plot)


if __name__ == "__main__":
    main()
