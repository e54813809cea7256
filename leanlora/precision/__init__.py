"""Precision strategies: fake-quantizers applied to the factors.

Every strategy (in :mod:`~leanlora.precision.full`, :mod:`~leanlora.precision.fixed` and
:mod:`~leanlora.precision.learned`) satisfies :class:`Quantizer`; the layer, finalize and the cost
report use nothing else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Quantizer(Protocol):
    """Fake-quantizer of one factor; identity for float precision."""

    def __call__(self, w: torch.Tensor) -> torch.Tensor: ...

    def bits(self) -> int:
        """Bit-width in use now (eval semantics); 32 means float."""

    def expected_bits(self) -> float: ...

    def quantized(self) -> bool:
        """True when finalize stores the factor as packed integer codes + an fp32 scale."""

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int32 codes, fp32 scale) with scale·codes = the eval-mode output; None if stored as float."""
