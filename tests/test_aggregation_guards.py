"""Guards instead of silent collapse: bucketing checked against each call's inputs, every
fallback and guard reported, per-input flags, and the per-peer suspicion ledger."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from p2pfl.aggregation import RobustnessLedger, bucketing, coordinate, krum, make_rule, min_inputs
from p2pfl.aggregation.diagnostics import (
    BUCKET_SIZE_REDUCED,
    CLIPPED,
    EXCLUDED,
    F_NOT_OUTVOTED,
    TOO_FEW_INPUTS,
    TRIMMED,
)
from p2pfl.aggregation.ledger import SUSPECT_SCORE


def sign_flip_set(
    seed: int, *, honest: int, attackers: int, d: int = 300, scale: float = 10.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Honest rows start + delta + noise; attackers start - scale * delta (as `sign_flip`
    sends), at random row positions. Returns (rows, attacker mask, honest rows)."""
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(d)
    delta = 0.1 * rng.standard_normal(d)
    good = start + delta + 0.02 * rng.standard_normal((honest, d))
    bad = start - scale * delta + 0.002 * rng.standard_normal((attackers, d))
    order = rng.permutation(honest + attackers)
    rows = np.concatenate([good, bad])[order].astype(np.float32)
    is_bad = order >= honest
    return rows, is_bad, good.astype(np.float32)


def own_row(x: np.ndarray, is_bad: np.ndarray) -> np.ndarray:
    return x[int(np.flatnonzero(~is_bad)[0])]


# ---- bucketing guard -------------------------------------------------------------------


def test_bucketing_on_seven_inputs_with_f2_does_not_collapse_under_sign_flip() -> None:
    """7 inputs in buckets of 2 make 4 buckets; 2 attackers can spoil 2 of them, and the
    median of 4 then averages a spoiled bucket into the result. The guard skips
    bucketing for such a call (7 inputs, f = 2: the median needs 5), and says so."""
    collapsed = 0
    for seed in range(20):
        x, is_bad, good = sign_flip_set(seed, honest=5, attackers=2)
        own = own_row(x, is_bad)
        lo, hi = good.min(axis=0), good.max(axis=0)
        rule = make_rule("median", f=2, options={"bucket_size": 2, "bucket_seed": seed})
        out = rule(x, np.ones(7), own)
        assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6), seed
        report = rule.last_report
        assert report is not None and report.guard is not None
        assert report.guard.key == BUCKET_SIZE_REDUCED and report.fallback is None
        assert "no bucketing" in report.guard.detail
        # What unguarded bucketing does with the same seed: the test can fail.
        means, _ = bucketing.bucket_means(x, np.ones(7), 2, np.random.default_rng(seed))
        old = coordinate.median(means, np.ones(len(means)), own)
        collapsed += not (np.all(old >= lo - 1e-6) and np.all(old <= hi + 1e-6))
    assert collapsed >= 10  # the attackers landed in different buckets in most seeds


def test_bucketing_keeps_its_size_when_the_buckets_outvote_f() -> None:
    x, is_bad, _ = sign_flip_set(1, honest=18, attackers=2)
    rule = make_rule("median", f=2, options={"bucket_size": 2, "bucket_seed": 3})
    out = rule(x, np.ones(20), own_row(x, is_bad))
    assert rule.last_report is not None and rule.last_report.events == ()
    means, weights = bucketing.bucket_means(x, np.ones(20), 2, np.random.default_rng(3))
    np.testing.assert_array_equal(out, coordinate.median(means, weights, x[0]))


def test_bucketing_shrinks_buckets_to_the_largest_size_that_is_enough() -> None:
    assert bucketing.safe_bucket_size(9, 3, 5) == 2  # 3 buckets < 5; ceil(9/2) = 5
    assert bucketing.safe_bucket_size(20, 2, 9) == 2
    assert bucketing.safe_bucket_size(20, 2, 11) == 1
    assert bucketing.safe_bucket_size(3, 4, 7) == 1  # nothing is enough: all inputs
    x, is_bad, _ = sign_flip_set(2, honest=7, attackers=2)
    rule = make_rule("trimmed_mean", f=2, options={"bucket_size": 3})
    rule(x, np.ones(9), own_row(x, is_bad))
    assert rule.last_report is not None and rule.last_report.guard is not None
    assert "buckets of 2 this round" in rule.last_report.guard.detail


