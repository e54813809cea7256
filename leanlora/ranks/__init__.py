"""Rank strategies: which of the r components are on, and the scale of the update.

Every strategy (in :mod:`~leanlora.ranks.fixed`, :mod:`~leanlora.ranks.nested` and
:mod:`~leanlora.ranks.gated`) satisfies :class:`RankSelector`; the layer, finalize and the cost report use
nothing else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class RankSelector(Protocol):
    """Chooses the active components and the scale of the update; finalize makes the choice final."""

    rank: int
    finalized: bool                  # holds a gate-free layout of its own (after finalize_)
    keep_mask: torch.Tensor | None   # finalized: zeros stored components that are closed
    e_store: nn.Module | None        # finalized: the stored diagonal E, if any

    def select(self, a: torch.Tensor,
               b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | torch.Tensor]: ...

    def active_rank(self) -> int:
        """Components in use now (eval semantics): r, the chosen b, or the open gates."""

    def expected_rank(self) -> float:
        """Expected number of components in use under the current (possibly random) rule."""

    def keep_indices(self) -> torch.Tensor:
        """Indices (long, ascending) of the components the eval-mode layer uses."""

    def diagonal(self) -> tuple[torch.Tensor, nn.Module] | None:
        """(E, its quantizer) of a trainable diagonal between B and A; None without one."""

    def diag_quantizer(self) -> nn.Module | None:
        """The quantizer of E, trained or frozen (cost accounting reads its bits); None without E."""

    def prune_(self, keep: int) -> None:
        """Keep components 0..keep-1 for good, leaving their update unchanged."""

    def finalize_(self, keep: int, e_store: nn.Module | None, e_bits: int, e_quantized: bool,
                  keep_mask: torch.Tensor | None) -> None:
        """Hold ``keep`` components for good, E as ``e_store``; ``keep_mask`` zeros closed ones."""
