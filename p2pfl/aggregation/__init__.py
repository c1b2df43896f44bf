"""Aggregation rules: stacked inputs (n, d) -> one model (d,).

A rule is a plain callable `(inputs (n, d) float32, sample counts (n,), own model (d,))
-> (d,) float32`, so robust rules drop in without touching the round protocol. Build
one with `make_rule(name, f=..., options=...)`; see docs/robustness.md for what each
rule guarantees and its defaults. After each call a `Rule` holds an
`AggregationReport` (its guards, fallbacks and per-input flags), which a
`RobustnessLedger` turns into counts and per-peer suspicion scores.
"""

from p2pfl.aggregation.diagnostics import AggregationReport, RuleEvent
from p2pfl.aggregation.ledger import RobustnessLedger
from p2pfl.aggregation.registry import (
    RULE_CHOICES,
    RULE_NAMES,
    RULES,
    Rule,
    TimedRule,
    get_rule,
    make_rule,
    min_inputs,
    resolve_rule,
)
from p2pfl.aggregation.rules import AggregationRule, mean

__all__ = [
    "RULES",
    "RULE_CHOICES",
    "RULE_NAMES",
    "AggregationReport",
    "AggregationRule",
    "RobustnessLedger",
    "Rule",
    "RuleEvent",
    "TimedRule",
    "get_rule",
    "make_rule",
    "mean",
    "min_inputs",
    "resolve_rule",
]
