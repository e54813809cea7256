"""How far does each adapter move the model in its first steps? MiniLM on CoLA, CPU, seconds a step.

For each variant of ``short_runs.VARIANTS`` (plus ``--probe`` ones) it runs ``--steps`` AdamW
steps of the short-run recipe at a constant learning rate (no warm-up, so that every variant
gets the same step sizes) and records, at a few steps:

* ``delta``: mean over adapted modules of ||ΔW(t) - ΔW(0)||_F, the update the training made;
* ``grad``: the gradient norm of each parameter role at that step;
* ``churn`` (bank factors): the share of sub-vectors whose top-k bank vectors changed since step 0;
* ``probe_loss``: the loss on a fixed set of 256 training sentences.

    OMP_NUM_THREADS=1 python -u benchmarks/update_size.py --variants lora,old_vblora,vblora --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import encode, read_task, take  # noqa: E402
from short_runs import VARIANTS, adapter_config, add_probe, parse_args as short_args  # noqa: E402


def deltas(model) -> dict[str, torch.Tensor]:
    from leanlora.layer import AdaptedLinear

    with torch.no_grad():
        return {n: m.delta_weight() for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def topk_sets(model) -> list[torch.Tensor]:
    from leanlora.factors.bank import BankFactors

    return [m.logits.detach().topk(m.topk, dim=-1).indices.sort(-1).values
            for m in model.modules() if isinstance(m, BankFactors)]


def run(args, variant: str, train: dict) -> dict:
    import leanlora
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, dtype=torch.float32)
    leanlora.inject(model, adapter_config(variant))
    opt = torch.optim.AdamW(leanlora.param_groups(model, lr=args.lr), lr=args.lr, weight_decay=0.0)
    d0, k0 = deltas(model), topk_sets(model)
    probe = torch.arange(256)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(train["labels"].shape[0], generator=g)
    out = {"variant": variant, "steps": {}}
    model.train()
    for step in range(args.steps):
        leanlora.advance(model, step)
        loss = model(**take(train, perm[step * 32:(step + 1) * 32])).loss
        loss.backward()
        record = step + 1 in args.at
        if record:
            grads = {}
            for group in opt.param_groups:
                gs = [p.grad.norm() ** 2 for p in group["params"] if p.grad is not None]
                grads[group["role"]] = float(torch.stack(gs).sum().sqrt()) if gs else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if record:
            d = deltas(model)
            row = {"delta": sum(float((d[n] - d0[n]).norm()) for n in d) / len(d), "grad": grads}
            if k0:
                k = topk_sets(model)
                row["churn"] = sum(float((a != b).any(-1).float().sum()) for a, b in zip(k, k0)) / \
                    sum(a.shape[0] * a.shape[1] for a in k0)
            with torch.no_grad():
                model.eval()
                row["probe_loss"] = float(model(**take(train, probe)).loss)
                model.train()
            out["steps"][step + 1] = row
            print(variant, step + 1, json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="lora,old_vblora,vblora")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--at", default="1,10,30")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", action="append", default=[])
    ap.add_argument("--glue", default="../shared/assets/glue")
    ap.add_argument("--out", default="runs/update_size.jsonl")
    args = ap.parse_args()
    args.at = {int(s) for s in args.at.split(",")}
    defaults = short_args([])
    args.model, glue = defaults.model, Path(args.glue)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    for spec in args.probe:
        p = json.loads(spec)
        add_probe(p["name"], tuple(p.get("axes", ())), p.get("overrides", {}))
    from transformers import AutoTokenizer

    train = encode(AutoTokenizer.from_pretrained(args.model), *read_task(glue, "CoLA", "train"), 64, "cpu")
    train["labels"] = train["labels"].long()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        assert variant in VARIANTS, f"unknown variant {variant!r}; known: {sorted(VARIANTS)}"
        res = run(args, variant, train)
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
