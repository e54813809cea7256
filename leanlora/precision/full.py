"""Float precision: the factor is used as it is (the adapter dtype's own bits)."""

from __future__ import annotations

import torch
from torch import nn

from leanlora.groups.rows import StackedRows


class FixedWidth(StackedRows, nn.Module):
    """A quantizer whose width is one number, ``nbits``: what it reports, now and expected.

    Unless a subclass says otherwise the factor is stored as float values, not integer codes.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.nbits = bits

    def bits(self) -> int:
        return self.nbits

    def expected_bits(self) -> float:
        return float(self.nbits)

    def quantized(self) -> bool:
        """False: the factor is stored as float values, not integer codes (see leanlora.artifact.packing)."""
        return False

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """No integer codes: finalize stores a float factor as it is."""
        return None

    def extra_repr(self) -> str:
        return f"bits={self.nbits}"


class FullPrecision(FixedWidth):
    def __init__(self, dtype_bits: int = 32) -> None:
        super().__init__(dtype_bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w
