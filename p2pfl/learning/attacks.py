"""Byzantine behaviours for scenario studies: what a malicious node sends instead.

A malicious node is an ordinary node (same transport, rounds and aggregation); only
two hooks differ, and only from its `start_round` on (before it, it is honest): its
training labels are poisoned (`poison_labels`), and each round it broadcasts
`craft(...)` instead of its trained model. Attacks work on deltas (model minus the
round's start model), like the literature's gradient attacks, and return a full model.
"Omniscient" attacks (IPM, ALIE, mimic, tailored) only use what the attacker
legitimately overheard as a neighbour: the models its honest neighbours sent it last
round, as deltas from that round's start (`overheard`, shape (k, d), rows named by
`senders`; its accomplices' models are left out by the node); in round 0 nothing was
overheard and they use the attacker's own honest delta as the estimate.

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
- `mimic` (warmup=1): copies one honest neighbour's update, the one that keeps the
  aggregate most heterogeneous over time (Karimireddy, He and Jaggi, ICLR 2022,
  "Byzantine-robust learning on heterogeneous datasets via bucketing", the mimic
  attack; the choice follows the authors' `MimicVariantAttacker` in
  epfml/byzantine-robust-noniid-optimizer, codes/attacks/mimic.py). During the first
  `warmup` attacking rounds it tracks the honest mean mu and the top principal
  direction z of the honest deltas (one power-iteration step per round, averaged over
  rounds, from a fixed-seed random start) and targets argmax_i <g_i, z>; afterwards
  the target is fixed (re-chosen only when it was not heard in a round). Here the copy
  is one round stale: a node sends while its neighbours send, so the newest update it
  can copy is last round's.
- `tailored` (direction="std", gamma=10, copies from the attackers' count): the
  AGR-tailored attack of Shejwalkar and Houmansadr (NDSS 2021, "Manipulating the
  Byzantine"): start + mean - gamma * p with p the coordinate-wise std of the
  overheard deltas (ALIE's direction), their sign ("sign", sign of the mean) or the unit
  mean ("unit", IPM's direction); gamma is searched each round so as to maximise
  ||rule(honest + copies x malicious) - mean||, with the rule this node aggregates with
  (the federation's rule in a scenario). Against a trimmed mean or the median this lands
  at the edge of the trimmed band; against Krum at the largest shift Krum still selects;
  against the mean it is simply large. The objective is theirs; the search is not:
  their halving search from `gamma` (`our_attack_trmean`) stalls on the plateaus these
  rules produce (beyond Krum's selection breakpoint every gamma gives the same honest
  pick), so here a geometric grid gamma / 2^k is scanned and the best point refined by
  bisection, preferring the smallest gamma among equals (see `_best_gamma`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
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
    "mimic",
    "tailored",
)

# kind -> {option: default}; a str default is a choice among _CHOICES.
_OPTIONS: dict[str, dict[str, float | str]] = {
    "sign_flip": {"scale": 4.0},
    "gaussian": {"sigma": 1.0},
    "label_flip": {},
    "ipm": {"epsilon": 0.1},
    "alie": {"z": math.nan},  # nan = derive from n and f
    "zero": {},
    "random": {"scale": 1.0},
    "silent": {},
    "mimic": {"warmup": 1.0},
    "tailored": {"direction": "std", "gamma": 10.0, "copies": math.nan},  # nan: from f
}
_CHOICES: dict[str, tuple[str, ...]] = {"direction": ("std", "sign", "unit")}
_INTEGER_OPTIONS = ("warmup", "copies")
# The tailored attack's search: a grid gamma0 / 2^k (k < TAILORED_GRID), then
# TAILORED_STEPS bisection steps each way: 12 + 2 * 8 evaluations of the rule a round.
TAILORED_GRID = 12
TAILORED_STEPS = 8

# (stacked models (n, d), weights (n,), own model (d,)) -> aggregate (d,): a Rule.
RuleFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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


@dataclass
class MimicState:
    """What the mimic attack carries from round to round (one attacker's view)."""

    t: int = 0  # attacking rounds with something overheard
    mu: np.ndarray | None = None  # running mean of the honest deltas
    z: np.ndarray | None = None  # running top principal direction (unit norm)
    target: str | None = None  # the neighbour copied
    copy: np.ndarray | None = None  # its last delta


@dataclass(frozen=True)
class Attack:
    """One malicious behaviour; `options` holds every parameter, defaults filled in.

    Honest before `start_round`, malicious from it on (labels and sent model alike).
    `rule` is the aggregation the tailored attack optimises against; `state` is the
    mimic attack's memory (the only attack that remembers across rounds).
    """

    kind: str
    options: Mapping[str, float | str] = field(default_factory=dict)
    start_round: int = 0
    rule: RuleFn | None = field(default=None, compare=False, repr=False)
    state: MimicState = field(default_factory=MimicState, compare=False, repr=False)

    @property
    def silent(self) -> bool:
        return self.kind == "silent"

    def active(self, round: int) -> bool:
        """Malicious in `round` (honest before `start_round`)."""
        return round >= self.start_round

    def number(self, key: str) -> float:
        return float(self.options[key])

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
        senders: Sequence[str] = (),
    ) -> np.ndarray | None:
        """The model to broadcast this round (None: send nothing). `senders` names the
        rows of `overheard` (only mimic needs them: it follows one neighbour)."""
        kind = self.kind
        if kind == "silent":
            return None
        base = np.asarray(start, dtype=np.float64)
        delta = np.asarray(trained, dtype=np.float64) - base
        if kind == "label_flip":
            out = np.asarray(trained, dtype=np.float64)  # poisoned by its labels already
        elif kind == "sign_flip":
            out = base - self.number("scale") * delta
        elif kind == "gaussian":
            out = base + rng.normal(0.0, self.number("sigma"), size=base.shape)
        elif kind == "zero":
            out = base
        elif kind == "random":
            s = self.number("scale")
            out = base + rng.uniform(-s, s, size=base.shape)
        elif kind == "mimic":
            out = base + self._mimic(overheard, senders, delta)
        else:
            honest = _estimate(overheard, delta)
            if kind == "ipm":
                out = base - self.number("epsilon") * honest.mean(axis=0)
            elif kind == "alie":
                mu, sd = honest.mean(axis=0), honest.std(axis=0)
                out = base + mu - self.number("z") * sd
            else:  # tailored
                out = base + self._tailored(base, honest)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _mimic(
        self, overheard: np.ndarray | None, senders: Sequence[str], own: np.ndarray
    ) -> np.ndarray:
        """The delta of the neighbour to copy (see the module docstring)."""
        st = self.state
        if overheard is None or np.size(overheard) == 0 or len(senders) != len(overheard):
            return st.copy if st.copy is not None else own  # nobody to copy yet
        g = _estimate(overheard, own)
        avg = g.mean(axis=0)
        warmup = int(self.number("warmup"))
        if st.t == 0 or st.mu is None or st.z is None:
            st.mu = avg
            seed = np.random.default_rng(0).standard_normal(avg.shape[0])
            st.z = _unit(_power_step(g, avg, seed), fallback=seed)
        elif st.t < warmup:
            t = st.t
            st.mu = t / (1 + t) * st.mu + avg / (1 + t)
            step = _unit(_power_step(g, st.mu, st.z), fallback=st.z)
            st.z = _unit(t / (1 + t) * st.z + step / (1 + t), fallback=st.z)
        target = st.target
        if st.t < warmup or target is None or target not in senders:
            target = senders[int(np.argmax(g @ st.z))]
        st.target, st.t = target, st.t + 1
        st.copy = g[list(senders).index(target)].copy()
        return st.copy

    def _tailored(self, base: np.ndarray, honest: np.ndarray) -> np.ndarray:
        """mean - gamma * p with gamma tuned against the rule (see the module docstring)."""
        mu = honest.mean(axis=0)
        direction = self.options["direction"]
        if direction == "std":
            p = honest.std(axis=0)
        elif direction == "sign":
            p = np.sign(mu)
        else:
            p = _unit(mu, fallback=np.zeros_like(mu))
        copies = max(1, int(self.number("copies")))
        rule = self.rule if self.rule is not None else _plain_mean()
        models = (base + honest).astype(np.float32)
        centre = base + mu
        own = centre.astype(np.float32)
        weights = np.ones(len(models) + copies)

        def deviation(gamma: float) -> float:
            bad = (centre - gamma * p).astype(np.float32)
            x = np.concatenate([models, np.broadcast_to(bad, (copies, bad.shape[0]))])
            return float(np.linalg.norm(rule(x, weights, own) - centre))

        return np.asarray(mu - _best_gamma(deviation, self.number("gamma")) * p)


