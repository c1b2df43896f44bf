"""Rule names and options -> a ready aggregation callable (`make_rule`).

The callable (`Rule`) owns what the pure kernels should not: option validation, the
rule's seeded generators (bucketing, diagnostics), and the checks of its parameters
against each call's inputs:

- a **fallback** when a rule gets fewer inputs than it can run on (Krum with
  n <= 2f + 2, a trimmed mean that would trim everything): the coordinate-wise median;
- a **guard** on bucketing: f attackers spoil up to f buckets whatever their size, so
  the buckets must be as many as the inner rule needs inputs to outvote f; when they
  are not, this call uses the largest bucket size that gives enough (or no bucketing);
- a **warning event** when even that is short (a median of n <= 2f inputs).

Each is a `RuleEvent` in the call's `AggregationReport` (`Rule.last_report`), logged on
`p2pfl.aggregation` once per reason as a warning (then at debug level) and never
raised: a node on a sparse graph must keep training. The node counts them in status
and metrics (`aggregation.ledger`); docs/robustness.md has the conditions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pfl.aggregation import bucketing, clipping, coordinate, geomed, krum, nnm
from p2pfl.aggregation.diagnostics import (
    BUCKET_SIZE_REDUCED,
    CLIPPED,
    EXCLUDED,
    F_NOT_OUTVOTED,
    TOO_FEW_INPUTS,
    TRIMMED,
    AggregationReport,
    Diagnostics,
    RuleEvent,
)
from p2pfl.aggregation.rules import bounded_weights, mean
from p2pfl.logs import event

log = logging.getLogger("p2pfl.aggregation")

RULE_NAMES: tuple[str, ...] = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "geometric_median",
    "centered_clipping",
    "self_centered_clipping",
    "clipped_gossip",
)

AUTO = "auto"
"""The default rule name: the mean while the node tolerates no one (f = 0), else the
recommended robust rule. Setting `tolerate` alone then buys robustness; before, the
default mean took f and ignored it."""
RECOMMENDED_RULE = "centered_clipping"
RECOMMENDED_OPTIONS: dict[str, Any] = {"spread": 2.0, "reject": 1.5}
"""Chosen from measurements (docs/robustness.md, "Radius floor: one configuration for
both settings"): within 1 point of the mean on clean heterogeneous runs, and within
3 points of clean (6-regular) or >= 88% (25-node mesh) under every attack tried."""
RULE_CHOICES: tuple[str, ...] = (AUTO, *RULE_NAMES)
"""What a config or scenario may name: the rules, and `auto`."""


_warned_mean: list[int] = []


def resolve_rule(name: str, f: int, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The concrete rule and options `name` stands for (only `auto` stands for another:
    the mean at f = 0, else RECOMMENDED_RULE with RECOMMENDED_OPTIONS under the user's)."""
    if name != AUTO:
        return name, dict(options)
    if f == 0:
        return "mean", dict(options)
    return RECOMMENDED_RULE, {**RECOMMENDED_OPTIONS, **options}


# Options every rule accepts (bucketing, or nearest-neighbour mixing, wraps any rule).
_COMMON_OPTIONS = ("bucket_size", "bucket_seed", "nnm")
_RULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "mean": (),
    "median": (),
    "trimmed_mean": ("beta",),
    "krum": (),
    "multi_krum": ("m",),
    "geometric_median": ("iterations", "eps"),
    "centered_clipping": ("tau", "iterations", "reject", "spread"),
    "self_centered_clipping": ("tau", "reject", "spread"),
    "clipped_gossip": ("tau", "reject"),
}
# Seed of the generator that picks the coordinates a trimmed mean's flags look at (it
# only affects the diagnostics, never the model).
_DIAGNOSTICS_SEED = 0x5EED

# (stacked inputs, weights, own, diagnostics to fill) -> aggregate, or None when there
# are too few inputs for the rule to run at all.
Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray, Diagnostics], np.ndarray | None]


