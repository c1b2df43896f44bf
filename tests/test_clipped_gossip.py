"""ClippedGossip (`clipped_gossip`): its adaptive radius, and what it does with it."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.aggregation import make_rule
from p2pfl.aggregation.clipping import clipped_gossip_tau, self_centered_clipping
from p2pfl.aggregation.diagnostics import CLIPPED


def honest_cluster(n: int, d: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1.0 + spread * rng.standard_normal((n, d))).astype(np.float32)


def test_radius_is_the_root_of_the_nearest_squared_distances_over_f() -> None:
    sq = np.array([0.0, 4.0, 1.0, 100.0, 9.0, 2500.0])
    # f = 2: the 4 nearest are 0, 1, 4, 9 -> sqrt(14 / 2)
    assert clipped_gossip_tau(sq, 2) == pytest.approx(np.sqrt(14 / 2))
    # f = 1: 0, 1, 4, 9, 100 -> sqrt(114)
    assert clipped_gossip_tau(sq, 1) == pytest.approx(np.sqrt(114))
    assert clipped_gossip_tau(sq, 0) == np.inf
    assert clipped_gossip_tau(sq, 6) == 0.0


def test_radius_follows_the_honest_spread_not_the_outliers() -> None:
    """Scaling the honest cluster scales the radius; moving the attackers does not."""
    n, d, f = 7, 50, 2
    honest = honest_cluster(n - f, d, 0.1)
    own = honest[0]
    taus = []
    for spread, far in ((1.0, 1e3), (1.0, 1e6), (3.0, 1e3)):
        h = own + spread * (honest - own)
        x = np.concatenate([h, np.full((f, d), far, np.float32)])
        taus.append(clipped_gossip_tau(((x - own).astype(np.float64) ** 2).sum(1), f))
    assert taus[0] == pytest.approx(taus[1])
    assert taus[2] == pytest.approx(3 * taus[0], rel=1e-5)


def test_close_honest_inputs_pass_unchanged() -> None:
    """Without outliers the radius exceeds every honest distance: the plain mean."""
    x = honest_cluster(7, 40, 0.05)
    rule = make_rule("clipped_gossip", f=2)
    out = rule(x, np.ones(7), x[0])
    np.testing.assert_allclose(out, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    report = rule.last_report
    assert report is not None and report.evidence == CLIPPED
    assert report.flagged is not None and not report.flagged.any()


def test_an_outlier_is_clipped_to_the_radius() -> None:
    n, d, f = 7, 40, 1
    honest = honest_cluster(n - 1, d, 0.05)
    own = honest[0]
    x = np.concatenate([honest, np.full((1, d), -1e4, np.float32)])
    rule = make_rule("clipped_gossip", f=f)
    out = rule(x, np.ones(n), own)
    sq = ((x - own).astype(np.float64) ** 2).sum(1)
    tau = clipped_gossip_tau(sq, f)
    # Own + the honest mean of differences + the outlier's difference cut to length tau.
    diff = (x - own).astype(np.float64)
    expected = own + (diff[:-1].sum(0) + diff[-1] * tau / np.sqrt(sq[-1])) / n
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # The outlier moved us by at most tau / n, not by 1e4 / n.
    assert np.linalg.norm(out - (own + diff[:-1].sum(0) / n)) <= tau / n + 1e-3
    report = rule.last_report
    assert report is not None and report.flagged is not None
    assert report.flagged.tolist() == [False] * (n - 1) + [True]


def test_a_fixed_tau_overrides_the_adaptive_radius() -> None:
    x = honest_cluster(5, 10, 1.0, seed=3)
    out = make_rule("clipped_gossip", f=1, options={"tau": 0.5})(x, np.ones(5), x[0])
    ref = self_centered_clipping(x, x[0], f=1, tau=0.5)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_differs_from_self_centered_clipping_on_honest_inputs() -> None:
    """The (f+1)-th-farthest radius always clips f inputs, honest or not; ClippedGossip's
    radius does not (the reason it is a separate rule)."""
    x = honest_cluster(7, 30, 0.05, seed=1)
    scc = make_rule("self_centered_clipping", f=2)
    scc(x, np.ones(7), x[0])
    assert scc.last_report is not None and scc.last_report.flagged is not None
    assert scc.last_report.flagged.sum() == 2
