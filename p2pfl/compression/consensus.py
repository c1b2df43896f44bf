"""Consensus step for compressed gossip (CHOCO-SGD, Koloskova et al. 2019), sans-IO.

With compression a node's neighbours do not hold its model x_i but its public copy
x_hat_i (what they rebuilt from its compressed messages). Plain aggregation mixes the
node's *exact* model with the neighbours' *public copies*: on a sparse graph with
non-IID shards, what top-k has not delivered yet (x_i - x_hat_i, large while models
differ a lot) then enters every node's average asymmetrically, and the models drift
apart instead of agreeing. CHOCO-Gossip instead moves each node by the disagreement
between public copies only, which every party computes from the same numbers:

    x_i <- x_i + gamma * sum_j w_ij (x_hat_j - x_hat_i)

with x_i the node's model after local training and x_hat_* the copies *after* this
round's messages (the sender's own x_hat_i is the encoder's, bit-identical to what its
neighbours decoded). What compression withheld from x_i is kept by the node (it is
sent later by error feedback) instead of being averaged away. gamma < 1 damps the
step, which CHOCO needs when the copies lag far behind the models.

With weights w_ij summing to one over the node and its neighbours, the sum equals
mean(x_hat) - x_hat_i. For any other rule the same step is
`rule(public copies) - x_hat_i`: the rule (median, trimmed mean, Krum, ...) sees only
public copies, all in the same coordinates, so an outlier copy is discarded exactly
as the rule would discard an outlier model, and the node's own exact model never
enters the rule (it cannot outvote the rule by being off its own copy). With
identity compression (x_hat = x) and gamma = 1 this is the plain aggregate.

`keep` generalises the step to x_hat_i + keep * (x_i - x_hat_i) + gamma * (rule - x_hat_i):
keep = 1 is CHOCO (the unsent part x_i - x_hat_i stays whole); with the mean, keep =
w_ii and gamma = 1 is exactly today's plain aggregate rule(x_i, x_hat_j), which keeps
only the self weight's share of it. The ring measurement in docs/compression.md is
why this knob exists: there CHOCO (keep 1) loses to plain at every gamma, keep 0.6
with gamma 1 beats plain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig

F32 = npt.NDArray[np.float32]
RuleFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def consensus_step(
    rule: RuleFn,
    public: np.ndarray,
    weights: np.ndarray,
    own_index: int,
    own_exact: np.ndarray,
    gamma: float,
    keep: float = 1.0,
) -> F32:
    """x_hat_i + keep * (x_i - x_hat_i) + gamma * (rule(public, weights) - x_hat_i).

    `public` is (n, d): every input's public copy, the node's own x_hat_i at row
    `own_index` (the rule's reference point is that copy, not the exact model).
    keep = 1 (the default) is CHOCO's x_i + gamma * (rule - x_hat_i).
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"consensus step must be in (0, 1], got {gamma}")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    if public.ndim != 2 or not 0 <= own_index < public.shape[0]:
        raise ValueError("public must be (n, d) with own_index one of its rows")
    if own_exact.shape != public.shape[1:]:
        raise ValueError(f"own model has shape {own_exact.shape}, copies {public.shape[1:]}")
    own_public = public[own_index]
    target = np.asarray(rule(public, weights, own_public), dtype=np.float64)
    step: npt.NDArray[np.float64] = target - own_public
    step *= gamma
    step += own_public
    step += keep * (own_exact.astype(np.float64) - own_public)
    out: F32 = step.astype(np.float32)
    return out


class ConsensusRule:
    """A node's aggregation rule with the consensus step (`[compression] consensus`).

    The round machine hands the rule its inputs as usual: the node's exact model and
    the neighbours' models, which with compression are their public copies x_hat_j
    (the decoder's, one per neighbour). `own_public()` gives the node's own public copy
    x_hat_i for the round being aggregated (the encoder's, after this round's message),
    or None when there is none to use (nothing sent yet, an encoding failure, per-peer
    streams); then the plain rule runs. Otherwise the own row is replaced by x_hat_i
    and the result is `consensus_step(rule, copies, weights, own row, own, gamma, keep)`.
    Counters, reports and the name read through to the wrapped rule.
    """

    def __init__(
        self,
        rule: RuleFn,
        own_public: Callable[[], np.ndarray | None],
        gamma: float,
        keep: float = 1.0,
    ) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"consensus step must be in (0, 1], got {gamma}")
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {keep}")
        self.rule = rule
        self.own_public = own_public
        self.gamma = gamma
        self.keep = keep
        self.plain_rounds = 0  # rounds aggregated without a public copy of our own

    def __call__(self, x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
        public = self.own_public()
        if public is None or public.shape != own.shape:
            self.plain_rounds += 1
            return self.rule(x, weights, own)
        # Our exact model's row (inputs come sorted by node id, ours among them). With a
        # lossy pipeline no copy equals it bit for bit; if one did, the rows are equal.
        rows = np.flatnonzero((x == own).all(axis=1))
        if rows.size == 0:
            self.plain_rounds += 1
            return self.rule(x, weights, own)
        row = int(rows[0])
        copies = np.array(x, dtype=np.float32, copy=True)
        copies[row] = public
        return consensus_step(self.rule, copies, weights, row, own, self.gamma, self.keep)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rule, name)


def with_consensus(
    rule: RuleFn, config: NodeConfig, own_public: Callable[[], np.ndarray | None]
) -> RuleFn:
    """`rule` with the node's consensus step (`compression_consensus`), or `rule`
    itself when that is off (0, the default): then rounds are exactly as before."""
    gamma = config.compression_consensus
    if gamma == 0 or not config.compression:
        return rule
    return ConsensusRule(rule, own_public, gamma, config.compression_consensus_keep)
