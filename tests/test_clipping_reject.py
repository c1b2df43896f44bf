"""The clipping rules' far-outlier cut (`reject`): an input far beyond the honest spread
pulls nothing instead of tau / n, at most f inputs are cut, and in-spread inputs are
clipped exactly as before."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.aggregation import make_rule
from p2pfl.aggregation.clipping import (
    centered_clipping,
    clipped_gossip,
    far_outliers,
    self_centered_clipping,
)
from p2pfl.aggregation.diagnostics import CLIPPED

RULES = (centered_clipping, self_centered_clipping, clipped_gossip)


def neighbourhood(far: float, n_far: int = 1, d: int = 40, seed: int = 0) -> np.ndarray:
    """Row 0 is the node's own model, rows 1..6 honest neighbours around it, then
    `n_far` attackers at `far` times the honest spread in one direction."""
    rng = np.random.default_rng(seed)
    own = rng.standard_normal(d)
    honest = own + 0.1 * rng.standard_normal((6, d))
    direction = rng.standard_normal(d)
    direction *= 0.1 * np.sqrt(d) / np.linalg.norm(direction)
    bad = own + far * direction * (1.0 + 0.1 * np.arange(n_far))[:, None]
    return np.concatenate([own[None], honest, bad]).astype(np.float32)


def test_far_outliers_only_among_the_f_farthest_and_beyond_the_factor() -> None:
    dist = np.array([0.0, 1.0, 1.1, 0.9, 1.2, 30.0, 2.5])
    # f = 2: the reference is the 3rd farthest, 1.2: 30 is beyond 3x, 2.5 is not
    assert far_outliers(dist, 2, 3.0).tolist() == [False] * 5 + [True, False]
    assert far_outliers(dist, 2, 2.0).tolist() == [False] * 5 + [True, True]
    # f = 1: the reference is the 2nd farthest, 2.5, and only the farthest may go
    assert far_outliers(dist, 1, 3.0).tolist() == [False] * 5 + [True, False]
    assert far_outliers(dist, 2, None) is None
    assert far_outliers(dist, 0, 3.0) is None
    assert far_outliers(np.array([0.0, 1.0, 1.0]), 1, 3.0) is None


def test_the_reference_does_not_move_with_the_attackers() -> None:
    """3 of 6 neighbours far away, f = 3: a median of the distances would sit between
    the honest and the attacking ones and cut nobody; the (f+1)-th farthest is honest."""
    dist = np.array([0.0, 1.0, 1.1, 1.2, 10.0, 10.5, 11.0])
    assert float(np.median(dist[1:])) * 3 > 11.0  # what a median reference would do
    assert far_outliers(dist, 3, 3.0).tolist() == [False] * 4 + [True] * 3


def test_on_a_ring_the_farther_neighbour_is_cut_beyond_c_times_the_nearer() -> None:
    """Own plus two neighbours with f = 1: the only distance sure to be honest is the
    nearer neighbour's, so an honest neighbour c times farther is cut (the price of
    declaring f = 1 with two neighbours; docs/robustness.md measures it on the ring)."""
    assert far_outliers(np.array([0.0, 1.0, 2.9]), 1, 3.0) is None
    assert far_outliers(np.array([0.0, 1.0, 3.5]), 1, 3.0).tolist() == [False, False, True]


@pytest.mark.parametrize("rule", RULES)
def test_a_far_attacker_pulls_nothing_with_reject(rule) -> None:  # type: ignore[no-untyped-def]
    x = neighbourhood(far=50.0)
    own = x[0]
    # The attacker never sent: 7 inputs, nothing to clip (with it and f = 1 the radius
    # is the farthest honest distance or more, so no honest input is clipped either).
    without = rule(x[:-1], own, f=0)
    plain = rule(x, own, f=1)
    cut = rule(x, own, f=1, reject=3.0)
    direction = x[-1] - own
    direction /= np.linalg.norm(direction)
    # Clipped, the attacker still pulls the result its way; cut, it does not: what is
    # left along its direction is the honest neighbours' (scaled by 7/8: it still counts
    # in n, at the node's own position).
    pull_plain = float((plain - own) @ direction)
    pull_cut = float((cut - own) @ direction)
    pull_honest = float((without - own) @ direction)
    assert pull_plain > pull_cut + 1e-3
    if rule is centered_clipping:  # later steps re-centre, so compare loosely
        assert abs(pull_cut) < abs(pull_plain) / 2
    else:
        assert pull_cut == pytest.approx(7 / 8 * pull_honest, abs=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_an_attacker_inside_the_factor_is_clipped_as_before(rule) -> None:  # type: ignore[no-untyped-def]
    x = neighbourhood(far=1.5)
    own = x[0]
    np.testing.assert_array_equal(rule(x, own, f=1), rule(x, own, f=1, reject=3.0))


def test_more_attackers_than_f_get_plain_clipping_not_more_cuts() -> None:
    """At most f inputs are ever cut: with 3 far attackers and f = 2 the third one is
    the reference, nobody is cut and the rule is plain clipping (the declared f is
    the promise); with f = 3 all three are cut."""
    x = neighbourhood(far=50.0, n_far=3)
    own = x[0]
    dist = np.linalg.norm((x - own).astype(np.float64), axis=1)
    assert far_outliers(dist, 2, 3.0) is None
    np.testing.assert_array_equal(
        self_centered_clipping(x, own, f=2, reject=3.0), self_centered_clipping(x, own, f=2)
    )
    cut = far_outliers(dist, 3, 3.0)
    assert cut is not None and cut.sum() == 3 and cut[-3:].all()


def test_the_rule_option_is_validated_and_cut_inputs_are_flagged() -> None:
    x = neighbourhood(far=50.0)
    rule = make_rule("centered_clipping", f=1, options={"reject": 3})
    _, report = rule.aggregate(x, np.ones(len(x)), x[0])
    assert report.evidence == CLIPPED
    assert report.flagged is not None and report.flagged[-1]
    with pytest.raises(ValueError, match="reject"):
        make_rule("clipped_gossip", f=1, options={"reject": 1.0})
    with pytest.raises(ValueError, match="reject"):
        make_rule("median", f=1, options={"reject": 3})
