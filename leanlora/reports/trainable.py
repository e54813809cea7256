"""Trainable and total parameter counts, as PEFT's ``print_trainable_parameters`` prints them.

A frozen base weight held quantized counts at its dense size, as PEFT counts a 4-bit weight: NF4
and FP8 bases (:class:`~leanlora.base.dense.QuantizedBase`) hold codes that are no parameters at
all, or parameters of another shape when FSDP2 shards them; bitsandbytes packs two 4-bit values
into each element of its ``Params4bit``.
"""

from __future__ import annotations

from torch import nn

from leanlora.base.dense import QuantizedBase
from leanlora.inject import adapted_layers


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of ``model``, quantized base weights at their dense size."""
    quantized = [layer.base for _, layer in adapted_layers(model) if isinstance(layer.base, QuantizedBase)]
    held = {id(p) for base in quantized for name, p in base.named_parameters(recurse=False) if name != "bias"}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
                for p in model.parameters() if id(p) not in held)
    total += sum(base.in_features * base.out_features for base in quantized)
    return trainable, total
