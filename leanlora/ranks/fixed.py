"""Fixed ranks (LoRA): every component is on; scale alpha / r (alpha / sqrt(r) with rsLoRA)."""

from __future__ import annotations

import torch
from torch import nn

from leanlora.groups.rows import StackedRows


def lora_scale(alpha: float, rank: int | torch.Tensor, rslora: bool) -> float | torch.Tensor:
    """alpha / r, or alpha / sqrt(r) (rsLoRA, arXiv:2312.03732); r may be a tensor (nested ranks)."""
    return alpha / (rank ** 0.5 if rslora else rank)


class PrefixRanks:
    """The finalize side of a selector whose kept components are a prefix 0..k-1 (fixed, nested).

    Such a selector has no gates and no diagonal E: finalizing it is pruning to the kept prefix.
    """

    finalized = False    # no gate-free state of its own: pruning is its finalize
    keep_mask = None     # every stored component is on
    e_store = None       # no diagonal E

    def keep_indices(self) -> torch.Tensor:
        return torch.arange(self.active_rank())

    def diag_quantizer(self) -> None:
        return None

    diagonal = diag_quantizer  # no diagonal E, so no (E, quantizer) pair either

    def finalize_(self, keep: int, e_store: nn.Module | None = None, e_bits: int = 32, e_quantized: bool = False,
                  keep_mask: torch.Tensor | None = None) -> None:
        if keep < self.rank:
            self.prune_(keep)


class FixedRanks(PrefixRanks, StackedRows, nn.Module):
    def __init__(self, rank: int, alpha: float, rslora: bool = False) -> None:
        super().__init__()
        self.rank, self.alpha, self.rslora = rank, alpha, rslora

    def select(self, a: torch.Tensor, b: torch.Tensor):
        return a, b, None, lora_scale(self.alpha, self.rank, self.rslora)

    def active_rank(self) -> int:
        return self.rank

    def expected_rank(self) -> float:
        return float(self.rank)

    def prune_(self, keep: int) -> None:
        # Keeping alpha/r unchanged after pruning would rescale the update; fold it into alpha.
        self.alpha = self.alpha * lora_scale(1.0, self.rank, self.rslora) / lora_scale(1.0, keep, self.rslora)
        self.rank = keep

    def extra_repr(self) -> str:
        return f"r={self.rank}, alpha={self.alpha:g}{', rslora' if self.rslora else ''}"
