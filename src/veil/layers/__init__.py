"""Stochastic conditional noise layers, their output distributions, selection layers and placements."""

from veil.layers.distributions import Distribution, create_distribution, list_distributions
from veil.layers.placement import MergeAfter, MergeBefore, OnInput, merge
from veil.layers.scnl import ConditionalStochastic, SCNLAdditive, SCNLBase, SCNLConv2d, SCNLLinear
from veil.layers.selection import AdaptiveSelection, SoftSelection, expand_selection, hard_selection

__all__ = [
    "AdaptiveSelection",
    "ConditionalStochastic",
    "Distribution",
    "MergeAfter",
    "MergeBefore",
    "OnInput",
    "SCNLAdditive",
    "SCNLBase",
    "SCNLConv2d",
    "SCNLLinear",
    "SoftSelection",
    "create_distribution",
    "expand_selection",
    "hard_selection",
    "list_distributions",
    "merge",
]
