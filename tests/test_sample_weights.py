"""Claimed sample counts cannot buy a peer the aggregate (issue 12, reproduction 6).

An update claiming `samples = 2**53 - 1` was accepted, and under the default mean rule
that one peer took all the weight.
"""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.aggregation import make_rule
from p2pfl.aggregation.rules import MAX_WEIGHT_RATIO, bounded_weights


def _influence(rule_name: str, claim: float, n_honest: int = 5) -> float:
    """The share of the aggregate that follows the one inflated input."""
    d = 64
    honest = np.zeros((n_honest, d), np.float32)
    attacker = np.ones((1, d), np.float32)
    x = np.concatenate([honest, attacker])
    weights = np.array([100.0] * n_honest + [claim])
    out = make_rule(rule_name)(x, weights, honest[0])
    return float(out.mean())


@pytest.mark.parametrize("claim", [2.0**31 - 1, 2.0**53 - 1, 1e300, np.inf])
def test_one_inflated_claim_gets_at_most_the_capped_weight(claim: float) -> None:
    share = _influence("mean", claim)
    cap = MAX_WEIGHT_RATIO * 100
    assert share == pytest.approx(cap / (5 * 100 + cap)) or (
        not np.isfinite(claim) and share == 0.0
    )
    assert share < 0.5


def test_honest_heterogeneity_within_the_ratio_is_kept() -> None:
    # A node with 3x the median data still weighs 3x: FedAvg is unchanged for it.
    w = bounded_weights(np.array([100.0, 100.0, 100.0, 300.0]))
    assert w.tolist() == [100.0, 100.0, 100.0, 300.0]


def test_bad_claims_weigh_nothing() -> None:
    w = bounded_weights(np.array([10.0, -5.0, np.nan, 10.0, 10.0]))
    assert w.tolist() == [10.0, 0.0, 0.0, 10.0, 10.0]
