"""Precision strategies: fake-quantizers applied to the factors."""

from leanlora.precision.full import FullPrecision

__all__ = ["FullPrecision"]