def _best_gamma(deviation: Callable[[float], float], gamma0: float) -> float:
    """The gamma in (0, 2 * gamma0] that moves the aggregate furthest, the smallest of
    equals: a geometric grid gamma0 / 2^k, then bisection down to the edge of a plateau
    (a trimmed mean or median that trims us: as far as the rule feels us, no further)
    and up while the deviation still grows (Krum until it stops selecting us; the mean
    up to 2 * gamma0)."""
    grid = [gamma0 / 2.0**k for k in range(TAILORED_GRID)]
    devs = [deviation(g) for g in grid]
    top = max(devs)
    if top <= 0.0:
        return 0.0
    i = max(k for k, d in enumerate(devs) if d >= top * (1 - 1e-9))  # smallest gamma
    best, value = grid[i], devs[i]
    lo = grid[i + 1] if i + 1 < len(grid) else 0.0
    for _ in range(TAILORED_STEPS):  # down: the plateau's edge
        mid = (lo + best) / 2
        d = deviation(mid)
        if d >= top * (1 - 1e-9):
            best, value = mid, d
        else:
            lo = mid
    hi = 2 * best
    for _ in range(TAILORED_STEPS):  # up: while it still grows
        mid = (best + hi) / 2
        d = deviation(mid)
        if d > value:
            best, value = mid, d
        else:
            hi = mid
    return best


