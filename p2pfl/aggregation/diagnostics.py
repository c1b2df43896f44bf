"""What one aggregation did besides returning a model: guards, fallbacks, per-input flags.

A rule can silently stop doing what its name says: Krum with too few inputs, a trimmed
mean that would trim everything, bucketing that leaves the attackers a majority of the
buckets. Each such decision is a `RuleEvent` with a stable `key` (what status and
metrics count) and a `detail` with this call's numbers (what a person reads). The
per-input flags say which inputs the rule itself treated as outliers (clipped, trimmed
away, left out by Krum); the node turns them into per-peer suspicion scores
(`aggregation.ledger`). Kernels fill a `Diagnostics` passed to them (an out-parameter,
so the model computation itself is unchanged); `Rule` freezes it into an
`AggregationReport`. docs/robustness.md ("Guards, fallbacks and suspicion") defines
every key and flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

EventKind = Literal["fallback", "guard"]

# The rule was replaced by the coordinate-wise median for this call.
TOO_FEW_INPUTS = "too_few_inputs"
# Bucketing used smaller buckets (or none) so the buckets can outvote f spoiled ones.
BUCKET_SIZE_REDUCED = "bucket_size_reduced"
# The rule ran, but on fewer inputs than it needs to outvote f (nothing better exists).
F_NOT_OUTVOTED = "f_not_outvoted"

# What a flagged input means, per rule family.
CLIPPED = "clipped"  # centred / self-centred clipping pulled it in to the radius
TRIMMED = "trimmed"  # outside the trimmed mean's kept band on most coordinates
EXCLUDED = "excluded"  # among the f worst Krum scores (Multi-Krum with m = n - f drops it)


@dataclass(frozen=True, slots=True)
class RuleEvent:
    """One guard or fallback: `key` is counted, `detail` is shown."""

    kind: EventKind
    key: str
    detail: str


@dataclass(slots=True, eq=False)
class Diagnostics:
    """Scratch a kernel fills while it runs (all optional)."""

    events: list[RuleEvent] = field(default_factory=list)
    flagged: np.ndarray | None = None  # bool (n,), aligned with the kernel's inputs
    evidence: str | None = None  # what a flag means (CLIPPED, TRIMMED, EXCLUDED)


@dataclass(frozen=True, slots=True, eq=False)
class AggregationReport:
    """What one call of a rule did. `flagged` is aligned with the call's input rows
    (None when the rule, as applied this call, says nothing about single inputs)."""

    n: int
    events: tuple[RuleEvent, ...] = ()
    flagged: np.ndarray | None = None
    evidence: str | None = None

    def first(self, kind: EventKind) -> RuleEvent | None:
        return next((e for e in self.events if e.kind == kind), None)

    @property
    def fallback(self) -> RuleEvent | None:
        return self.first("fallback")

    @property
    def guard(self) -> RuleEvent | None:
        return self.first("guard")
