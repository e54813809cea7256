"""Expected rank and bits of the adapter right now, for progress bars and training logs."""

from __future__ import annotations

from torch import nn

from leanlora.budget import summary as budget_summary
from leanlora.inject import adapted_layers


def gate_summary(model: nn.Module) -> dict[str, float]:
    """Mean over adapted layers of the expected rank and the expected bits of A and B."""
    layers = [layer for _, layer in adapted_layers(model)]
    if not layers:
        return {"rank": 0.0, "bits": 0.0}
    rank = sum(layer.ranks.expected_rank() for layer in layers)
    bits = sum(0.5 * (layer.quant_a.expected_bits() + layer.quant_b.expected_bits()) for layer in layers)
    # with adapter.budget: the expected cost (fraction of LoRA-16 BOPs), its target and λ
    return {"rank": rank / len(layers), "bits": bits / len(layers), **budget_summary(model)}
