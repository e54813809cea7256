"""Precision strategies: fake-quantizers applied to the factors."""

from leanlora.precision.fixed import FixedBits, FrozenBits
from leanlora.precision.full import FullPrecision
from leanlora.precision.learned import LearnedBits

__all__ = ["FixedBits", "FrozenBits", "FullPrecision", "LearnedBits"]
