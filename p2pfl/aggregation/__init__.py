"""Aggregation rules: stacked updates (n, d) -> one model (d,).

A rule is a plain function so robust rules (median, trimmed mean, clipping, ...) drop
in without touching the round protocol.
"""

from p2pfl.aggregation.rules import RULES, AggregationRule, get_rule, mean

__all__ = ["RULES", "AggregationRule", "get_rule", "mean"]
