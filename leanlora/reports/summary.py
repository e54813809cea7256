"""Expected rank and bits of the adapter right now, for progress bars and training logs."""

from __future__ import annotations

from torch import nn

from leanlora.budget import summary as budget_summary
from leanlora.inject import adapted_layers


def gate_summary(model: nn.Module) -> dict[str, float]:
    """Mean over adapted layers of the expected rank and the expected bits of A and B."""
    ranks, bits = [], []
    for _, layer in adapted_layers(model):
        ranks.append(layer.ranks.expected_rank())
        bits.append(0.5 * (layer.quant_a.expected_bits() + layer.quant_b.expected_bits()))
    if not ranks:
        return {"rank": 0.0, "bits": 0.0}
    # with adapter.budget: the expected cost (fraction of LoRA-16 BOPs), its target and λ
    return {"rank": sum(ranks) / len(ranks), "bits": sum(bits) / len(bits), **budget_summary(model)}
