"""Golden outputs of the 36 design points, written once and checked by ``tests/test_golden.py``.

For each point (factors dense|bank × ranks fixed|nested|gated × precision float|fixed|learned ×
base dense|nf4) a tiny random Llama (fixed seed) is injected through the public API and trained
five steps on one fixed batch, with leanlora's own parameter groups and AdamW and the loop of the
README (``advance``, loss + ``regularizer``). Written under ``tests/golden/``:

* ``losses.json``: per point, the five task losses and the five regularizer terms;
* ``adapters/<point>/``: ``leanlora.save`` of the trained adapter (its tensors are the golden
  tensors), and ``adapters/<point>-final/``: ``leanlora.save`` after ``leanlora.finalize``;
* ``outputs.safetensors``: per saved folder, the eval-mode logits of the adapted model on
  ``PROBE``, which a fresh model loading that folder must reproduce.

Every setting that has a default likely to move is given explicitly (``budget=None``: the gates
follow the λ-weighted prior alone), so the goldens pin the computation, not today's defaults.

Run from the repository root: ``.venv/bin/python tests/golden/make_goldens.py``. Regenerate only
for a change of results that is meant, and say in the commit why the numbers moved; the adapter
folders are the files earlier versions wrote, so keep them unless their format is retired.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ADAPTERS = HERE / "adapters"
LOSSES = HERE / "losses.json"
OUTPUTS = HERE / "outputs.safetensors"

POINTS = [
    "-".join(p) for p in itertools.product(("dense", "bank"), ("fixed", "nested", "gated"),
                                           ("float", "fixed", "learned"), ("dense", "nf4"))]
STEPS = 5
LR = 1e-2
TARGETS = ("v_proj", "down_proj")  # two shapes, each in both layers: 32→16, 64→32
VOCAB = 64


def tiny_llama():
    """A 2-layer, hidden-32 Llama with fixed random weights (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def batch(seed: int, rows: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, seq), generator=g)


TRAIN = batch(1, 2, 12)
PROBE = batch(7, 1, 6)


def config(point: str):
    import leanlora

    factors, ranks, precision, base = point.split("-")
    return leanlora.AdapterConfig(
        target_modules=TARGETS, r=4, alpha=8.0, factors=factors, ranks=ranks, precision=precision,
        base=base, budget=None,
        bank=leanlora.BankConfig(num_vectors=8, vector_length=16, topk=2, bank_lr=1e-2),  # pinned: not the default
        nf4=leanlora.NF4Config(block_size=16, scaler_block_size=16),
        nested=leanlora.NestedConfig(full_share=0.0),  # pinned: DyLoRA's draw, not the default
        gated=leanlora.GatedConfig(diag=True))  # pinned: AdaLoRA's B·diag(E)·A, not the default


def train(point: str):
    """(adapted model after STEPS steps, task losses, regularizer terms)."""
    import leanlora
    from leanlora.optim import adamw

    model = tiny_llama()
    leanlora.inject(model, config(point))
    torch.manual_seed(1)  # the hard-concrete gate samples draw from the global generator
    opt = adamw(leanlora.param_groups(model, lr=LR), lr=LR)
    model.train()
    losses, priors = [], []
    for step in range(STEPS):
        leanlora.advance(model, step)
        task = model(TRAIN, labels=TRAIN).loss
        prior = leanlora.regularizer(model)
        (task + prior).backward()
        opt.step()
        opt.zero_grad()
        losses.append(task.item())
        priors.append(float(prior.detach()))
    model.eval()
    return model, losses, priors


def probe(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits.detach().clone()


def main() -> None:
    import leanlora
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    shutil.rmtree(ADAPTERS, ignore_errors=True)
    record, outputs = {}, {}
    for point in POINTS:
        model, losses, priors = train(point)
        record[point] = {"loss": losses, "regularizer": priors}
        leanlora.save(model, ADAPTERS / point)
        outputs[point] = probe(model)
        leanlora.finalize(model)
        leanlora.save(model, ADAPTERS / f"{point}-final")
        outputs[f"{point}-final"] = probe(model)
        print(point, " ".join(f"{v:.6f}" for v in losses), file=sys.stderr)
    LOSSES.write_text(json.dumps({"steps": STEPS, "points": record}, indent=1) + "\n")
    save_file(outputs, OUTPUTS)


if __name__ == "__main__":
    main()
