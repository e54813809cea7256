"""Name every operator of an eager leanlora training step that waits for the GPU (CUDA only).

A step that reads a device value back to the host (``.item()``, a data-dependent branch inside an
operator) stalls the host until the GPU catches up, and cannot be captured as a CUDA graph
(``leanlora.train.step_graph``). torch's synchronisation check raises at such an operator; this
script catches it per operator, names it, and lets the step go on. A tiny random Llama is enough:
the operators are the same at every size.

    python -u benchmarks/sync_check.py      # one line per design point: the synchronising operators, or none
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leanlora  # noqa: E402
from leanlora.optim import adamw  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POINTS = [("gated", "learned", "dense", "dense"), ("gated", "learned", "bank", "nf4"), ("nested", "float", "dense", "nf4")]


class NameSynchronisingOperators(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except RuntimeError as err:
            if "synchronizing" not in str(err):
                raise
            self.found.add(str(func))
            torch.cuda.set_sync_debug_mode(0)
            try:
                return func(*args, **(kwargs or {}))
            finally:
                torch.cuda.set_sync_debug_mode("error")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def check(point) -> list[str]:
    ranks, precision, factors, base = point
    config = leanlora.AdapterConfig(target_modules=TARGETS, r=4, alpha=8, ranks=ranks, precision=precision,
                                    factors=factors, base=base,
                                    bank=leanlora.BankConfig(num_vectors=16, vector_length=16),
                                    nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32))
    model = leanlora.inject(tiny_llama().cuda(), config).train()  # a cache, so no packed-sequence check
    optimizer = adamw(leanlora.param_groups(model, 1e-2, 0.0), lr=1e-2)
    namer = NameSynchronisingOperators()
    for i in range(2):  # the first step creates the optimizer's state; the second is checked
        leanlora.advance(model, i)
        x = torch.randint(0, 128, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(i))
        if i:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with namer if i else contextlib.nullcontext():
                loss = model(input_ids=x, labels=x).loss + leanlora.regularizer(model)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        except RuntimeError as err:  # raised outside any operator (the autograd engine, a hook)
            namer.found.add(f"outside an operator: {str(err)[:200]}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sorted(namer.found)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("sync_check.py needs a CUDA device: synchronisation is a GPU notion")
    for point in POINTS:
        found = check(point)
        print(f"synchronising operators, {point} : {found or 'none'}", flush=True)


if __name__ == "__main__":
    main()
