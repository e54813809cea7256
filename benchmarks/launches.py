"""Operator count of one eager training step, per method, beside PEFT's (CPU; a proxy for launches).

Eager adapter training on a GPU is launch-bound once the adapter math is many small tensors
(gates, quantizer levels): each ATen operator that reaches a backend is one kernel launch there.
This counts them for one step (forward + loss + prior + backward) with a dispatch mode, on a tiny
Llama, for every leanlora method and the PEFT anchors in the same process. View-only operators
(view, t, slice, detach, ...) are counted apart: they launch nothing.

    python benchmarks/launches.py                      # all rows, tiny Llama, r = 8, 7 projections
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import METHODS, Shape, apply, unavailable  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIEWS = {"view", "_unsafe_view", "t", "slice", "select", "detach", "expand", "permute", "unsqueeze", "squeeze",
         "transpose", "as_strided", "alias", "reshape", "split", "unbind", "_reshape_alias"}
DEFAULT_ROWS = "peft_lora,peft_vblora,peft_adalora,lean_lora,lean_dylora,lean_vblora,lean_blora,lean_combo"


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kernels, self.views = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in VIEWS:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def tiny_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def count_row(name: str, layers: int, r: int) -> dict:
    method = METHODS[name]
    why = unavailable(method)
    if why:
        return {"row": name, "skipped": why}
    model = tiny_llama(layers)
    shape = Shape(targets=TARGETS, r=r, alpha=2.0 * r, bank_vectors=32, bank_length=32, total_step=100)
    model, groups, hook = apply(method, model, shape, "CAUSAL_LM", torch.float32)
    model.train()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    def step(i: int) -> None:
        if method.library == "leanlora":
            import leanlora

            leanlora.advance(model, i)
        loss = model(input_ids=x, labels=x).loss
        if method.library == "leanlora" and method.has_prior:
            import leanlora

            loss = loss + leanlora.regularizer(model)
        loss.backward()

    step(0)  # first call: lazy initialisation out of the count
    model.zero_grad(set_to_none=True)
    counter = OpCount()
    with counter:
        step(1)
    adapted = layers * len(TARGETS)
    return {"row": name, "method": method.name, "kernels": counter.kernels, "views": counter.views,
            "adapted_modules": adapted}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    args = ap.parse_args(argv)
    rows = [count_row(n.strip(), args.layers, args.r) for n in args.rows.split(",") if n.strip()]
    ref = next((r["kernels"] for r in rows if r["row"] == "peft_lora" and "kernels" in r), None)
    base = tiny_llama(args.layers)
    base.requires_grad_(False)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    counter = OpCount()
    with counter:
        base(input_ids=x, labels=x).loss
    print(f"tiny Llama, {args.layers} layers x {len(TARGETS)} projections, r={args.r}; one step = forward + "
          f"loss (+ prior) + backward. The frozen base's forward alone: {counter.kernels} kernels.")
    print("| method | kernels / step | × PEFT LoRA | adapter kernels per adapted module | views |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['row']} | skipped: {r['skipped']} | | | |")
            continue
        per = (r["kernels"] - (ref or 0)) / r["adapted_modules"] if ref else float("nan")
        ratio = f"{r['kernels'] / ref:.2f}" if ref else "–"
        print(f"| {r['method']} | {r['kernels']:,} | {ratio} | {per:+.0f} vs PEFT LoRA | {r['views']:,} |")


if __name__ == "__main__":
    main()
