"""Rank strategies: which of the r components are on, and the scale of the update."""

from leanlora.ranks.fixed import FixedRanks

__all__ = ["FixedRanks"]
