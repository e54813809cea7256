"""Float precision: the factor is used as it is (the adapter dtype's own bits)."""

from __future__ import annotations

import torch
from torch import nn

from leanlora.groups.rows import StackedRows


class FullPrecision(StackedRows, nn.Module):
    def __init__(self, dtype_bits: int = 32) -> None:
        super().__init__()
        self.dtype_bits = dtype_bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def bits(self) -> int:
        return self.dtype_bits

    def expected_bits(self) -> float:
        return float(self.dtype_bits)

    def quantized(self) -> bool:
        """False: the factor is stored as float values, not integer codes (see leanlora.artifact.packing)."""
        return False

    def encode(self, w: torch.Tensor) -> None:
        """No integer codes: finalize stores a float factor as it is."""
        return None

    def extra_repr(self) -> str:
        return f"bits={self.dtype_bits}"