def test_krum_with_bucketing_runs_krum_on_the_inputs_instead_of_the_median() -> None:
    """20 inputs, f = 4, buckets of 2: 10 buckets < 2f + 3 = 11. Before the guard this
    was a median of bucket means on every node; now Krum runs on the 20 inputs."""
    x, is_bad, _ = sign_flip_set(4, honest=16, attackers=4)
    own = own_row(x, is_bad)
    bucketed = make_rule("krum", f=4, options={"bucket_size": 2})
    out = bucketed(x, np.ones(20), own)
    np.testing.assert_array_equal(out, make_rule("krum", f=4)(x, np.ones(20), own))
    report = bucketed.last_report
    assert report is not None and report.fallback is None and bucketed.fallbacks == 0
    assert [e.key for e in report.events] == [BUCKET_SIZE_REDUCED]


def test_min_inputs_per_rule() -> None:
    assert min_inputs("mean", 3) == 1
    assert min_inputs("median", 2) == 5
    assert min_inputs("geometric_median", 0) == 1
    assert min_inputs("self_centered_clipping", 1) == 3
    assert min_inputs("krum", 2) == 7 and min_inputs("multi_krum", 0) == 3
    assert min_inputs("trimmed_mean", 2) == 5
    assert min_inputs("trimmed_mean", 0, beta=0.2) == 3  # trims 1 per side: needs 3


# ---- fallbacks and warnings, reported ----------------------------------------------------


def test_fallback_is_in_the_report_counted_and_logged_once_per_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rule = make_rule("krum", f=2)  # needs 7
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.DEBUG, logger="p2pfl.aggregation"):
        for n in (5, 6, 5, 4):
            x = rng.standard_normal((n, 10)).astype(np.float32)
            rule(x, np.ones(n), x[0])
            report = rule.last_report
            assert report is not None and report.fallback is not None
            assert report.fallback.key == TOO_FEW_INPUTS
            assert f"had {n}" in report.fallback.detail and report.flagged is None
    assert rule.fallbacks == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # Once per reason, not once per input count (5, 6 and 4 here).
    assert len(warnings) == 1 and "falling back" in warnings[0].getMessage()
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 4


def test_a_median_that_cannot_outvote_f_says_so() -> None:
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    rule = make_rule("median", f=2)
    out = rule(x, np.ones(4), x[0])
    np.testing.assert_array_equal(out, coordinate.median(x, np.ones(4), x[0]))
    assert rule.last_report is not None and rule.last_report.guard is not None
    assert rule.last_report.guard.key == F_NOT_OUTVOTED and rule.fallbacks == 0
    # Enough inputs: nothing to report.
    y = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    rule(y, np.ones(5), y[0])
    assert rule.last_report is not None and rule.last_report.events == ()


def test_trimmed_mean_krum_multi_krum_with_f3_and_7_inputs_report_it() -> None:
    """The issue's case: f = 3, 7 inputs. Krum and Multi-Krum fall back; the trimmed
    mean (b = 3 of 7) runs and is the median by construction, which needs no event."""
    x, is_bad, _ = sign_flip_set(5, honest=5, attackers=2)
    for name in ("krum", "multi_krum"):
        rule = make_rule(name, f=3)
        rule(x, np.ones(7), own_row(x, is_bad))
        assert rule.last_report is not None and rule.last_report.fallback is not None
        assert rule.last_fallback is not None and "needs 9 inputs, had 7" in rule.last_fallback
    tm = make_rule("trimmed_mean", f=3)
    tm(x, np.ones(7), own_row(x, is_bad))
    assert tm.last_report is not None and tm.last_report.events == ()


