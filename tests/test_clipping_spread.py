"""The clipping rules' radius floor (`spread`): honest inputs that are merely the f
farthest of a heterogeneous neighbourhood pass unclipped, a far attacker's pull stays
bounded by the honest spread, the median the floor is measured in does not move with
the attackers, and the far-outlier cut is relative to the raised radius."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.aggregation import make_rule
from p2pfl.aggregation.clipping import (
    centered_clipping,
    far_outliers,
    median_distance,
    self_centered_clipping,
    spread_radius,
)

RULES = (centered_clipping, self_centered_clipping)


def heterogeneous(n: int = 25, d: int = 60, seed: int = 0) -> np.ndarray:
    """Row 0 is the node's own model; every row is own plus a random direction of a
    length between 1 and 1.5 (label skew: every input is "far", none is an outlier)."""
    rng = np.random.default_rng(seed)
    own = rng.standard_normal(d)
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = own + u * rng.uniform(1.0, 1.5, size=(n, 1))
    x[0] = own
    return x.astype(np.float32)


@pytest.mark.parametrize("rule", RULES)
def test_clean_heterogeneous_inputs_are_not_clipped(rule) -> None:  # type: ignore[no-untyped-def]
    """No input is beyond 2x the median distance: with spread = 2 the rule is the plain
    mean; the adaptive radius alone clips the f = 5 farthest honest inputs."""
    x = heterogeneous()
    own = x[0]
    mean = x.astype(np.float64).mean(axis=0)
    flagged = np.zeros(len(x), dtype=bool)
    floored = rule(x, own, f=5, spread=2.0, clipped_out=flagged)
    assert not flagged.any()
    np.testing.assert_allclose(floored, mean, atol=1e-5)
    flagged[:] = False
    plain = rule(x, own, f=5, clipped_out=flagged)
    assert flagged.sum() >= 5
    assert np.linalg.norm(plain - mean) > 1e-3


@pytest.mark.parametrize("rule", RULES)
def test_a_far_attacker_has_bounded_pull(rule) -> None:  # type: ignore[no-untyped-def]
    """However far the attacker goes, it moves the result by at most spread x the median
    distance over n per step (one step for self-centred clipping, `iterations` for
    centred clipping), and the result does not depend on how far it went."""
    honest = heterogeneous(n=24)
    own = honest[0]
    direction = np.zeros(honest.shape[1], dtype=np.float32)
    direction[0] = 1.0
    n = len(honest) + 1
    without = honest.astype(np.float64).mean(axis=0)
    results = []
    for far in (1e2, 1e4, 1e6):
        x = np.concatenate([honest, (own + far * direction)[None]]).astype(np.float32)
        dist = np.linalg.norm(x.astype(np.float64) - own, axis=1)
        bound = 2.0 * median_distance(dist) / n * 3  # 3 = the most steps either rule takes
        out = rule(x, own, f=5, spread=2.0)
        assert float((out - without) @ direction) <= bound + 1e-4
        results.append(out)
    np.testing.assert_allclose(results[0], results[2], atol=1e-4)


def test_the_median_does_not_move_with_the_attackers() -> None:
    """f = 3 of 6 neighbours far away (7 inputs, own's 0 counted): the lower median is
    the farthest honest neighbour's distance wherever the attackers are, so the floor
    stays an honest distance."""
    for far in (10.0, 1e3, 1e9):
        dist = np.array([0.0, 1.0, 1.1, 1.2, far, far * 1.05, far * 1.1])
        assert median_distance(dist) == 1.2
        assert spread_radius(dist, 3, 2.0) == pytest.approx(2.4)


def test_the_floor_only_raises_the_radius_and_needs_an_honest_majority() -> None:
    dist = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0])
    assert spread_radius(dist, 1, None) == 1.0  # the adaptive radius, as before
    assert spread_radius(dist, 1, 2.0) == 2.0
    assert spread_radius(dist, 0, 2.0) == 5.0  # f = 0: the adaptive radius (the mean)
    # 2f >= n: the median may be an attacker's distance, so no floor
    assert spread_radius(np.array([0.0, 1.0, 9.0, 9.5]), 2, 2.0) == 1.0


def test_the_cut_is_relative_to_the_raised_radius() -> None:
    """An honest input at 2.5 median distances is among the f farthest: reject = 1.5
    relative to the adaptive radius (about the median here) cuts it, relative to the
    radius raised to 2 median distances (a cut at 3) it does not; an attacker at 10
    median distances is cut either way."""
    dist = np.concatenate([[0.0], np.linspace(0.9, 1.1, 20), [2.5, 10.0]])
    without = far_outliers(dist, 2, 1.5)
    assert without is not None and without[-2] and without[-1]
    with_floor = far_outliers(dist, 2, 1.5, 2.0)
    assert with_floor is not None
    assert not with_floor[-2] and with_floor[-1]
    assert with_floor.sum() == 1


def test_spread_is_an_option_of_the_adaptive_clipping_rules() -> None:
    x = heterogeneous()
    rule = make_rule("centered_clipping", f=5, options={"spread": 2, "reject": 1.5})
    out = rule(x, np.ones(len(x)), x[0])
    np.testing.assert_allclose(out, x.astype(np.float64).mean(axis=0), atol=1e-5)
    make_rule("self_centered_clipping", f=5, options={"spread": 2.5})
    for bad in (1, 0.5, -2, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="spread"):
            make_rule("centered_clipping", f=5, options={"spread": bad})
    with pytest.raises(ValueError, match="alternatives"):
        make_rule("centered_clipping", f=5, options={"spread": 2, "tau": 1.0})
    with pytest.raises(ValueError, match="unknown option"):
        make_rule("clipped_gossip", f=5, options={"spread": 2})