def _plain_mean() -> RuleFn:
    from p2pfl.aggregation import mean

    rule: RuleFn = mean
    return rule


def _power_step(g: np.ndarray, mu: np.ndarray, z: np.ndarray) -> np.ndarray:
    """sum_i <g_i - mu, z> (g_i - mu): one power-iteration step on the honest spread."""
    centred = g - mu
    return np.asarray((centred @ z) @ centred)


def _unit(v: np.ndarray, *, fallback: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm == 0.0:
        return fallback
    return np.asarray(v / norm)


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
    kind: str,
    *,
    options: Mapping[str, Any] | None = None,
    n: int = 0,
    f: int = 0,
    start_round: int = 0,
    rule: RuleFn | None = None,
) -> Attack:
    """Validate `kind` and its options (ValueError naming the culprit); n and f (nodes,
    attackers) size ALIE's z and the tailored attack's copies when the options do not
    fix them; `rule` is what the tailored attack optimises against (default: the mean)."""
    if kind not in _OPTIONS:
        raise ValueError(f"unknown attack {kind!r}; available: {', '.join(ATTACK_NAMES)}")
    if isinstance(start_round, bool) or not isinstance(start_round, int) or start_round < 0:
        raise ValueError(f"attack start_round must be an integer >= 0, got {start_round!r}")
    given = dict(options or {})
    values = dict(_OPTIONS[kind])
    for key, value in given.items():
        if key not in values:
            accepted = ", ".join(values) or "no options"
            raise ValueError(f"attack option {key!r} is not used by {kind} (accepts: {accepted})")
        values[key] = _option(kind, key, value)
    if kind == "alie" and math.isnan(float(values["z"])):
        values["z"] = alie_z(n, f)
    if kind == "tailored" and math.isnan(float(values["copies"])):
        values["copies"] = float(max(1, f))
    return Attack(kind, values, start_round, rule)


def _option(kind: str, key: str, value: Any) -> float | str:
    """One checked option value."""
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            choices = ", ".join(_CHOICES[key])
            raise ValueError(f"attack option {key!r} of {kind}: one of {choices}, got {value!r}")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"attack option {key!r} of {kind}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and key != "z"):
        raise ValueError(f"attack option {key!r} of {kind}: must be > 0, got {value!r}")
    if key in _INTEGER_OPTIONS and v != int(v):
        raise ValueError(f"attack option {key!r} of {kind}: expected an integer, got {value!r}")
    return v


def match_peers(
    names: Collection[str], peers: Iterable[str], addresses: Mapping[str, Collection[str]]
) -> frozenset[str]:
    """The `peers` that `names` designate, by peer id or by a listen address known for
    them (`addresses`: peer id -> addresses). A scenario names the attacker's
    `honest_to` neighbours and accomplices by listen address: it knows those before any
    node has an identity, and the same addresses serve real processes and in-memory
    nodes."""
    if not names:
        return frozenset()
    wanted = set(names)
    return frozenset(
        p for p in peers if p in wanted or any(a in wanted for a in addresses.get(p, ()))
    )
