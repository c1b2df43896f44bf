"""Tests for the sans-IO round state machine (`p2pfl.protocol.rounds`).

Everything is driven with plain floats as `now` and tiny float32 vectors, so every rule
(quorum, timeout, stale/future/duplicate/bad messages, catch-up) is checked exactly and
without sockets or clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.aggregation import mean
from p2pfl.protocol import (
    Action,
    Aggregated,
    Broadcast,
    CaughtUp,
    Finished,
    Phase,
    Rejected,
    RequestState,
    RequestUpdates,
    RoundMachine,
    RoundSettings,
    Train,
)
from p2pfl.protocol.rounds import MAJORITY_GRACE, MIN_NUDGE_GAP

D = 4
PEERS = ["a", "b", "c"]
T = TypeVar("T")


def vec(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def full(x: float) -> np.ndarray:
    return np.full(D, x, dtype=np.float32)


def machine(**kw: Any) -> RoundMachine:
    params = kw.pop("params", np.zeros(D, dtype=np.float32))
    rng = kw.pop("rng", None)
    m = RoundMachine(params=params, rule=mean, settings=RoundSettings(**kw))
    if rng is not None:
        m.rng = rng
    return m


def only(actions: Sequence[Action], kind: type[T]) -> T:
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def phase(m: RoundMachine) -> Phase:
    """Read the phase through a call so mypy does not keep an earlier narrowing."""
    return m.phase


def kinds(actions: Sequence[Action]) -> list[type]:
    return [type(a) for a in actions]


def started(**kw: Any) -> RoundMachine:
    """A machine that has been started and is training round 0."""
    m = machine(**kw)
    acts = m.start(0.0, PEERS)
    assert kinds(acts) == [Train]
    return m


def collecting(
    peers: list[str] = PEERS, own: float = 1.0, samples: int = 1, **kw: Any
) -> RoundMachine:
    """A machine that trained round 0 and waits for its neighbours."""
    m = started(**kw)
    acts = m.trained(0.0, 0, full(own), samples, peers)
    assert kinds(acts) == [Broadcast]
    assert m.phase is Phase.COLLECTING
    return m


# ---- the happy path -------------------------------------------------------------------


def test_full_round_weighted_mean_then_next_round() -> None:
    m = machine(params=vec(9, 9, 9, 9), round_timeout=5.0)
    assert phase(m) is Phase.STARTING
    acts = m.start(0.0, PEERS)
    train = only(acts, Train)
    assert len(acts) == 1 and train.round == 0
    np.testing.assert_array_equal(train.params, vec(9, 9, 9, 9))
    assert m.phase is Phase.TRAINING

    own = vec(1, 2, 3, 4)
    acts = m.trained(1.0, 0, own, 2, ["c", "a", "b", "a"])
    bc = only(acts, Broadcast)
    assert len(acts) == 1
    assert bc.to == ("a", "b", "c") and bc.round == 0 and bc.samples == 2
    np.testing.assert_array_equal(bc.params, own)
    assert m.deadline == 6.0
    assert m.expected_this_round == 3

    assert m.receive_update(2.0, "b", 0, vec(5, 6, 7, 8), 1) == []
    assert m.receive_update(2.5, "a", 0, vec(-1, 0, 1, 2), 4) == []
    assert m.received_this_round == ("b", "a")
    acts = m.receive_update(3.0, "c", 0, vec(0, 0, 0, 8), 1)
    assert kinds(acts) == [Aggregated, Train]
    agg = only(acts, Aggregated)
    # weights own 2, a 4, b 1, c 1 -> 1/4, 1/2, 1/8, 1/8 (exact in float32)
    expected = (2 * own + 4 * vec(-1, 0, 1, 2) + vec(5, 6, 7, 8) + vec(0, 0, 0, 8)) / 8
    np.testing.assert_array_equal(agg.params, expected)
    np.testing.assert_array_equal(agg.params, vec(0.375, 1.25, 2.125, 4.0))
    assert agg.params.dtype == np.float32
    assert agg.round == 0
    assert agg.senders == ("a", "b", "c")
    assert agg.rejected == ()
    assert agg.timed_out is False
    assert agg.rule == "mean"

    train = only(acts, Train)
    assert train.round == 1
    np.testing.assert_array_equal(train.params, expected)
    assert m.round == 1 and m.phase is Phase.TRAINING and m.deadline is None
    np.testing.assert_array_equal(m.params, expected)


def test_train_params_are_a_copy() -> None:
    m = machine(params=full(3.0))
    train = only(m.start(0.0, PEERS), Train)
    train.params[:] = 100.0
    np.testing.assert_array_equal(m.params, full(3.0))


def test_nothing_happens_while_waiting() -> None:
    m = collecting(round_timeout=10.0)
    assert m.receive_update(1.0, "a", 0, full(2.0), 1) == []
    assert m.receive_update(2.0, "b", 0, full(2.0), 1) == []
    assert m.tick(9.99) == []
    assert m.trained(3.0, 0, full(5.0), 1, PEERS) == []  # already collecting
    assert m.start(3.0, PEERS) == []
    assert m.round == 0 and m.phase is Phase.COLLECTING


def test_zero_samples_everywhere_falls_back_to_uniform() -> None:
    m = collecting(peers=["a"], own=2.0, samples=0)
    acts = m.receive_update(1.0, "a", 0, full(4.0), 0)
    np.testing.assert_array_equal(only(acts, Aggregated).params, full(3.0))


# ---- quorum and timeout ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("quorum", "n_peers", "need"),
    [(0.5, 4, 2), (0.5, 3, 2), (0.34, 3, 2), (0.75, 4, 3), (0.01, 5, 1), (1.0, 2, 2)],
)
def test_quorum_aggregates_after_ceil_q_times_expected(
    quorum: float, n_peers: int, need: int
) -> None:
    peers = [f"p{i}" for i in range(n_peers)]
    m = collecting(peers=peers, quorum=quorum)
    for i in range(need - 1):
        assert m.receive_update(1.0, peers[i], 0, full(1.0), 1) == []
    acts = m.receive_update(1.0, peers[need - 1], 0, full(1.0), 1)
    agg = only(acts, Aggregated)
    assert agg.senders == tuple(sorted(peers[:need]))
    assert m.round == 1


def test_quorum_zero_aggregates_right_after_training() -> None:
    m = started(quorum=0.0)
    acts = m.trained(0.0, 0, full(1.0), 1, PEERS)
    assert kinds(acts) == [Broadcast, Aggregated, Train]
    assert only(acts, Aggregated).senders == ()


def test_timeout_aggregates_without_silent_peer() -> None:
    m = collecting(own=2.0, round_timeout=10.0)
    assert m.receive_update(1.0, "a", 0, full(4.0), 1) == []
    assert m.receive_update(1.0, "c", 0, full(6.0), 2) == []
    assert m.tick(5.0) == []
    assert m.tick(9.999) == []
    assert m.round == 0
    acts = m.tick(10.0)
    agg = only(acts, Aggregated)
    assert agg.timed_out is True
    assert agg.senders == ("a", "c")
    np.testing.assert_array_equal(agg.params, full((2.0 + 4.0 + 12.0) / 4))
    assert only(acts, Train).round == 1
    # the deadline is consumed: ticking again does nothing
    assert m.tick(100.0) == []


def test_timeout_alone_keeps_own_model() -> None:
    m = collecting(own=7.0, round_timeout=3.0)
    acts = m.tick(3.5)
    agg = only(acts, Aggregated)
    assert agg.senders == () and agg.timed_out
    np.testing.assert_array_equal(agg.params, full(7.0))


def test_late_update_after_timeout_is_stale() -> None:
    m = collecting(round_timeout=3.0)
    m.tick(3.0)
    assert m.receive_update(4.0, "b", 0, full(1.0), 1) == [Rejected("b", 0, "stale")]


# ---- validation of updates ------------------------------------------------------------


def test_stale_update_rejected() -> None:
    m = collecting()
    for p in PEERS:
        m.receive_update(1.0, p, 0, full(1.0), 1)
    assert m.round == 1
    assert m.receive_update(2.0, "a", 0, full(1.0), 1) == [Rejected("a", 0, "stale")]
    assert m.receive_update(2.0, "a", -5, full(1.0), 1) == [Rejected("a", -5, "stale")]


def test_duplicate_rejected_and_first_value_kept() -> None:
    m = collecting(peers=["a", "b"], own=0.0)
    assert m.receive_update(1.0, "a", 0, full(4.0), 1) == []
    assert m.receive_update(1.0, "a", 0, full(400.0), 1) == [Rejected("a", 0, "duplicate")]
    assert m.round == 0  # a duplicate does not count towards the quorum
    acts = m.receive_update(1.0, "b", 0, full(8.0), 1)
    agg = only(acts, Aggregated)
    np.testing.assert_array_equal(agg.params, full(4.0))
    assert agg.senders == ("a", "b")
    assert agg.rejected == (("a", "duplicate"),)


@pytest.mark.parametrize(
    ("params", "samples", "reason"),
    [
        (np.zeros(D + 1, dtype=np.float32), 1, "bad_shape"),
        (np.zeros((2, 2), dtype=np.float32), 1, "bad_shape"),
        (np.zeros(D, dtype=np.float64), 1, "bad_shape"),
        (np.zeros(D, dtype=np.float16), 1, "bad_shape"),
        (np.zeros(D, dtype=np.int32), 1, "bad_shape"),
        (vec(0, np.nan, 0, 0), 1, "non_finite"),
        (vec(0, 0, np.inf, 0), 1, "non_finite"),
        (vec(-np.inf, 0, 0, 0), 1, "non_finite"),
        (full(1.0), -1, "bad_samples"),
    ],
)
def test_malformed_update_rejected(params: np.ndarray, samples: int, reason: str) -> None:
    m = collecting(peers=["a"], own=1.0)
    assert m.receive_update(1.0, "a", 0, params, samples) == [Rejected("a", 0, reason)]
    assert m.received_this_round == ()
    # the peer may still send a good one, which completes the round
    acts = m.receive_update(1.0, "a", 0, full(3.0), 1)
    agg = only(acts, Aggregated)
    np.testing.assert_array_equal(agg.params, full(2.0))
    assert agg.rejected == (("a", reason),)


def test_rejections_for_current_round_are_reported() -> None:
    m = started()
    # rejected while still training round 0 counts too
    m.receive_update(0.5, "a", 0, vec(np.nan, 0, 0, 0), 1)
    m.trained(1.0, 0, full(1.0), 1, ["a", "b"])
    m.receive_update(1.5, "b", 0, np.zeros(3, dtype=np.float32), 1)
    m.receive_update(1.6, "b", 0, full(1.0), 1)
    m.receive_update(1.7, "b", 0, full(1.0), 1)  # duplicate
    m.receive_update(1.8, "c", -1, full(1.0), 1)  # stale: another round's business
    acts = m.receive_update(2.0, "a", 0, full(1.0), 1)
    agg = only(acts, Aggregated)
    assert agg.rejected == (("a", "non_finite"), ("b", "bad_shape"), ("b", "duplicate"))
    # the next round starts with a clean slate
    m.trained(3.0, 1, full(1.0), 1, ["a"])
    acts = m.receive_update(4.0, "a", 1, full(1.0), 1)
    assert only(acts, Aggregated).rejected == ()


def test_only_the_newest_round_beyond_the_window_is_kept() -> None:
    m = collecting(max_rounds_ahead=2, catch_up_lag=10)
    assert m.receive_update(1.0, "a", 4, full(1.0), 1) == []  # newest far round: kept
    assert m.receive_update(1.0, "b", 3, full(1.0), 1) == [Rejected("b", 3, "too_far_ahead")]
    assert m.receive_update(1.0, "b", 5, full(1.0), 1) == []  # newer: replaces round 4
    assert 4 not in m._received and set(m._received[5]) == {"b"}
    assert m.receive_update(1.0, "a", 2, full(1.0), 1) == []
    assert m.receive_update(1.0, "a", 1, full(1.0), 1) == []


def test_future_updates_buffered_and_used_at_that_round() -> None:
    m = collecting(own=1.0, max_rounds_ahead=2, catch_up_lag=10)
    # round-1 updates of every neighbour arrive before round 0 is done
    for p, x in zip(PEERS, [2.0, 4.0, 6.0], strict=True):
        assert m.receive_update(1.0, p, 1, full(x), 1) == []
    assert m.round == 0 and m.received_this_round == ()
    for p in PEERS:
        m.receive_update(2.0, p, 0, full(1.0), 1)
    assert m.round == 1 and m.phase is Phase.TRAINING
    assert set(m.received_this_round) == set(PEERS)
    # the buffer already satisfies the quorum: aggregation right after training
    acts = m.trained(3.0, 1, full(0.0), 1, PEERS)
    assert kinds(acts) == [Broadcast, Aggregated, Train]
    agg = only(acts, Aggregated)
    assert agg.round == 1 and agg.senders == ("a", "b", "c") and not agg.timed_out
    np.testing.assert_array_equal(agg.params, full(3.0))
    assert only(acts, Train).round == 2


def test_partially_buffered_round_waits_for_the_rest() -> None:
    m = collecting(own=1.0, catch_up_lag=10)
    m.receive_update(1.0, "a", 1, full(5.0), 1)
    for p in PEERS:
        m.receive_update(2.0, p, 0, full(1.0), 1)
    acts = m.trained(3.0, 1, full(1.0), 1, PEERS)
    assert kinds(acts) == [Broadcast]
    assert m.received_this_round == ("a",)
    m.receive_update(4.0, "b", 1, full(1.0), 1)
    acts = m.receive_update(4.0, "c", 1, full(1.0), 1)
    np.testing.assert_array_equal(only(acts, Aggregated).params, full(2.0))


def test_duplicate_of_buffered_future_update() -> None:
    m = collecting(catch_up_lag=10)
    m.receive_update(1.0, "a", 2, full(1.0), 1)
    assert m.receive_update(1.0, "a", 2, full(9.0), 1) == [Rejected("a", 2, "duplicate")]


def test_update_during_starting_is_kept_for_round_zero() -> None:
    m = machine()
    assert m.receive_update(0.0, "a", 0, full(3.0), 1) == []
    m.start(0.0, ["a"])
    acts = m.trained(1.0, 0, full(1.0), 1, ["a"])
    np.testing.assert_array_equal(only(acts, Aggregated).params, full(2.0))


# ---- neighbour selection --------------------------------------------------------------


def test_neighbour_count_picks_k_distinct_connected_peers() -> None:
    peers = [f"p{i}" for i in range(10)]
    for seed in range(20):
        m = started(neighbour_count=3, rng=np.random.default_rng(seed))
        bc = only(m.trained(0.0, 0, full(1.0), 1, peers), Broadcast)
        assert len(bc.to) == 3 and len(set(bc.to)) == 3
        assert set(bc.to) <= set(peers)
        assert list(bc.to) == sorted(bc.to)
        assert m.expected_this_round == 3


def test_neighbour_count_is_deterministic_per_seed() -> None:
    peers = [f"p{i}" for i in range(10)]

    def pick(seed: int, order: list[str]) -> tuple[str, ...]:
        m = started(neighbour_count=3, rng=np.random.default_rng(seed))
        return only(m.trained(0.0, 0, full(1.0), 1, order), Broadcast).to

    assert pick(42, peers) == pick(42, peers)
    # the connection order does not matter, only the set and the seed
    assert pick(42, peers) == pick(42, list(reversed(peers)))
    assert len({pick(s, peers) for s in range(20)}) > 1


def test_neighbour_count_larger_than_peers_sends_to_all() -> None:
    m = started(neighbour_count=5)
    bc = only(m.trained(0.0, 0, full(1.0), 1, ["b", "a"]), Broadcast)
    assert bc.to == ("a", "b")


# ---- peer loss ------------------------------------------------------------------------


def test_peer_lost_reduces_expected_and_completes_round() -> None:
    m = collecting()
    m.receive_update(1.0, "a", 0, full(1.0), 1)
    m.receive_update(1.0, "b", 0, full(1.0), 1)
    assert m.expected_this_round == 3
    acts = m.peer_lost(2.0, "c")
    agg = only(acts, Aggregated)
    assert agg.senders == ("a", "b") and agg.timed_out is False
    assert m.round == 1


def test_peer_lost_after_sending_does_not_change_expected() -> None:
    m = collecting()
    m.receive_update(1.0, "a", 0, full(1.0), 1)
    assert m.peer_lost(2.0, "a") == []
    assert m.expected_this_round == 3
    m.receive_update(1.0, "b", 0, full(1.0), 1)
    assert m.round == 0


def test_all_peers_lost_waits_for_timeout() -> None:
    m = collecting(own=5.0, round_timeout=10.0)
    for p in PEERS:
        assert m.peer_lost(1.0, p) == []
    assert m.expected_this_round == 0
    assert m.round == 0 and m.phase is Phase.COLLECTING
    assert m.tick(9.0) == []
    acts = m.tick(10.0)
    agg = only(acts, Aggregated)
    assert agg.timed_out and agg.senders == ()
    np.testing.assert_array_equal(agg.params, full(5.0))


def test_no_peers_at_all_waits_for_timeout() -> None:
    m = started(round_timeout=4.0)
    assert kinds(m.trained(0.0, 0, full(1.0), 1, [])) == [Broadcast]
    assert m.expected_this_round == 0
    assert m.tick(3.0) == []
    assert kinds(m.tick(4.0)) == [Aggregated, Train]


def test_peer_lost_twice_counts_once() -> None:
    m = collecting()
    m.peer_lost(1.0, "a")
    m.peer_lost(2.0, "a")  # reconnected and dropped again in the same round
    assert m.expected_this_round == 2
    # c is still connected and expected (quorum 1.0): b alone must not complete the round
    assert m.receive_update(3.0, "b", 0, full(1.0), 1) == []
    assert m.round == 0


# ---- end of training ------------------------------------------------------------------


def test_target_rounds_finishes_and_later_updates_are_stale() -> None:
    m = started(target_rounds=2)
    for r in range(2):
        m.trained(float(r), r, full(1.0), 1, ["a"])
        acts = m.receive_update(float(r), "a", r, full(1.0), 1)
        if r == 0:
            assert kinds(acts) == [Aggregated, Train]
    assert kinds(acts) == [Aggregated, Finished]
    assert only(acts, Finished).round == 2
    assert m.phase is Phase.DONE and m.round == 2 and m.deadline is None
    assert m.receive_update(5.0, "a", 2, full(1.0), 1) == [Rejected("a", 2, "stale")]
    assert m.receive_update(5.0, "a", 3, full(1.0), 1) == [Rejected("a", 3, "stale")]
    assert m.trained(5.0, 2, full(1.0), 1, ["a"]) == []
    assert m.observe_peer_round(5.0, "a", 10) == []
    assert m.tick(1e9) == []
    assert m.start(5.0, ["a"]) == []


def test_start_when_already_done() -> None:
    m = machine(target_rounds=3)
    m.round = 3
    assert m.start(0.0, PEERS) == [Finished(3)]
    assert m.phase is Phase.DONE


def test_target_zero_runs_forever() -> None:
    m = started(target_rounds=0, quorum=0.0)
    for r in range(30):
        acts = m.trained(float(r), r, full(1.0), 1, ["a"])
        assert only(acts, Train).round == r + 1


def test_training_result_for_obsolete_round_ignored() -> None:
    m = started()
    assert m.trained(0.0, 1, full(1.0), 1, PEERS) == []
    assert m.trained(0.0, -1, full(1.0), 1, PEERS) == []
    assert m.phase is Phase.TRAINING
    # catch-up makes the running training obsolete
    m.observe_peer_round(0.0, "a", 5)
    assert phase(m) is Phase.CATCHING_UP
    assert m.trained(1.0, 0, full(1.0), 1, PEERS) == []
    m.receive_state(2.0, "a", 5, full(2.0))
    assert m.round == 5
    assert m.trained(3.0, 0, full(1.0), 1, PEERS) == []
    assert m.phase is Phase.TRAINING


# ---- catch-up -------------------------------------------------------------------------


def ahead_machine(rounds: dict[str, int], **kw: Any) -> tuple[RoundMachine, RequestState]:
    """A machine at round 0 that knew, when started, that these peers are at `rounds`.

    (While training, the first far-ahead peer seen triggers the catch-up at once, so
    several lagging peers can only be known together before `start`.)"""
    m = machine(**kw)
    for p, r in rounds.items():
        assert m.observe_peer_round(0.0, p, r) == []
    req = only(m.start(1.0, list(rounds)), RequestState)
    assert m.phase is Phase.CATCHING_UP
    return m, req


def test_observe_peer_one_round_ahead_does_nothing() -> None:
    m = started(catch_up_lag=2)
    assert m.observe_peer_round(1.0, "a", 1) == []
    assert m.phase is Phase.TRAINING


def test_catch_up_asks_most_advanced_first_and_combines_by_median() -> None:
    m = started(catch_up_peers=3, catch_up_timeout=10.0)
    assert m.observe_peer_round(1.0, "p1", 1) == []
    acts = m.observe_peer_round(1.0, "p7", 7)
    # the lagging peer first, then the most advanced others: never one peer's word alone
    assert acts == [RequestState(("p7", "p1"))]
    assert m.deadline == 11.0
    # a fresh machine that knows everybody at once asks the top 3
    m, req = ahead_machine({"a": 5, "b": 9, "c": 6, "d": 7, "e": 1}, catch_up_peers=3)
    assert req.to == ("b", "d", "c")
    assert m.receive_state(2.0, "b", 9, vec(1, 2, 3, 4)) == []
    assert m.receive_state(2.0, "d", 7, vec(1000, -1000, 1e6, 3)) == []  # the outlier
    acts = m.receive_state(2.0, "c", 6, vec(3, 4, 5, 6))
    caught = only(acts, CaughtUp)
    assert caught.from_round == 0
    assert caught.round == 7  # lower median of 6, 7, 9
    assert caught.sources == ("b", "c", "d")
    np.testing.assert_array_equal(caught.params, vec(3, 2, 5, 4))
    train = only(acts, Train)
    assert kinds(acts) == [CaughtUp, Train]
    assert train.round == 7
    np.testing.assert_array_equal(train.params, vec(3, 2, 5, 4))
    assert m.round == 7 and m.phase is Phase.TRAINING and m.deadline is None


def test_catch_up_asks_peers_that_answer_pings_before_stalled_ones() -> None:
    m = machine(catch_up_peers=3)
    m.unresponsive = frozenset({"b", "d"})  # alive (they send) but never answer a ping
    for p, r in {"a": 5, "b": 9, "c": 6, "d": 7, "e": 1}.items():
        m.observe_peer_round(0.0, p, r)
    req = only(m.start(1.0, ["a", "b", "c", "d", "e"]), RequestState)
    # Responsive peers first (lagging ones, then the most advanced others), stalled last.
    assert req.to == ("c", "a", "e")
    # All asked are stalled: still asked (better than nobody), in the usual order.
    m2 = machine(catch_up_peers=2)
    m2.unresponsive = frozenset({"x", "y"})
    for p, r in {"x": 8, "y": 9}.items():
        m2.observe_peer_round(0.0, p, r)
    assert only(m2.start(1.0, ["x", "y"]), RequestState).to == ("y", "x")


def test_catch_up_lower_median_of_two_ignores_an_inflated_round() -> None:
    m, req = ahead_machine({"a": 4, "liar": 10_000}, catch_up_peers=3)
    assert set(req.to) == {"a", "liar"}
    m.receive_state(2.0, "liar", 10_000, full(99.0))
    acts = m.receive_state(2.0, "a", 4, full(1.0))
    assert only(acts, CaughtUp).round == 4
    assert m.round == 4


def test_catch_up_reply_from_peer_not_asked_is_ignored() -> None:
    m, req = ahead_machine({"a": 5, "b": 4, "c": 3}, catch_up_peers=2)
    assert req.to == ("a", "b")
    assert m.receive_state(2.0, "c", 3, full(50.0)) == []
    assert m.receive_state(2.0, "a", 5, full(1.0)) == []  # still waiting for b
    acts = m.receive_state(2.0, "b", 4, full(3.0))
    caught = only(acts, CaughtUp)
    assert caught.sources == ("a", "b")
    np.testing.assert_array_equal(caught.params, full(2.0))  # median of two = their mean
    assert caught.round == 4


def test_state_reply_outside_catch_up_is_ignored() -> None:
    m = started()
    assert m.receive_state(1.0, "a", 0, full(9.0)) == []
    assert m.phase is Phase.TRAINING
    np.testing.assert_array_equal(m.params, full(0.0))


def test_catch_up_timeout_without_replies_resumes_at_old_round() -> None:
    m, _ = ahead_machine({"a": 5}, catch_up_timeout=10.0, params=full(4.0))
    # The request or the reply may be lost: asked again after 2 s, then 4 s later.
    assert m.next_wakeup == 3.0
    assert m.tick(3.0) == [RequestState(("a",))]
    assert m.next_wakeup == 7.0
    assert m.tick(7.0) == [RequestState(("a",))]
    assert m.tick(10.5) == []  # the next try would be after the deadline (1.0 + 10.0)
    acts = m.tick(11.0)
    assert kinds(acts) == [Train]
    train = only(acts, Train)
    assert train.round == 0
    np.testing.assert_array_equal(train.params, full(4.0))
    assert m.phase is Phase.TRAINING and m.round == 0
    # the stale knowledge is forgotten: finishing this round does not re-trigger it
    m.trained(12.0, 0, full(4.0), 1, ["b"])
    acts = m.receive_update(13.0, "b", 0, full(4.0), 1)
    assert kinds(acts) == [Aggregated, Train]


def test_catch_up_finishes_soon_after_a_majority_answered() -> None:
    m, req = ahead_machine({"a": 5, "b": 6, "c": 7}, catch_up_timeout=10.0)
    assert set(req.to) == {"a", "b", "c"}
    assert m.receive_state(2.0, "a", 5, full(1.0)) == []
    assert m.deadline == 11.0  # one of three: wait on
    assert m.receive_state(2.2, "b", 6, full(3.0)) == []
    assert m.deadline == pytest.approx(2.2 + MAJORITY_GRACE)  # two of three: a moment more
    acts = m.tick(2.2 + MAJORITY_GRACE)
    caught = only(acts, CaughtUp)
    assert caught.sources == ("a", "b") and caught.round == 5  # lower median of 5 and 6


def test_catch_up_timeout_uses_partial_replies() -> None:
    m, _ = ahead_machine({"a": 5, "b": 6, "c": 7}, catch_up_timeout=10.0)
    m.receive_state(2.0, "a", 5, full(1.0))
    acts = m.tick(11.0)
    caught = only(acts, CaughtUp)
    assert caught.round == 5 and caught.sources == ("a",)
    assert only(acts, Train).round == 5


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(D + 1, dtype=np.float32),
        vec(0, np.nan, 0, 0),
        vec(np.inf, 0, 0, 0),
    ],
)
def test_bad_state_rejected(bad: np.ndarray) -> None:
    m, _ = ahead_machine({"a": 5})
    assert m.receive_state(2.0, "a", 5, bad) == [Rejected("a", 5, "bad_state")]
    assert m.phase is Phase.CATCHING_UP and m.round == 0
    acts = m.receive_state(2.0, "a", 5, full(1.0))
    assert only(acts, CaughtUp).round == 5


def test_start_with_peer_known_ahead_begins_with_catch_up() -> None:
    m = machine()
    m.observe_peer_round(0.0, "a", 3)
    m.observe_peer_round(0.0, "b", 1)
    acts = m.start(0.0, ["a", "b"])
    assert acts == [RequestState(("a", "b"))]
    assert m.phase is Phase.CATCHING_UP
    assert m.receive_state(1.0, "a", 3, full(2.0)) == []
    acts = m.receive_state(1.0, "b", 2, full(4.0))
    assert kinds(acts) == [CaughtUp, Train]
    assert only(acts, Train).round == 2  # lower median of 2 and 3
    np.testing.assert_array_equal(only(acts, Train).params, full(3.0))


def test_future_update_two_rounds_ahead_triggers_catch_up() -> None:
    m = collecting(catch_up_lag=2, max_rounds_ahead=2)
    acts = m.receive_update(1.0, "a", 2, full(1.0), 1)
    assert acts == [RequestState(("a",))]
    assert m.phase is Phase.CATCHING_UP
    acts = m.receive_state(2.0, "a", 2, full(6.0))
    assert only(acts, Train).round == 2
    # the buffered round-2 update from a counts in round 2
    assert m.received_this_round == ("a",)


def test_update_too_far_ahead_still_triggers_catch_up() -> None:
    m = collecting(catch_up_lag=2, max_rounds_ahead=2)
    acts = m.receive_update(1.0, "a", 3, full(1.0), 1)
    assert acts == [RequestState(("a",))]  # kept (newest far round) and catching up


def test_catch_up_to_target_round_finishes() -> None:
    m, _ = ahead_machine({"a": 50}, target_rounds=10)
    acts = m.receive_state(2.0, "a", 50, full(1.0))
    assert kinds(acts) == [CaughtUp, Finished]
    assert m.phase is Phase.DONE


def test_peer_lost_during_catch_up() -> None:
    m, req = ahead_machine({"a": 5, "b": 6})
    assert req.to == ("b", "a")
    m.receive_state(2.0, "a", 5, full(1.0))
    acts = m.peer_lost(3.0, "b")
    caught = only(acts, CaughtUp)
    assert caught.sources == ("a",) and caught.round == 5
    # everyone asked is gone and nobody answered -> resume where we were
    m2, _ = ahead_machine({"a": 5})
    acts = m2.peer_lost(3.0, "a")
    assert kinds(acts) == [Train] and only(acts, Train).round == 0


def test_catch_up_at_end_of_round() -> None:
    """A peer far ahead seen while collecting is acted on."""
    m = collecting(peers=["a"])
    acts = m.observe_peer_round(1.0, "z", 4)
    assert acts == [RequestState(("z",))]
    # a round-0 update arriving meanwhile does not aggregate
    assert m.receive_update(1.5, "a", 0, full(1.0), 1) == []
    assert m.phase is Phase.CATCHING_UP


# ---- property: random interleavings ---------------------------------------------------

N_PEERS = 5
_update = st.tuples(
    st.just("update"),
    st.integers(0, N_PEERS - 1),
    st.sampled_from([-1, 0, 0, 0, 0, 1, 1, 2, 3]),  # round offset, mostly current
    st.booleans(),  # send it twice
    st.integers(-2, 2),  # value
    st.integers(0, 3),  # samples
)
_op = st.one_of(
    _update,
    _update,
    _update,
    st.tuples(st.just("train")),
    st.tuples(st.just("train")),
    st.tuples(st.just("tick"), st.floats(0.0, 6.0)),
    st.tuples(st.just("state"), st.integers(0, N_PEERS - 1), st.integers(-1, 4)),
    st.tuples(st.just("lost"), st.integers(0, N_PEERS - 1)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, max_size=60),
    quorum=st.sampled_from([0.0, 0.5, 1.0]),
    neighbours=st.sampled_from([None, 2]),
)
def test_random_interleavings(
    ops: list[tuple[Any, ...]], quorum: float, neighbours: int | None
) -> None:
    peers = [f"p{i}" for i in range(N_PEERS)]
    m = machine(
        target_rounds=0,
        quorum=quorum,
        neighbour_count=neighbours,
        round_timeout=10.0,
        catch_up_timeout=5.0,
    )
    now = 0.0
    pending_train: int | None = None
    accepted: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    last_agg = -1
    last_round = m.round
    last_train = -1
    own: dict[int, tuple[np.ndarray, int]] = {}

    def handle(acts: list[Action]) -> None:
        nonlocal pending_train, last_agg, last_train
        for a in acts:
            if isinstance(a, Train):
                assert a.round >= last_train
                last_train = a.round
                pending_train = a.round
            elif isinstance(a, Aggregated):
                assert a.round > last_agg
                last_agg = a.round
                assert len(set(a.senders)) == len(a.senders)
                assert all((s, a.round) in accepted for s in a.senders)
                mine = own[a.round]
                ups = [mine[0]] + [accepted[(s, a.round)][0] for s in a.senders]
                ws = np.array([mine[1]] + [accepted[(s, a.round)][1] for s in a.senders])
                want = mean(np.stack(ups), ws, mine[0])
                np.testing.assert_allclose(a.params, want, rtol=1e-6, atol=1e-6)

    handle(m.start(now, peers))
    for op in ops:
        if op[0] == "update":
            _, i, off, twice, value, samples = op
            r = m.round + off
            for k in range(2 if twice else 1):
                x = full(float(value + 10 * k))
                acts = m.receive_update(now, peers[i], r, x, samples)
                rejected = [a for a in acts if isinstance(a, Rejected)]
                if not rejected:
                    assert (peers[i], r) not in accepted  # never accepted twice
                    accepted[(peers[i], r)] = (x, samples)
                else:
                    assert rejected[0].reason in {"stale", "duplicate", "too_far_ahead"}
                handle(acts)
        elif op[0] == "train":
            if pending_train is not None:
                r, pending_train = pending_train, None
                x = full(float(r))
                own[r] = (x, 1)
                handle(m.trained(now, r, x, 1, peers))
        elif op[0] == "tick":
            now += op[1]
            handle(m.tick(now))
        elif op[0] == "state":
            _, i, off = op
            handle(m.receive_state(now, peers[i], m.round + off, full(float(off))))
        elif op[0] == "lost":
            handle(m.peer_lost(now, peers[op[1]]))
        assert m.round >= last_round
        last_round = m.round
        assert m.phase in {Phase.TRAINING, Phase.COLLECTING, Phase.CATCHING_UP}


def test_nudges_ask_silent_neighbours_then_back_off_and_never_spin() -> None:
    m = machine(nudge_fraction=0.2, round_timeout=10.0)
    m.start(0.0, list(PEERS))
    m.trained(0.0, 0, full(1.0), 1, list(PEERS))
    m.receive_update(0.5, PEERS[0], 0, full(2.0), 1)
    assert m.next_wakeup == 2.0  # 0.2 x 10 s
    acts = m.tick(2.0)
    assert acts == [RequestUpdates(0, tuple(sorted(PEERS[1:])))]
    # The gap doubles (2 s -> 4 s) but is capped at a quarter of the timeout (2.5 s),
    # so a lossy link gets several tries per round.
    assert m.next_wakeup == 4.5
    # A neighbour seen in a later round is asked at once, and only once.
    assert m.observe_peer_round(3.0, PEERS[1], 1) == [RequestUpdates(0, (PEERS[1],))]
    assert m.observe_peer_round(3.5, PEERS[1], 1) == []
    # Catching up while collecting: no nudge may stay due (the node's timer would spin).
    m.observe_peer_round(4.0, PEERS[2], 5)
    assert m.phase is Phase.CATCHING_UP
    wake = m.next_wakeup
    assert wake is not None and wake > 4.0
    m.tick(wake)
    assert m.next_wakeup is None or m.next_wakeup > wake


def test_most_updates_in_asks_for_the_rest_early() -> None:
    m = machine(nudge_fraction=0.2, round_timeout=10.0)
    m.start(0.0, list(PEERS))
    m.trained(1.0, 0, full(1.0), 1, list(PEERS))
    assert m.next_wakeup == 3.0  # 0.2 x 10 s after collecting began
    m.receive_update(1.2, "a", 0, full(2.0), 1)
    assert m.next_wakeup == 3.0  # one of three: no majority yet
    m.receive_update(1.3, "b", 0, full(2.0), 1)
    # Two of three took 0.3 s: the third is asked for 0.3 s later, not at 3.0.
    assert m.next_wakeup == pytest.approx(1.6)
    assert m.tick(1.6) == [RequestUpdates(0, ("c",))]
    # Then the gap doubles, up to a quarter of the (10 s) timeout.
    last, gaps = 1.6, []
    for _ in range(5):
        wake = m.next_wakeup
        assert wake is not None
        gaps.append(wake - last)
        assert m.tick(wake) == [RequestUpdates(0, ("c",))]
        last = wake
    assert gaps == pytest.approx([0.6, 1.2, 2.4, 2.5, 2.5])
    # Updates that were already in when training ended: ask after MIN_NUDGE_GAP.
    m2 = machine(nudge_fraction=0.2, round_timeout=10.0)
    m2.start(0.0, list(PEERS))
    m2.receive_update(0.5, "a", 0, full(2.0), 1)
    m2.receive_update(0.5, "b", 0, full(2.0), 1)
    m2.trained(1.0, 0, full(1.0), 1, list(PEERS))
    assert m2.next_wakeup == pytest.approx(1.0 + MIN_NUDGE_GAP)


def _fast_history(m: RoundMachine, rounds: int = 3) -> float:
    """Run `rounds` quick rounds (every update 0.1 s after training) so the adaptive
    timeout settles at its minimum; returns the time the last one ended."""
    now = 0.0
    m.start(now, list(PEERS))
    for r in range(rounds):
        m.trained(now, r, full(1.0), 1, list(PEERS))
        for p in PEERS:
            m.receive_update(now + 0.1, p, r, full(1.0), 1)
        now += 1.0
    assert m.round == rounds and m.phase is Phase.TRAINING
    return now


def test_adaptive_timeout_keeps_waiting_for_a_neighbour_that_is_merely_behind() -> None:
    m = machine(round_timeout=10.0, min_round_timeout=2.0, nudge_fraction=None)
    t = _fast_history(m)
    m.trained(t, 3, full(1.0), 1, list(PEERS))
    m.receive_update(t + 0.1, "a", 3, full(1.0), 1)
    m.receive_update(t + 0.1, "b", 3, full(1.0), 1)
    m.observe_peer_round(t + 0.5, "c", 2)  # c is alive, still finishing round 2
    assert m.deadline == t + 2.0  # the adaptive timeout
    assert m.tick(t + 2.0) == []  # c is behind, not lost: wait on
    assert m.deadline == t + 4.0
    # Once c answers no pings any more, the adaptive timeout applies again.
    m.unresponsive = frozenset({"c"})
    agg = only(m.tick(t + 4.0), Aggregated)
    assert agg.timed_out and agg.senders == ("a", "b")


def test_waiting_for_a_neighbour_behind_stops_at_the_round_timeout() -> None:
    m = machine(round_timeout=10.0, min_round_timeout=2.0, nudge_fraction=None)
    t = _fast_history(m)
    m.trained(t, 3, full(1.0), 1, list(PEERS))
    m.observe_peer_round(t, "c", 2)
    for p in ("a", "b"):
        m.receive_update(t + 0.1, p, 3, full(1.0), 1)
    for step in (2.0, 4.0, 6.0, 8.0):
        assert m.tick(t + step) == []
    assert m.deadline == t + 10.0  # capped at the configured round timeout
    assert only(m.tick(t + 10.0), Aggregated).timed_out
    # A neighbour in our own round whose update is missing is not waited for longer.
    m2 = machine(round_timeout=10.0, min_round_timeout=2.0, nudge_fraction=None)
    t = _fast_history(m2)
    m2.trained(t, 3, full(1.0), 1, list(PEERS))
    for p in ("a", "b"):
        m2.receive_update(t + 0.1, p, 3, full(1.0), 1)
    m2.observe_peer_round(t, "c", 3)  # in our round: its update is late or lost
    assert only(m2.tick(t + 2.0), Aggregated).timed_out


def test_distinct_inputs_count_a_model_forwarded_by_several_neighbours_once() -> None:
    """Secure aggregation v2: every member of a group forwards the same group mean; it
    must weigh in once, not once per neighbour in that group."""
    for distinct, expected in ((True, 4.0), (False, 3.75)):
        m = machine(params=vec(0, 0, 0, 0), round_timeout=5.0, distinct_inputs=distinct)
        m.start(0.0, PEERS)
        m.trained(0.0, 0, vec(0, 0, 0, 0), 1, PEERS)
        m.receive_update(1.0, "a", 0, vec(3, 3, 3, 3), 1)  # group mean G1, via a
        m.receive_update(1.0, "b", 0, vec(3, 3, 3, 3), 1)  # the same G1, via b
        acts = m.receive_update(1.0, "c", 0, vec(9, 9, 9, 9), 1)  # G2, via c
        agg = only(acts, Aggregated)
        # distinct: own 0, G1 3, G2 9 -> 4; otherwise G1 twice -> (0 + 3 + 3 + 9) / 4
        np.testing.assert_array_equal(agg.params, vec(expected, expected, expected, expected))
        assert agg.senders == ("a", "b", "c")  # everyone who sent is still credited


def test_a_neighbour_that_abstains_is_not_waited_for() -> None:
    """Secure aggregation v2: a neighbour in no group says it sends nothing this round;
    the round ends on the others' models instead of at the timeout, also when the
    notice arrives before our own training ends, and even when everyone abstains."""
    m = machine(params=vec(0, 0, 0, 0), round_timeout=30.0)
    m.start(0.0, PEERS)
    assert m.receive_abstain(0.5, "a", 0) == []  # still training: kept for the round
    m.trained(1.0, 0, vec(0, 0, 0, 0), 1, PEERS)
    assert m.expected_this_round == len(PEERS) - 1
    m.receive_update(1.5, "b", 0, vec(2, 2, 2, 2), 1)
    agg = only(m.receive_abstain(2.0, "c", 0), Aggregated)
    assert agg.senders == ("b",) and not agg.timed_out
    np.testing.assert_array_equal(agg.params, vec(1, 1, 1, 1))

    alone = machine(params=vec(0, 0, 0, 0), round_timeout=30.0)
    alone.start(0.0, PEERS)
    alone.trained(1.0, 0, vec(5, 5, 5, 5), 1, PEERS)
    alone.receive_abstain(1.1, "a", 0)
    alone.receive_abstain(1.2, "b", 0)
    agg = only(alone.receive_abstain(1.3, "c", 0), Aggregated)
    assert agg.senders == () and not agg.timed_out
    # Abstaining for a far-off or past round changes nothing.
    assert alone.receive_abstain(2.0, "a", 99) == []
    assert alone.receive_abstain(2.0, "a", 0) == []
