"""What a node keeps of neighbours' secure messages for rounds it has not started yet is
bounded: a window of rounds, a number of messages per sender and per round (`GroupDriver`).

Issue 12, reproduction 5 (found against v1): one neighbour announcing far-future rounds
filled a member's 256-entry session table, after which honest aggregators were refused
until the node restarted. Under v2 the same flood must neither grow memory nor keep
the honest neighbours' round from completing.
"""

from __future__ import annotations

import numpy as np
from test_secure_v2_driver import DIM, _deliver, _drivers, _keys
from test_secure_v2_round import _tol

from p2pfl.secure.group_driver import HELD_PER_ROUND, HELD_PER_SENDER, ROUND_WINDOW, GroupDriver
from p2pfl.secure.group_messages import GroupJoin


def _flood(d: GroupDriver, hostile: str, rounds: range, per_round: int) -> None:
    for r in rounds:
        for _ in range(per_round):
            assert d.on_message(hostile, GroupJoin(hostile, r, hostile), 0.0) == []


def test_a_flood_of_future_rounds_is_bounded_and_our_round_still_completes() -> None:
    drivers = _drivers(4)
    victim, hostile, *honest = sorted(drivers)
    d = drivers[victim]
    for p in [victim, *honest]:
        _deliver(drivers, p, drivers[p].start_round(0, _keys(drivers, p), 0.0))
    _flood(d, hostile, range(1, 300), 2 * HELD_PER_ROUND)
    # Only the window's rounds are held, each up to the sender's cap; the rest is counted.
    assert sorted(d._held) == list(range(1, ROUND_WINDOW + 1))
    assert all(len(v) == HELD_PER_SENDER for v in d._held.values())
    assert d.refused["round_too_far_ahead"] == (299 - ROUND_WINDOW) * 2 * HELD_PER_ROUND
    assert d.refused["too_many_held"] == ROUND_WINDOW * (2 * HELD_PER_ROUND - HELD_PER_SENDER)
    # The round in progress is not disturbed: the three honest nodes (the hostile one
    # never declared; the leader offers at its join timeout) get their exact mean.
    rng = np.random.default_rng(8)
    updates = {p: rng.normal(0, 1, DIM).astype(np.float32) for p in [victim, *honest]}
    for p in updates:
        _deliver(drivers, p, drivers[p].on_timeout(10.0))
        _deliver(drivers, p, drivers[p].contribute(0, updates[p], 10.0))
    mean = d.mean(0)
    assert mean is not None and set(mean.members) == set(updates)
    assert np.max(np.abs(mean.mean - np.mean(list(updates.values()), axis=0))) <= _tol(3)
    # Starting the next round replays what was held for it (refused now, one by one)
    # and frees it; nothing stays behind for rounds we have passed.
    d.start_round(1, _keys(drivers, victim), 20.0)
    assert 1 not in d._held and sorted(d._held) == list(range(2, ROUND_WINDOW + 1))


def test_one_neighbour_cannot_crowd_out_the_others_held_declarations() -> None:
    drivers = _drivers(4)
    victim, hostile, *honest = sorted(drivers)
    d = drivers[victim]
    for p in drivers:
        drivers[p].start_round(0, _keys(drivers, p), 0.0)
    _flood(d, hostile, range(1, 2), HELD_PER_ROUND)
    # The honest neighbours move to round 1 first; their declarations wait for ours.
    for p in honest:
        for send in drivers[p].start_round(1, _keys(drivers, p), 0.0):
            if victim in send.to:
                d.on_message(p, send.message, 0.0)
    held = [sender for sender, _ in d._held[1]]
    assert set(honest) <= set(held), d.refused