@dataclass
class Rule:
    """An aggregation rule instance: call it like any `AggregationRule`.

    `need` is the number of inputs (with bucketing: of buckets) the rule needs to
    outvote f arbitrary ones. After each call, `last_report` says what the call did
    (events and per-input flags); `fallbacks` counts calls answered by the median
    fallback and `last_fallback` says why the latest one happened (None if the latest
    call used the rule itself).
    """

    name: str
    f: int
    options: Mapping[str, Any]
    kernel: Kernel
    need: int = 1
    fallbacks: int = 0
    last_fallback: str | None = None
    last_report: AggregationReport | None = None
    _logged: set[str] = field(default_factory=set, repr=False)

    def __call__(self, x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
        self.last_report = None  # a call that raises leaves no stale report behind
        out, report = self.aggregate(x, weights, own)
        self.last_report = report
        fallback = report.fallback
        self.last_fallback = None if fallback is None else fallback.detail
        if fallback is not None:
            self.fallbacks += 1
        for rule_event in report.events:
            self._log(rule_event)
        return out

    def aggregate(
        self, x: np.ndarray, weights: np.ndarray, own: np.ndarray
    ) -> tuple[np.ndarray, AggregationReport]:
        """The aggregate and the report of this call, without logging or counting (the
        bucketing wrapper runs its inner rule this way and reports for it)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        own = np.ascontiguousarray(own, dtype=np.float32)
        weights = bounded_weights(weights)
        if x.ndim != 2 or own.shape != (x.shape[1],) or weights.shape != (x.shape[0],):
            raise ValueError(
                f"aggregation inputs: expected (n, d), (n,), (d,); got "
                f"{x.shape}, {weights.shape}, {own.shape}"
            )
        n = x.shape[0]
        if n == 0:
            return own.copy(), AggregationReport(0)
        if n == 1:
            return np.array(x[0]), AggregationReport(1)
        diag = Diagnostics()
        out = self.kernel(x, weights, own, diag)
        if out is None:
            diag.events.append(
                RuleEvent(
                    "fallback",
                    TOO_FEW_INPUTS,
                    f"{self.name} with f={self.f} needs {self.need} inputs, had {n}: "
                    "used the coordinate-wise median",
                )
            )
            diag.flagged = diag.evidence = None
            out = coordinate.median(x, weights, own)
        elif n < self.need and not any(
            e.key in (TOO_FEW_INPUTS, F_NOT_OUTVOTED) for e in diag.events
        ):
            diag.events.append(
                RuleEvent(
                    "guard",
                    F_NOT_OUTVOTED,
                    f"{self.name} with f={self.f} on {n} inputs: f spoiled inputs are not "
                    f"outvoted (needs {self.need})",
                )
            )
        return out, AggregationReport(n, tuple(diag.events), diag.flagged, diag.evidence)

    def _log(self, ev: RuleEvent) -> None:
        """A warning the first time per reason, then debug: a sparse node would
        otherwise log the same line every round (status counts every one)."""
        level = logging.DEBUG if ev.key in self._logged else logging.WARNING
        self._logged.add(ev.key)
        fields = event(f"aggregation.{ev.kind}", rule=self.name, reason=ev.key, detail=ev.detail)
        if ev.kind == "fallback":
            log.log(
                level, "%s (falling back; counted in status, logged once)", ev.detail, extra=fields
            )
        else:
            log.log(
                level,
                "%s (guard %s; counted in status, logged once)",
                ev.detail,
                ev.key,
                extra=fields,
            )


class TimedRule:
    """A rule whose every call is timed into `timing["aggregate_s"]` (the node's round
    row); otherwise the rule itself (its counters, reports and name read through)."""

    def __init__(self, rule: Rule, timing: dict[str, float]) -> None:
        self.rule = rule
        self.timing = timing

    def __call__(self, x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.rule(x, weights, own)
        finally:
            self.timing["aggregate_s"] = time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rule, name)


def make_rule(name: str, *, f: int = 0, options: Mapping[str, Any] | None = None) -> Rule:
    """Build the rule `name` (or `auto`, see `resolve_rule`) tolerating `f` Byzantine
    inputs.

    Raises ValueError naming the unknown rule, the unknown option or the bad value.
    """
    if name not in RULE_CHOICES:
        raise ValueError(f"unknown aggregation rule {name!r}; available: {', '.join(RULE_CHOICES)}")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"tolerate (f) must be an integer >= 0, got {f!r}")
    name, options = resolve_rule(name, f, options or {})
    if name == "mean" and f > 0 and not _warned_mean:
        _warned_mean.append(f)  # once per process: in-process scenarios build many
        log.warning(
            "aggregation rule 'mean' outvotes no one: tolerate = %d protects nothing "
            "(use the default 'auto' or a robust rule, docs/robustness.md)",
            f,
            extra=event("aggregation.mean_with_tolerate", f=f),
        )
    opts = _Options(name, options or {})
    kernel = _kernel(name, f, opts)
    need = min_inputs(name, f, opts.optional_number("beta", low=0.0, below=0.5))
    s = opts.optional_integer("bucket_size", minimum=2)
    seed = opts.integer("bucket_seed", 0, minimum=0)
    mixing = opts.boolean("nnm", False)
    opts.finish()
    if mixing and s is not None:
        raise ValueError(
            "aggregation options 'nnm' and 'bucket_size' are alternatives (both reduce the "
            "honest spread before the rule); choose one"
        )
    full_name = name
    if mixing:
        kernel = _mixed(kernel, f)
        full_name = f"{name}+nnm"
    if s is not None:
        inner = Rule(name, f, dict(opts.values), kernel, need=need)
        kernel = _bucketed(inner, s, np.random.default_rng(seed))
        full_name = f"{name}+bucketing({s})"
    return Rule(full_name, f, dict(opts.values), kernel, need=need)


def min_inputs(name: str, f: int, beta: float | None = None) -> int:
    """Inputs the rule needs so that f arbitrary ones cannot decide the result.

    Breakdown-1/2 rules (median, trimmed mean, geometric median) need an honest
    majority, n >= 2f + 1; so do the clipping rules, whose adaptive radius is then an
    honest input's distance and whose f clipped inputs then weigh less than half. Krum
    needs n >= 2f + 3. The mean outvotes nobody (1). A trimmed mean also needs to keep
    something (2b < n) at its `beta`.
    """
    if name == "mean":
        return 1
    if name in ("krum", "multi_krum"):
        return krum.min_inputs(f)
    need = 2 * f + 1
    if name == "trimmed_mean":
        while 2 * coordinate.trim_count(need, f=f, beta=beta) >= need:
            need += 1
    return need


def _kernel(name: str, f: int, opts: _Options) -> Kernel:
    if name == "mean":
        return lambda x, w, own, diag: mean(x, w, own)
    if name == "median":
        return lambda x, w, own, diag: coordinate.median(x, w, own)
    if name == "trimmed_mean":
        return _trimmed_mean_kernel(f, opts.optional_number("beta", low=0.0, below=0.5))
    if name == "krum":
        return _krum_kernel(f, multi=False)
    if name == "multi_krum":
        return _krum_kernel(f, multi=True, m=opts.optional_integer("m", minimum=1))
    if name == "geometric_median":
        iterations = opts.integer("iterations", geomed.DEFAULT_ITERATIONS, minimum=1)
        eps = opts.number("eps", geomed.DEFAULT_EPS, low=0.0, strict_low=True)
        return lambda x, w, own, diag: geomed.geometric_median(
            x, own, iterations=iterations, eps=eps
        )
    if name == "centered_clipping":
        tau = opts.optional_number("tau", low=0.0, strict_low=True)
        iterations = opts.integer("iterations", clipping.DEFAULT_ITERATIONS, minimum=1)
        reject = opts.optional_number("reject", low=1.0, strict_low=True)
        spread = _spread(opts, tau)

        def centered(
            x: np.ndarray, w: np.ndarray, own: np.ndarray, diag: Diagnostics
        ) -> np.ndarray | None:
            diag.flagged, diag.evidence = np.zeros(x.shape[0], dtype=bool), CLIPPED
            return clipping.centered_clipping(
                x,
                own,
                f=f,
                tau=tau,
                iterations=iterations,
                reject=reject,
                spread=spread,
                clipped_out=diag.flagged,
            )

        return centered
    if name == "self_centered_clipping":
        tau = opts.optional_number("tau", low=0.0, strict_low=True)
        reject = opts.optional_number("reject", low=1.0, strict_low=True)
        spread = _spread(opts, tau)

        def self_centered(
            x: np.ndarray, w: np.ndarray, own: np.ndarray, diag: Diagnostics
        ) -> np.ndarray:
            diag.flagged, diag.evidence = np.zeros(x.shape[0], dtype=bool), CLIPPED
            return clipping.self_centered_clipping(
                x, own, f=f, tau=tau, reject=reject, spread=spread, clipped_out=diag.flagged
            )

        return self_centered
    if name == "clipped_gossip":
        tau = opts.optional_number("tau", low=0.0, strict_low=True)
        reject = opts.optional_number("reject", low=1.0, strict_low=True)

        def gossip(x: np.ndarray, w: np.ndarray, own: np.ndarray, diag: Diagnostics) -> np.ndarray:
            diag.flagged, diag.evidence = np.zeros(x.shape[0], dtype=bool), CLIPPED
            return clipping.clipped_gossip(
                x, own, f=f, tau=tau, reject=reject, clipped_out=diag.flagged
            )

        return gossip
    raise AssertionError(name)  # RULE_NAMES and this function list the same rules


def _spread(opts: _Options, tau: float | None) -> float | None:
    """The clipping rules' `spread` (a floor under the adaptive radius, in median
    distances; clipping.py): > 1 (a floor at or below the median never binds), and not
    together with a fixed `tau` (which has no adaptive radius to raise)."""
    spread = opts.optional_number("spread", low=1.0, strict_low=True)
    if spread is not None and tau is not None:
        raise ValueError(
            "aggregation options 'spread' and 'tau' are alternatives (spread raises the "
            "adaptive radius; tau fixes it); choose one"
        )
    return spread


def _krum_kernel(f: int, *, multi: bool, m: int | None = None) -> Kernel:
    """Krum, or Multi-Krum of m inputs (default n - f); flags the f worst scores."""

    def kernel(
        x: np.ndarray, w: np.ndarray, own: np.ndarray, diag: Diagnostics
    ) -> np.ndarray | None:
        n = x.shape[0]
        if n < krum.min_inputs(f):
            return None
        diag.flagged, diag.evidence = np.zeros(n, dtype=bool), EXCLUDED
        if not multi:
            return krum.krum(x, own, f, excluded_out=diag.flagged)
        return krum.multi_krum(x, own, f, n - f if m is None else m, excluded_out=diag.flagged)

    return kernel


def _trimmed_mean_kernel(f: int, beta: float | None) -> Kernel:
    if beta == 0 and f > 0:
        raise ValueError(
            f"aggregation option 'beta': 0 trims nothing, but tolerate={f} declares attackers"
        )
    rng = np.random.default_rng(_DIAGNOSTICS_SEED)

    def kernel(
        x: np.ndarray, w: np.ndarray, own: np.ndarray, diag: Diagnostics
    ) -> np.ndarray | None:
        n = x.shape[0]
        b = coordinate.trim_count(n, f=f, beta=beta)
        if 2 * b >= n:
            return None
        out = coordinate.trimmed_mean(x, b)
        if b > 0:
            shares = coordinate.trimmed_shares(x, b, rng)
            diag.flagged = shares > coordinate.trimmed_flag_threshold(n, b)
            diag.evidence = TRIMMED
        return out

    return kernel


def _mixed(inner: Kernel, f: int) -> Kernel:
    """Nearest-neighbour mixing (`nnm.mix`) before the rule; row i of the mixed stack is
    input i's mixture, so the rule's per-input flags keep their meaning of "input i"."""

    def kernel(
        x: np.ndarray, w: np.ndarray, own: np.ndarray, diag: Diagnostics
    ) -> np.ndarray | None:
        return inner(nnm.mix(x, own, f), w, own, diag)

    return kernel


def _bucketed(inner: Rule, s: int, rng: np.random.Generator) -> Kernel:
    """Bucket means of s inputs, then `inner` on them; with fewer buckets than
    `inner.need`, smaller buckets for this call (`bucketing.safe_bucket_size`). An input
    is flagged when the bucket it was averaged into is."""

    def kernel(x: np.ndarray, w: np.ndarray, own: np.ndarray, diag: Diagnostics) -> np.ndarray:
        n = x.shape[0]
        size = bucketing.safe_bucket_size(n, s, inner.need)
        if size < s:
            now = "no bucketing" if size == 1 else f"buckets of {size}"
            diag.events.append(
                RuleEvent(
                    "guard",
                    BUCKET_SIZE_REDUCED,
                    f"{n} inputs in buckets of {s} make {-(-n // s)} buckets, but "
                    f"{inner.name} with f={inner.f} needs {inner.need} to outvote f spoiled "
                    f"buckets: {now} this round",
                )
            )
        if size == 1:
            out, report = inner.aggregate(x, w, own)
            flagged = report.flagged
        else:
            perm = rng.permutation(n)
            means, bucket_weights = bucketing.bucket_means_of(x, w, size, perm)
            out, report = inner.aggregate(means, bucket_weights, own)
            flagged = (
                None if report.flagged is None else report.flagged[bucketing.bucket_of(perm, size)]
            )
        diag.events.extend(report.events)
        diag.flagged, diag.evidence = flagged, report.evidence
        return out

    return kernel


class _Options:
    """Typed reads of one rule's options; errors name the option; `finish` rejects leftovers."""

    def __init__(self, rule: str, values: Mapping[str, Any]) -> None:
        if not isinstance(values, Mapping):
            raise ValueError(f"aggregation options must be a mapping, got {values!r}")
        self.rule = rule
        self.values = dict(values)
        self._allowed = (*_RULE_OPTIONS[rule], *_COMMON_OPTIONS)

    def _raw(self, key: str) -> Any:
        return self.values.get(key)

    def _bad(self, key: str, why: str) -> ValueError:
        return ValueError(f"aggregation option {key!r} of {self.rule}: {why}")

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self.optional_integer(key, minimum=minimum)
        return default if value is None else value

    def optional_integer(self, key: str, *, minimum: int) -> int | None:
        value = self._raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self._bad(key, f"must be >= {minimum}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float, *, low: float, strict_low: bool = False) -> float:
        value = self.optional_number(key, low=low, strict_low=strict_low)
        return default if value is None else value

    def optional_number(
        self, key: str, *, low: float, strict_low: bool = False, below: float | None = None
    ) -> float | None:
        value = self._raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, f"expected a number, got {value!r}")
        v = float(value)
        if not math.isfinite(v) or v < low or (strict_low and v == low):
            raise self._bad(key, f"must be {'>' if strict_low else '>='} {low}, got {value}")
        if below is not None and v >= below:
            raise self._bad(key, f"must be < {below}, got {value}")
        return v

    def finish(self) -> None:
        for key in self.values:
            if key not in self._allowed:
                allowed = ", ".join(self._allowed)
                raise self._bad(key, f"unknown option; {self.rule} accepts: {allowed}")


def get_rule(name: str) -> Rule:
    """`make_rule(name)` with no tolerated attackers and default options."""
    return make_rule(name)


# One default instance per rule (f = 0), for callers that just want "the median".
RULES: dict[str, Rule] = {name: make_rule(name) for name in RULE_NAMES}