def test_a_failing_call_leaves_no_stale_report() -> None:
    rule = make_rule("median")
    x = np.ones((3, 4), dtype=np.float32)
    rule(x, np.ones(3), x[0])
    assert rule.last_report is not None
    with pytest.raises(ValueError):
        rule(x, np.ones(2), x[0])
    assert rule.last_report is None


# ---- per-input flags -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "evidence"),
    [
        ("self_centered_clipping", CLIPPED),
        ("centered_clipping", CLIPPED),
        ("trimmed_mean", TRIMMED),
        ("krum", EXCLUDED),
        ("multi_krum", EXCLUDED),
    ],
)
@pytest.mark.parametrize("d", [300, 5000])  # 5000: the trimmed mean's sampled estimate
def test_flags_name_the_attackers_and_no_honest_input(name: str, evidence: str, d: int) -> None:
    for seed in range(5):
        x, is_bad, _ = sign_flip_set(seed, honest=7, attackers=2, d=d)
        rule = make_rule(name, f=2)
        rule(x, np.ones(9), own_row(x, is_bad))
        report = rule.last_report
        assert report is not None and report.evidence == evidence
        assert report.flagged is not None
        np.testing.assert_array_equal(report.flagged, is_bad)


def test_rules_without_per_input_evidence_flag_nothing() -> None:
    x, is_bad, _ = sign_flip_set(0, honest=7, attackers=2)
    for name in ("mean", "median", "geometric_median"):
        rule = make_rule(name, f=2)
        rule(x, np.ones(9), own_row(x, is_bad))
        assert rule.last_report is not None and rule.last_report.flagged is None


def test_identical_inputs_are_never_trimmed() -> None:
    x = np.repeat(np.random.default_rng(0).standard_normal((1, 50)), 7, axis=0).astype(np.float32)
    rule = make_rule("trimmed_mean", f=2)
    rule(x, np.ones(7), x[0])
    assert rule.last_report is not None and rule.last_report.flagged is not None
    assert not rule.last_report.flagged.any()


def test_honest_trimmed_shares_stay_near_their_expected_share() -> None:
    """Exchangeable honest inputs: each is in a trimmed tail on about 2b/n of the
    coordinates, far below the flag threshold."""
    x = np.random.default_rng(3).standard_normal((8, 4000)).astype(np.float32)
    shares = coordinate.trimmed_shares(x, 2, np.random.default_rng(0))
    # 2b / n = 0.5, judged on 128 sampled coordinates: 4.5 standard errors.
    assert np.all(np.abs(shares - 0.5) < 0.2)
    assert coordinate.trimmed_flag_threshold(8, 2) == 0.75


def test_bucketed_flags_fall_on_the_members_of_a_flagged_bucket() -> None:
    x, is_bad, _ = sign_flip_set(6, honest=10, attackers=1)
    rule = make_rule("self_centered_clipping", f=1, options={"bucket_size": 2, "bucket_seed": 1})
    rule(x, np.ones(11), own_row(x, is_bad))
    report = rule.last_report
    assert report is not None and report.flagged is not None and report.events == ()
    assert report.flagged[is_bad].all()  # the attacker's bucket was clipped
    assert report.flagged.sum() <= 2  # ... and at most its bucket mate with it


def test_krum_excluded_is_the_f_worst_scores() -> None:
    sc = np.array([3.0, 1.0, 9.0, 2.0, 7.0])
    np.testing.assert_array_equal(krum.excluded(sc, 2), [False, False, True, False, True])
    assert not krum.excluded(sc, 0).any()


# ---- the ledger ------------------------------------------------------------------------


def _round(
    ledger: RobustnessLedger,
    rule_name: str,
    round: int,
    *,
    attacking: bool,
    seed: int,
) -> dict[str, object]:
    """One round of a node 'me' with six neighbours p0..p5, p3 a sign-flipper (when
    `attacking`), aggregated by the rule; rows in peer-id order as the round machine
    gives them."""
    ids = sorted(["me", *(f"p{i}" for i in range(6))])
    x, is_bad, _ = sign_flip_set(seed, honest=6 if attacking else 7, attackers=int(attacking))
    rows = list(x[~is_bad])
    rows.insert(ids.index("p3"), x[is_bad][0] if attacking else rows.pop())
    stacked = np.stack(rows)
    rule = make_rule(rule_name, f=1)
    rule(stacked, np.ones(7), stacked[ids.index("me")])
    return ledger.record(round, ids, rule.last_report)


