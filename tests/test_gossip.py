"""The asynchronous mode's machine (sans-IO): no barrier, staleness-weighted mixing."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.aggregation import make_rule, mean
from p2pfl.protocol import (
    Aggregate,
    Aggregated,
    Broadcast,
    Finished,
    GossipMachine,
    GossipSettings,
    Phase,
    Rejected,
    RequestState,
    Train,
)

D = 4
PEERS = ["b", "c", "d"]


def vec(x: float) -> np.ndarray:
    return np.full(D, x, dtype=np.float32)


def machine(**settings: object) -> GossipMachine:
    """Mixing at once after each step unless a test asks for waiting (min_inputs)."""
    settings.setdefault("min_inputs", 0)
    settings.setdefault("grace", 0.0)
    return GossipMachine(
        params=vec(0.0),
        rule=mean,
        settings=GossipSettings(**settings),  # type: ignore[arg-type]
        node_id="a",
    )


def step(m: GossipMachine, value: float, samples: int = 10) -> list[object]:
    """Finish the local step in progress with a model of all `value`."""
    return list(m.trained(0.0, m.round, vec(value), samples, PEERS))


def test_a_step_sends_mixes_and_trains_again_without_waiting() -> None:
    m = machine()
    (train,) = m.start(0.0, PEERS)
    assert isinstance(train, Train) and train.round == 0
    actions = step(m, 1.0)
    kinds = [type(a) for a in actions]
    assert kinds == [Broadcast, Aggregated, Train]
    broadcast, done, again = actions
    assert isinstance(broadcast, Broadcast) and broadcast.to == tuple(PEERS)
    assert isinstance(done, Aggregated) and done.senders == ()  # nothing arrived: alone
    np.testing.assert_array_equal(m.params, vec(1.0))
    assert isinstance(again, Train) and again.round == 1
    assert m.next_wakeup is None  # nothing is ever waited for


def test_inputs_weigh_samples_times_the_staleness_discount() -> None:
    m = machine(staleness_exponent=0.5)
    m.start(0.0, PEERS)
    for _ in range(3):
        step(m, 0.0)
    assert m.round == 3
    # b is as fresh as we are; c lags 3 versions: (1 + 3) ** -0.5 = 1/2 of its samples.
    assert m.receive_update(0.0, "b", 3, vec(4.0), 10) == []
    assert m.receive_update(0.0, "c", 0, vec(8.0), 20) == []
    actions = step(m, 1.0, samples=10)
    done = next(a for a in actions if isinstance(a, Aggregated))
    assert done.senders == ("b", "c") and done.inputs == ("a", "b", "c")
    want = (10 * 1.0 + 10 * 4.0 + 20 * 0.5 * 8.0) / (10 + 10 + 10)
    np.testing.assert_allclose(m.params, vec(want), rtol=1e-6)
    # Exponent 0 is the plain sample-weighted mean (FedAvg over what arrived).
    m0 = machine(staleness_exponent=0.0)
    m0.start(0.0, PEERS)
    m0.receive_update(0.0, "c", 0, vec(8.0), 20)
    step(m0, 1.0, samples=10)
    np.testing.assert_allclose(m0.params, vec((10 + 160) / 30), rtol=1e-6)


def test_each_neighbour_model_is_mixed_once_and_the_newest_replaces_older() -> None:
    m = machine()
    m.start(0.0, PEERS)
    m.receive_update(0.0, "b", 0, vec(2.0), 10)
    m.receive_update(0.0, "b", 1, vec(6.0), 10)  # newer: replaces the first
    step(m, 0.0)
    np.testing.assert_allclose(m.params, vec(3.0))  # (0 + 6) / 2 (version 1 is ahead)
    actions = step(m, 3.0)  # nothing new arrived: our step alone
    done = next(a for a in actions if isinstance(a, Aggregated))
    assert done.senders == ()
    np.testing.assert_allclose(m.params, vec(3.0))


def test_old_duplicate_too_stale_and_malformed_inputs_are_rejected() -> None:
    m = machine(max_staleness=2)
    m.start(0.0, PEERS)
    for _ in range(5):
        step(m, 0.0)
    assert m.receive_update(0.0, "b", 4, vec(1.0), 1) == []
    reasons = {
        "older": m.receive_update(0.0, "b", 3, vec(1.0), 1),
        "same": m.receive_update(0.0, "b", 4, vec(1.0), 1),
        "lagging": m.receive_update(0.0, "c", 2, vec(1.0), 1),
        "shape": m.receive_update(0.0, "d", 5, np.zeros(D + 1, np.float32), 1),
        "dtype": m.receive_update(0.0, "d", 5, np.zeros(D, np.float64), 1),
        "samples": m.receive_update(0.0, "d", 5, vec(1.0), -1),
        "nan": m.receive_update(0.0, "d", 5, vec(np.nan), 1),
    }
    got = {
        k: [(r.peer, r.reason) for r in v if isinstance(r, Rejected)] for k, v in reasons.items()
    }
    assert got == {
        "older": [("b", "duplicate")],
        "same": [("b", "duplicate")],
        "lagging": [("c", "stale")],
        "shape": [("d", "bad_shape")],
        "dtype": [("d", "bad_shape")],
        "samples": [("d", "bad_samples")],
        "nan": [("d", "non_finite")],
    }
    done = next(a for a in step(m, 0.0) if isinstance(a, Aggregated))
    assert done.senders == ("b",)  # only the valid one is mixed
    assert [r for _, r in done.rejected] == [
        "duplicate", "duplicate", "stale", "bad_shape", "bad_shape", "bad_samples", "non_finite"
    ]  # fmt: skip


def test_an_input_that_went_stale_in_the_buffer_is_not_mixed() -> None:
    m = machine(max_staleness=1)
    m.start(0.0, PEERS)
    m.receive_update(0.0, "b", 0, vec(9.0), 10)
    m.round = 5  # as if we had jumped meanwhile (a deferred mix)
    m.phase = Phase.TRAINING
    done = next(a for a in step(m, 1.0) if isinstance(a, Aggregated))
    assert done.senders == ()


def test_a_slow_node_jumps_to_its_neighbours_version_and_a_liar_moves_nobody() -> None:
    slow = machine(target_rounds=0)
    slow.start(0.0, PEERS)
    for peer in PEERS:
        slow.receive_update(0.0, peer, 40, vec(1.0), 10)
    step(slow, 0.0)
    assert slow.round == 41  # one more than the median of (0, 40, 40, 40)
    fast = machine(target_rounds=0)  # run forever
    fast.start(0.0, PEERS)
    for _ in range(10):
        step(fast, 0.0)
    fast.receive_update(0.0, "b", 10, vec(1.0), 10)
    fast.receive_update(0.0, "c", 9, vec(1.0), 10)
    fast.receive_update(0.0, "d", 10**12, vec(1.0), 10)  # claims to be far ahead
    step(fast, 0.0)
    assert fast.round == 11


def test_the_target_version_finishes_and_later_updates_are_stale() -> None:
    m = machine(target_rounds=3)
    m.start(0.0, PEERS)
    step(m, 0.0)
    step(m, 0.0)
    actions = step(m, 0.0)
    assert isinstance(actions[-1], Finished) and m.phase is Phase.DONE
    assert m.receive_update(0.0, "b", 5, vec(1.0), 1) == [Rejected("b", 5, "stale")]
    # Jumping past the target also ends it.
    j = machine(target_rounds=10)
    j.start(0.0, PEERS)
    j.receive_update(0.0, "b", 20, vec(1.0), 1)
    j.receive_update(0.0, "c", 20, vec(1.0), 1)
    assert isinstance(step(j, 0.0)[-1], Finished) and j.round == 21


def test_deferred_mixing_hands_out_the_rule_and_adopts_its_result() -> None:
    m = machine(defer_aggregation=True)
    m.start(0.0, PEERS)
    m.receive_update(0.0, "c", 0, vec(3.0), 10)
    actions = step(m, 1.0)
    assert [type(a) for a in actions] == [Broadcast, Aggregate]
    agg = actions[1]
    assert isinstance(agg, Aggregate) and m.phase is Phase.AGGREGATING
    m.receive_update(0.0, "b", 0, vec(7.0), 10)  # arrives meanwhile: kept for the next
    assert m.aggregated(0.0, 99, vec(5.0)) == []  # not this step's
    out = m.aggregated(0.0, agg.round, agg.run(mean))
    assert [type(a) for a in out] == [Aggregated, Train]
    np.testing.assert_allclose(m.params, vec(2.0))
    assert m.received_this_round == ("b",)


def test_a_non_finite_mix_keeps_our_own_step() -> None:
    def broken(x: np.ndarray, w: np.ndarray, own: np.ndarray) -> np.ndarray:
        return np.full_like(own, np.inf)

    m = GossipMachine(
        params=vec(0.0), rule=broken, node_id="a", settings=GossipSettings(min_inputs=0)
    )
    m.start(0.0, PEERS)
    actions = step(m, 2.0)
    assert Rejected("a", 0, "non_finite_aggregate") in actions
    np.testing.assert_array_equal(m.params, vec(2.0))


def test_a_robust_rule_mixes_over_the_buffer() -> None:
    m = GossipMachine(
        params=vec(0.0), rule=make_rule("median", f=1), node_id="a", settings=GossipSettings()
    )
    m.start(0.0, PEERS)
    m.receive_update(0.0, "b", 0, vec(1.1), 10)
    m.receive_update(0.0, "c", 0, vec(0.9), 10)
    m.receive_update(0.0, "d", 0, vec(-1000.0), 10)  # an attacker
    step(m, 1.0)
    assert abs(float(m.params[0]) - 1.0) < 0.11


def test_a_lost_peer_leaves_the_buffer_and_k_neighbours_are_drawn() -> None:
    m = machine(neighbour_count=2)
    m.start(0.0, PEERS)
    m.receive_update(0.0, "b", 0, vec(5.0), 10)
    m.peer_lost(0.0, "b")
    actions = step(m, 1.0)
    broadcast = actions[0]
    assert isinstance(broadcast, Broadcast) and len(broadcast.to) == 2
    assert set(broadcast.to) <= set(PEERS)
    np.testing.assert_array_equal(m.params, vec(1.0))
    # A peer that reconnects may start its versions again from a checkpoint.
    assert m.receive_update(0.0, "b", 0, vec(5.0), 10) == []


@pytest.mark.parametrize(
    "event",
    [
        lambda m: m.receive_abstain(0.0, "b", 3),
        lambda m: m.observe_peer_round(0.0, "b", 50),
        lambda m: m.receive_state(0.0, "b", 50, vec(1.0)),
        lambda m: m.tick(1e9),
    ],
)
def test_the_synchronous_rounds_events_do_nothing(event: object) -> None:
    m = machine()
    m.start(0.0, PEERS)
    assert event(m) == []  # type: ignore[operator]
    assert m.phase is Phase.TRAINING and m.round == 0


def test_a_step_waits_for_min_inputs_then_mixes_at_once() -> None:
    m = machine(min_inputs=2, max_wait=5.0)
    m.start(0.0, PEERS)
    actions = m.trained(10.0, 0, vec(1.0), 10, PEERS)
    assert [type(a) for a in actions] == [Broadcast]  # sent, now waiting
    assert m.phase is Phase.COLLECTING and m.next_wakeup == 15.0
    assert m.receive_update(11.0, "b", 0, vec(3.0), 10) == []
    assert m.tick(12.0) == []  # before the deadline: nothing
    out = m.receive_update(12.0, "c", 0, vec(5.0), 10)
    assert [type(a) for a in out] == [Aggregated, Train]
    np.testing.assert_allclose(m.params, vec(3.0))
    assert m.next_wakeup is None  # training: no deadline


def test_models_that_arrived_during_training_count_and_the_wait_is_bounded() -> None:
    m = machine(min_inputs=1, max_wait=5.0)
    m.start(0.0, PEERS)
    m.receive_update(0.0, "b", 0, vec(3.0), 10)  # arrived while we trained
    actions = m.trained(1.0, 0, vec(1.0), 10, PEERS)
    assert [type(a) for a in actions] == [Broadcast, Aggregated, Train]
    # Nothing arrives for the next step: after max_wait it mixes alone.
    assert [type(a) for a in m.trained(2.0, 1, vec(1.0), 10, PEERS)] == [Broadcast]
    out = m.tick(7.0)
    done = next(a for a in out if isinstance(a, Aggregated))
    assert done.senders == () and isinstance(out[-1], Train)


def test_with_nobody_to_send_to_a_step_waits_out_max_wait() -> None:
    m = machine(min_inputs=1, max_wait=5.0)
    m.start(0.0, [])
    assert [type(a) for a in m.trained(0.0, 0, vec(1.0), 10, [])] == [Broadcast]
    assert m.next_wakeup == 5.0
    # k neighbours fewer than min_inputs: all of them are enough.
    k = machine(min_inputs=5, neighbour_count=1)
    k.start(0.0, PEERS)
    k.receive_update(0.0, "b", 0, vec(1.0), 10)
    assert any(isinstance(a, Aggregated) for a in k.trained(0.0, 0, vec(1.0), 10, PEERS))


def test_finished_neighbours_are_not_waited_for_and_give_their_final_models() -> None:
    m = machine(min_inputs=1, target_rounds=10, max_wait=30.0)
    m.start(0.0, ["b", "c"])
    m.observe_peer_round(0.0, "b", 10)  # b is done; c still runs
    assert [type(a) for a in m.trained(1.0, 0, vec(1.0), 10, ["b", "c"])] == [Broadcast]
    # c finishes too: nobody will send a step, so both are asked for their final model.
    (ask,) = m.observe_peer_round(2.0, "c", 12)
    assert isinstance(ask, RequestState) and ask.to == ("b", "c")
    assert m.receive_state(2.0, "d", 12, vec(9.0)) == []  # not asked: ignored
    out = m.receive_state(2.1, "b", 10, vec(3.0))
    assert out == []  # c is still to answer
    out = m.receive_state(2.2, "c", 12, vec(5.0))
    assert [type(a) for a in out] == [Aggregated, Finished]
    np.testing.assert_allclose(m.params, vec(3.0))  # (1 + 3 + 5) / 3
    assert m.round == 11  # one more than the lower median of (0, 10, 12)


def test_a_bad_final_model_is_rejected_and_the_others_are_mixed() -> None:
    m = machine(min_inputs=1, target_rounds=10)
    m.start(0.0, ["b", "c"])
    m.observe_peer_round(0.0, "b", 10)
    m.observe_peer_round(0.0, "c", 10)
    (_, ask) = m.trained(1.0, 0, vec(1.0), 10, ["b", "c"])
    assert isinstance(ask, RequestState) and ask.to == ("b", "c")
    assert m.receive_state(2.0, "b", 10, np.zeros(D + 1, np.float32)) == [
        Rejected("b", 10, "bad_state")
    ]
    out = m.receive_state(2.1, "c", 10, vec(3.0))
    assert any(isinstance(a, Aggregated) for a in out)
    np.testing.assert_allclose(m.params, vec(2.0))


def test_a_lost_neighbour_is_not_waited_for() -> None:
    m = machine(min_inputs=2)
    m.start(0.0, ["b", "c"])
    m.receive_update(0.0, "b", 0, vec(3.0), 10)
    assert [type(a) for a in m.trained(1.0, 0, vec(1.0), 10, ["b", "c"])] == [Broadcast]
    out = m.peer_lost(2.0, "c")
    assert [type(a) for a in out] == [Aggregated, Train]


def test_peers_as_fast_as_we_are_are_waited_for_within_the_grace() -> None:
    m = machine(min_inputs=1, grace=0.5, max_wait=30.0)
    m.start(0.0, PEERS)
    assert m.trained(2.0, 0, vec(1.0), 10, PEERS)[1:] == []  # trained 2 s: grace 1 s
    assert m.next_wakeup == 3.0
    assert m.receive_update(2.5, "b", 0, vec(3.0), 10) == []  # one is enough, after 3.0
    assert m.tick(2.9) == []
    out = m.tick(3.0)  # c and d are stragglers: mix without them
    done = next(a for a in out if isinstance(a, Aggregated))
    assert done.senders == ("b",)
    # Next step (trained 1 s, grace 0.5 s): everyone is in early, so no waiting at all.
    m.receive_update(3.5, "c", 0, vec(3.0), 10)
    m.receive_update(3.6, "d", 0, vec(3.0), 10)
    m.trained(4.0, 1, vec(1.0), 10, PEERS)
    out = m.receive_update(4.1, "b", 1, vec(3.0), 10)
    assert [type(a) for a in out] == [Aggregated, Train]
    assert m.next_wakeup is None
