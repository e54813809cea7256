"""Rank strategies: which of the r components are on, and the scale of the update."""

from leanlora.ranks.fixed import FixedRanks
from leanlora.ranks.gated import GatedRanks
from leanlora.ranks.nested import NestedRanks, RankSampler

__all__ = ["FixedRanks", "GatedRanks", "NestedRanks", "RankSampler"]
