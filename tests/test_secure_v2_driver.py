"""A node's secure-aggregation v2 driver: rounds, routing, held-back messages, refusals."""

from __future__ import annotations

import numpy as np
from test_secure_v2_round import _tol

from p2pfl.identity import Identity
from p2pfl.secure.group_driver import ROUND_WINDOW, GroupDriver
from p2pfl.secure.group_leader import LeaderSettings
from p2pfl.secure.group_member import MemberPolicy
from p2pfl.secure.group_messages import GroupJoin, GroupSend

FED = "fed"
DIM = 64


def _drivers(n: int) -> dict[str, GroupDriver]:
    ids = [Identity.from_seed(bytes([120 + i]) * 32) for i in range(n)]
    return {
        i.peer_id: GroupDriver(
            i, LeaderSettings(FED, group_size=8), MemberPolicy(FED, dim=DIM), DIM
        )
        for i in ids
    }


def _keys(drivers: dict[str, GroupDriver], me: str) -> dict[str, bytes]:
    return {p: d.identity.public_bytes for p, d in drivers.items() if p != me}


def _deliver(drivers: dict[str, GroupDriver], sender: str, sends: list[GroupSend]) -> None:
    queue = [(sender, s) for s in sends]
    while queue:
        frm, s = queue.pop(0)
        for to in s.to:
            queue += [(to, o) for o in drivers[to].on_message(frm, s.message, 0.0)]


def test_a_round_completes_when_nodes_start_it_at_different_times() -> None:
    drivers = _drivers(4)
    peers = sorted(drivers)
    late = peers[0]
    rng = np.random.default_rng(3)
    updates = {p: rng.normal(0, 1, DIM).astype(np.float32) for p in peers}
    # Three nodes start round 0; the fourth still finishes its previous round.
    for p in peers[1:]:
        _deliver(drivers, p, drivers[p].start_round(0, _keys(drivers, p), 0.0))
    assert drivers[late]._held[0], "their declarations wait for our round"
    _deliver(drivers, late, drivers[late].start_round(0, _keys(drivers, late), 0.0))
    for p in peers:
        _deliver(drivers, p, drivers[p].contribute(0, updates[p], 0.0))
    means = [drivers[p].mean(0) for p in peers]
    assert all(m is not None for m in means)
    first = means[0]
    assert first is not None and set(first.members) == set(peers)
    assert all(m is not None and np.array_equal(m.mean, first.mean) for m in means)
    expected = np.mean(list(updates.values()), axis=0)
    assert np.max(np.abs(first.mean - expected)) <= _tol(4)
    assert all(not d.refused for d in drivers.values())
    # Exactly one node led the group (everyone chose the same leader on a mesh).
    assert sum(bool(drivers[p].led_results(0)) for p in peers) == 1


def test_messages_far_ahead_or_for_forgotten_rounds_are_refused_and_counted() -> None:
    drivers = _drivers(3)
    me, other = sorted(drivers)[:2]
    d = drivers[me]
    d.start_round(5, _keys(drivers, me), 0.0)
    assert d.on_message(other, GroupJoin(other, 5 + ROUND_WINDOW + 1, other), 0.0) == []
    assert d.refused["round_too_far_ahead"] == 1
    assert d.on_message(other, GroupJoin(other, 6, other), 0.0) == []  # held
    assert len(d._held[6]) == 1
    d.start_round(7, _keys(drivers, me), 0.0)
    assert 6 not in d._held and 5 not in d.members  # only the previous round is kept
    assert d.on_message(other, GroupJoin(other, 3, other), 0.0) == []
    assert d.refused["round_gone"] == 1


def test_a_silent_member_is_left_out_at_the_leaders_deadline() -> None:
    drivers = _drivers(5)
    peers = sorted(drivers)
    rng = np.random.default_rng(4)
    updates = {p: rng.normal(0, 1, DIM).astype(np.float32) for p in peers}
    for p in peers:
        _deliver(drivers, p, drivers[p].start_round(0, _keys(drivers, p), 0.0))
    leader = next(p for p in peers if drivers[p].leaders[0].groups)
    silent = next(p for p in peers if p != leader)  # crashed while training
    for p in peers:
        if p != silent:
            _deliver(drivers, p, drivers[p].contribute(0, updates[p], 0.0))
    assert drivers[leader].mean(0) is None  # waiting for the silent one
    deadline = drivers[leader].next_deadline()
    assert deadline is not None
    for t in (deadline, deadline + 10.0, deadline + 20.0):
        for p in peers:
            _deliver(drivers, p, drivers[p].on_timeout(t))
    mean = drivers[leader].mean(0)
    assert mean is not None and silent not in mean.members and len(mean.members) == 4
    expected = np.mean([u for p, u in updates.items() if p != silent], axis=0)
    assert np.max(np.abs(mean.mean - expected)) <= _tol(5)
