"""Byzantine behaviours for scenario studies: what a malicious node sends instead.

A malicious node is an ordinary node (same transport, rounds and aggregation); only
two hooks differ: its training labels are poisoned once at start (`poison_labels`),
and each round it broadcasts `craft(...)` instead of its trained model. Attacks work
on deltas (model minus the round's start model), like the literature's gradient
attacks, and return a full model. "Omniscient" attacks (IPM, ALIE) only use what the
attacker legitimately overheard as a neighbour: the models its honest neighbours sent
it last round, as deltas from that round's start (`overheard`, shape (k, d)); in round
0 nothing was overheard and they use the attacker's own honest delta as the estimate.

Defaults, from the papers that introduced or benchmarked each attack:

- `sign_flip` (scale=4): start - scale * delta, the sign-flipping attack with
  coefficient -4 of Li et al. 2019 (RSA). With 20% attackers a scale of 4 cancels the
  honest progress under a plain mean; larger scales reverse it.
- `gaussian` (sigma=1.0): start + N(0, sigma^2), in model units (Xie et al. 2018 use
  variance 200 on gradients; 1.0 is of the order of a digits model's weights, i.e.
  destructive, which is the point).
- `label_flip`: trains honestly on labels y -> C - 1 - y (Biggio et al. 2012 style).
- `ipm` (epsilon=0.1): start - epsilon * mean(overheard), inner-product manipulation
  (Xie et al. 2020); 0.1 is the value that defeats Krum and the median there and in
  Karimireddy et al. 2022.
- `alie` (z from n and f): start + mean - z * std, coordinate-wise over the overheard
  deltas, "a little is enough" (Baruch et al. 2019): z = Phi^-1((n - s) / n) with
  s = floor(n/2 + 1) - f, the largest shift that still hides in the honest spread.
  Option `z` overrides; with n unknown (0) z = 1.0.
- `zero`: sends the start model unchanged (a free-rider / zero update).
- `random` (scale=1.0): start + uniform noise in [-scale, scale].
- `silent`: sends nothing (a crash-like node that still receives).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ATTACK_NAMES: tuple[str, ...] = (
    "sign_flip",
    "gaussian",
    "label_flip",
    "ipm",
    "alie",
    "zero",
    "random",
    "silent",
)

# kind -> {option: default}
_OPTIONS: dict[str, dict[str, float]] = {
    "sign_flip": {"scale": 4.0},
    "gaussian": {"sigma": 1.0},
    "label_flip": {},
    "ipm": {"epsilon": 0.1},
    "alie": {"z": math.nan},  # nan = derive from n and f
    "zero": {},
    "random": {"scale": 1.0},
    "silent": {},
}


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019: z_max = Phi^-1((n - s) / n), s = floor(n/2 + 1) - f.

    1.0 when n is unknown; never negative (a non-positive z would not hide anything).
    """
    if n <= 0:
        return 1.0
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if p <= 0.5:
        return 0.0
    if p >= 1.0:
        return 3.0  # Phi^-1 diverges; 3 std is already far outside the honest spread
    return statistics.NormalDist().inv_cdf(p)


@dataclass(frozen=True)
class Attack:
    """One malicious behaviour; `options` holds every parameter, defaults filled in."""

    kind: str
    options: Mapping[str, float] = field(default_factory=dict)

    @property
    def silent(self) -> bool:
        return self.kind == "silent"

    def poison_labels(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        """label_flip: y -> C - 1 - y; every other attack trains on the true labels."""
        if self.kind != "label_flip":
            return y
        return (n_classes - 1 - np.asarray(y)).astype(np.asarray(y).dtype)

    def craft(
        self,
        *,
        start: np.ndarray,
        trained: np.ndarray,
        overheard: np.ndarray | None,
        rng: np.random.Generator,
    ) -> np.ndarray | None:
        """The model to broadcast this round (None: send nothing)."""
        kind = self.kind
        if kind == "silent":
            return None
        base = np.asarray(start, dtype=np.float64)
        delta = np.asarray(trained, dtype=np.float64) - base
        if kind == "label_flip":
            out = np.asarray(trained, dtype=np.float64)  # poisoned by its labels already
        elif kind == "sign_flip":
            out = base - self.options["scale"] * delta
        elif kind == "gaussian":
            out = base + rng.normal(0.0, self.options["sigma"], size=base.shape)
        elif kind == "zero":
            out = base
        elif kind == "random":
            s = self.options["scale"]
            out = base + rng.uniform(-s, s, size=base.shape)
        else:
            honest = _estimate(overheard, delta)
            if kind == "ipm":
                out = base - self.options["epsilon"] * honest.mean(axis=0)
            else:  # alie
                mu, sd = honest.mean(axis=0), honest.std(axis=0)
                out = base + mu - self.options["z"] * sd
        return np.ascontiguousarray(out, dtype=np.float32)


def _estimate(overheard: np.ndarray | None, own_delta: np.ndarray) -> np.ndarray:
    """The honest deltas to imitate, (k, d) float64; own delta when nothing was heard."""
    if overheard is None or np.size(overheard) == 0:
        return own_delta[None, :]
    heard = np.asarray(overheard, dtype=np.float64)
    if heard.ndim == 1:
        heard = heard[None, :]
    if heard.shape[1] != own_delta.shape[0]:
        raise ValueError(f"overheard deltas have shape {heard.shape}, model has {own_delta.shape}")
    return heard


def make_attack(
    kind: str, *, options: Mapping[str, Any] | None = None, n: int = 0, f: int = 0
) -> Attack:
    """Validate `kind` and its options (ValueError naming the culprit); n and f (nodes,
    attackers) size ALIE's z when the options do not fix it."""
    if kind not in _OPTIONS:
        raise ValueError(f"unknown attack {kind!r}; available: {', '.join(ATTACK_NAMES)}")
    given = dict(options or {})
    values = dict(_OPTIONS[kind])
    for key, value in given.items():
        if key not in values:
            accepted = ", ".join(values) or "no options"
            raise ValueError(f"attack option {key!r} is not used by {kind} (accepts: {accepted})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"attack option {key!r} of {kind}: expected a number, got {value!r}")
        v = float(value)
        if not math.isfinite(v) or v < 0 or (v == 0 and key != "z"):
            raise ValueError(f"attack option {key!r} of {kind}: must be > 0, got {value!r}")
        values[key] = v
    if kind == "alie" and math.isnan(values["z"]):
        values["z"] = alie_z(n, f)
    return Attack(kind, values)
