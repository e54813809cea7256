"""Factor strategies: where A (r, in) and B (out, r) come from.

Every strategy (in :mod:`~leanlora.factors.dense` and :mod:`~leanlora.factors.bank`) satisfies
:class:`Factors`; the layer, finalize and the cost report use nothing else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Factors(Protocol):
    """Source of the low-rank factors A (r, in) and B (out, r)."""

    rank: int
    in_features: int
    out_features: int
    # True when the factors are the matrices themselves, so finalize can keep any subset of
    # rows; False when they are composed at run time and keep a prefix (closed ones masked)
    stores_rows: bool

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def compact_nbytes(self, rank: int, elem: int) -> int | None:
        """Bytes of its own compact form at ``rank`` components (``elem`` bytes a float), or None
        when it stores the rows themselves, whose bytes follow from the quantizers' bits."""

    def prune_(self, keep: int) -> None:
        """Keep only components 0..keep-1 for good (finalize)."""
