"""Base strategies: the frozen pretrained weight, dense or quantized.

Every strategy (in :mod:`~leanlora.base.dense`, :mod:`~leanlora.base.nf4`, :mod:`~leanlora.base.fp8` and
:mod:`~leanlora.base.bnb4`) satisfies :class:`BaseWeight`; the layer, merge and unload use nothing else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BaseWeight(Protocol):
    """The frozen base linear map; never trained."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def dense_weight(self) -> torch.Tensor:
        """W0 (out, in) as a dense tensor (dequantized when the base is quantized)."""

    def add_delta_(self, delta: torch.Tensor) -> dict[str, float]:
        """W0 += delta (out, in) in place; returns any error the storage format added."""

    def snapshot(self) -> object:
        """An exact copy of the stored weight, for a bit-exact unmerge."""

    def restore_(self, snapshot: object) -> None:
        """Put back a :meth:`snapshot`."""

    def nbytes(self) -> int:
        """Bytes held by the base weight (quantization constants included)."""

    def as_module(self) -> torch.nn.Module:
        """A plain module equivalent to the base, for unload."""
