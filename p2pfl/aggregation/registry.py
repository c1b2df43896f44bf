"""Rule names and options -> a ready aggregation callable (`make_rule`).

The callable (`Rule`) owns what the pure kernels should not: option validation, the
rule's seeded generator (bucketing), and the explicit fallback when a rule gets fewer
inputs than its guarantee needs (Krum with n <= 2f + 2, a trimmed mean that would
trim everything). A fallback is logged on `p2pfl.aggregation` (a warning the first
time per input count, then debug) and counted on the rule, never raised: a node on a
sparse graph must keep training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pfl.aggregation import bucketing, clipping, coordinate, geomed, krum
from p2pfl.aggregation.rules import bounded_weights, mean

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
)

# Options every rule accepts (bucketing wraps any rule).
_COMMON_OPTIONS = ("bucket_size", "bucket_seed")
_RULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "mean": (),
    "median": (),
    "trimmed_mean": ("beta",),
    "krum": (),
    "multi_krum": ("m",),
    "geometric_median": ("iterations", "eps"),
    "centered_clipping": ("tau", "iterations"),
    "self_centered_clipping": ("tau",),
}

# (stacked inputs, weights, own) -> aggregate, or None when there are too few inputs.
Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray | None]


@dataclass
class Rule:
    """An aggregation rule instance: call it like any `AggregationRule`.

    `fallbacks` counts calls answered by the fallback, `last_fallback` says why the
    latest one happened (None if the latest call used the rule itself); the node can
    show both in its status.
    """

    name: str
    f: int
    options: Mapping[str, Any]
    kernel: Kernel
    fallbacks: int = 0
    last_fallback: str | None = None
    _warned: set[int] = field(default_factory=set, repr=False)

    def __call__(self, x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
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
            return own.copy()
        if n == 1:
            self.last_fallback = None
            return np.array(x[0])
        out = self.kernel(x, weights, own)
        if out is None:
            reason = f"{self.name} with f={self.f} needs more than {n} inputs"
            self._note_fallback(n, reason)
            out = coordinate.median(x, weights, own)
        else:
            self.last_fallback = None
        return out

    def _note_fallback(self, n: int, reason: str) -> None:
        self.fallbacks += 1
        self.last_fallback = f"{reason}; used median"
        level = logging.DEBUG if n in self._warned else logging.WARNING
        self._warned.add(n)
        log.log(level, "%s; falling back to the coordinate-wise median", reason)


def make_rule(name: str, *, f: int = 0, options: Mapping[str, Any] | None = None) -> Rule:
    """Build the rule `name` tolerating `f` Byzantine inputs.

    Raises ValueError naming the unknown rule, the unknown option or the bad value.
    """
    if name not in RULE_NAMES:
        raise ValueError(f"unknown aggregation rule {name!r}; available: {', '.join(RULE_NAMES)}")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"tolerate (f) must be an integer >= 0, got {f!r}")
    opts = _Options(name, options or {})
    kernel = _kernel(name, f, opts)
    s = opts.optional_integer("bucket_size", minimum=2)
    seed = opts.integer("bucket_seed", 0, minimum=0)
    opts.finish()
    full_name = name
    if s is not None:
        inner = Rule(name, f, dict(opts.values), kernel)
        kernel = _bucketed(inner, s, np.random.default_rng(seed))
        full_name = f"{name}+bucketing({s})"
    return Rule(full_name, f, dict(opts.values), kernel)


def _kernel(name: str, f: int, opts: _Options) -> Kernel:
    if name == "mean":
        return mean
    if name == "median":
        return coordinate.median
    if name == "trimmed_mean":
        return _trimmed_mean_kernel(f, opts.optional_number("beta", low=0.0, below=0.5))
    if name == "krum":
        return lambda x, w, own: krum.krum(x, own, f) if x.shape[0] >= krum.min_inputs(f) else None
    if name == "multi_krum":
        m = opts.optional_integer("m", minimum=1)
        return lambda x, w, own: (
            krum.multi_krum(x, own, f, x.shape[0] - f if m is None else m)
            if x.shape[0] >= krum.min_inputs(f)
            else None
        )
    if name == "geometric_median":
        iterations = opts.integer("iterations", geomed.DEFAULT_ITERATIONS, minimum=1)
        eps = opts.number("eps", geomed.DEFAULT_EPS, low=0.0, strict_low=True)
        return lambda x, w, own: geomed.geometric_median(x, own, iterations=iterations, eps=eps)
    if name == "centered_clipping":
        tau = opts.optional_number("tau", low=0.0, strict_low=True)
        iterations = opts.integer("iterations", clipping.DEFAULT_ITERATIONS, minimum=1)
        return lambda x, w, own: clipping.centered_clipping(
            x, own, f=f, tau=tau, iterations=iterations
        )
    if name == "self_centered_clipping":
        tau = opts.optional_number("tau", low=0.0, strict_low=True)
        return lambda x, w, own: clipping.self_centered_clipping(x, own, f=f, tau=tau)
    raise AssertionError(name)  # RULE_NAMES and this function list the same rules


def _trimmed_mean_kernel(f: int, beta: float | None) -> Kernel:
    if beta == 0 and f > 0:
        raise ValueError(
            f"aggregation option 'beta': 0 trims nothing, but tolerate={f} declares attackers"
        )

    def kernel(x: np.ndarray, w: np.ndarray, own: np.ndarray) -> np.ndarray | None:
        b = coordinate.trim_count(x.shape[0], f=f, beta=beta)
        if 2 * b >= x.shape[0]:
            return None
        return coordinate.trimmed_mean(x, b)

    return kernel


def _bucketed(inner: Rule, s: int, rng: np.random.Generator) -> Kernel:
    def kernel(x: np.ndarray, w: np.ndarray, own: np.ndarray) -> np.ndarray:
        means, bucket_weights = bucketing.bucket_means(x, w, s, rng)
        return inner(means, bucket_weights, own)

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
