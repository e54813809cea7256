"""Float precision: the factor is used as it is (the adapter dtype's own bits)."""

from __future__ import annotations

import torch
from torch import nn


class FullPrecision(nn.Module):
    def __init__(self, dtype_bits: int = 32) -> None:
        super().__init__()
        self.dtype_bits = dtype_bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def bits(self) -> int:
        return self.dtype_bits

    def expected_bits(self) -> float:
        return float(self.dtype_bits)

    def extra_repr(self) -> str:
        return f"bits={self.dtype_bits}"
