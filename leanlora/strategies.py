"""The four strategy protocols that one :class:`~leanlora.layer.AdaptedLinear` composes.

Each axis of the design is one protocol; an implementation is a small ``nn.Module`` so that its
parameters and buffers live in the layer's state dict. The layer never asks which implementation
it holds: everything it needs goes through these methods.

    y = base(x) + scale · B~ · diag(d) · A~ · dropout(x)

    factors()          -> A (r, in), B (out, r)             where A and B come from
    quant_a / quant_b  -> A~, B~                            at what precision they live
    ranks.select(A, B) -> A~[:b], B~[:, :b], d or None, scale   which components are on
    base(x)            -> x W0^T + bias                      the frozen weight
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

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def prune_(self, keep: int) -> None:
        """Keep only components 0..keep-1 for good (finalize)."""
        ...


@runtime_checkable
class RankSelector(Protocol):
    """Chooses the active components and the scale of the update."""

    rank: int

    def select(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | torch.Tensor]: ...

    def active_rank(self) -> int:
        """Components in use now (eval semantics): r, the chosen b, or the open gates."""
        ...

    def expected_rank(self) -> float:
        """Expected number of components in use under the current (possibly random) rule."""
        ...

    def prune_(self, keep: int) -> None:
        """Keep components 0..keep-1 for good, leaving their update unchanged (finalize)."""
        ...


@runtime_checkable
class Quantizer(Protocol):
    """Fake-quantizer of one factor; identity for float precision."""

    def __call__(self, w: torch.Tensor) -> torch.Tensor: ...

    def bits(self) -> int:
        """Bit-width in use now (eval semantics); 32 means float."""
        ...

    def expected_bits(self) -> float: ...

    def quantized(self) -> bool:
        """True when finalize stores the factor as packed integer codes + an fp32 scale."""
        ...

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int32 codes, fp32 scale) with scale·codes = the eval-mode output; None if stored as float."""
        ...


@runtime_checkable
class BaseWeight(Protocol):
    """The frozen base linear map; never trained."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def dense_weight(self) -> torch.Tensor:
        """W0 (out, in) as a dense tensor (dequantized when the base is quantized)."""
        ...

    def add_delta_(self, delta: torch.Tensor) -> dict[str, float]:
        """W0 += delta (out, in) in place; returns any error the storage format added."""
        ...

    def snapshot(self) -> object:
        """An exact copy of the stored weight, for a bit-exact unmerge."""
        ...

    def restore_(self, snapshot: object) -> None:
        """Put back a :meth:`snapshot`."""
        ...

    def nbytes(self) -> int:
        """Bytes held by the base weight (quantization constants included)."""
        ...

    def as_module(self) -> torch.nn.Module:
        """A plain module equivalent to the base, for unload."""
        ...