@pytest.mark.parametrize("rule_name", ["trimmed_mean", "self_centered_clipping", "multi_krum"])
def test_suspicion_rises_for_the_attacker_stays_low_for_honest_and_recovers(
    rule_name: str,
) -> None:
    ledger = RobustnessLedger("me", half_life=5)
    for r in range(30):
        row = _round(ledger, rule_name, r, attacking=True, seed=r)
        assert "p3" in row["flagged"]  # type: ignore[operator]
    status = ledger.status()
    scores = {p: v["score"] for p, v in status["suspicion"].items()}
    assert "me" not in scores
    assert scores["p3"] > 0.95
    assert all(s < SUSPECT_SCORE for p, s in scores.items() if p != "p3")
    assert status["suspects"] == ["p3"]
    # The peer behaves from now on: its score decays, it leaves the suspects.
    for r in range(30, 60):
        _round(ledger, rule_name, r, attacking=False, seed=r)
    assert ledger.peers["p3"].score < SUSPECT_SCORE
    assert "p3" not in ledger.suspects()


def test_ledger_counts_reasons_and_builds_the_row() -> None:
    ledger = RobustnessLedger("me")
    rule = make_rule("krum", f=2)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    ids = ["a", "b", "c", "me", "z"]
    for r in range(3):
        rule(x, np.ones(5), x[3])
        row = ledger.record(r, ids, rule.last_report)
    assert row["fallback"] == TOO_FEW_INPUTS and row["guards"] == []
    assert "krum with f=2 needs 7 inputs, had 5" in str(row["detail"])
    assert row["flagged"] == {}  # a fallback round is no evidence about anyone
    status = ledger.status()
    assert status["fallbacks"] == {TOO_FEW_INPUTS: 3} and status["guards"] == {}
    assert status["suspicion"] == {} and status["aggregations"] == 3


def test_ledger_scores_malformed_rejections_but_not_lossy_network_ones() -> None:
    ledger = RobustnessLedger("me")
    for r in range(4):
        row = ledger.record(
            r, ["me"], None, [("bad", "non_finite"), ("bad", "bad_shape"), ("late", "stale")]
        )
        assert row["flagged"] == {"bad": "rejected"}
    assert ledger.peers["bad"].observed == 4  # once per round, however many messages
    assert ledger.peers["bad"].score == 1.0 and "late" not in ledger.peers
    assert ledger.suspects() == ["bad"]


def test_ledger_does_not_attribute_flags_of_a_report_that_does_not_match() -> None:
    ledger = RobustnessLedger("me")
    rule = make_rule("self_centered_clipping", f=1)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    rule(x, np.ones(4), x[0])
    ledger.record(0, ["me", "a", "b"], rule.last_report)  # 3 names for 4 rows
    assert ledger.unattributed == 1 and ledger.peers == {}


def test_ledger_forgets_the_longest_unobserved_peer_beyond_its_cap() -> None:
    ledger = RobustnessLedger("me", max_peers=2)
    ledger.record(0, [], None, [("a", "non_finite")])
    ledger.record(1, [], None, [("b", "non_finite")])
    ledger.record(2, [], None, [("c", "non_finite")])
    assert sorted(ledger.peers) == ["b", "c"]


def test_ledger_counts_but_does_not_attribute_when_rows_are_not_single_peers() -> None:
    x, is_bad, _ = sign_flip_set(0, honest=6, attackers=1)
    rule = make_rule("self_centered_clipping", f=1)
    rule(x, np.ones(7), own_row(x, is_bad))
    ids = [f"p{i}" for i in range(7)]
    ledger = RobustnessLedger("p0")
    row = ledger.record(0, ids, rule.last_report, [("p5", "non_finite")], attribute=False)
    assert row["flagged"] == {"p5": "rejected"} and list(ledger.peers) == ["p5"]
    assert ledger.unattributed == 0
