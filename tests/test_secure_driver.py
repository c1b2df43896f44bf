"""SecureDriver: one node's aggregator and member sides, routed by hand (no sockets)."""

from __future__ import annotations

import numpy as np

from p2pfl.identity import Identity
from p2pfl.secure.driver import SecureDriver
from p2pfl.secure.messages import MaskedUpdate
from p2pfl.secure.protocol import SecureSettings, Send

FED = "fed"
D = 64


def _drivers(n: int) -> list[SecureDriver]:
    settings = SecureSettings(FED, group_size=4, clip=4.0)
    drivers = [SecureDriver(Identity.generate(), settings, D) for _ in range(n)]
    for a in drivers:  # everyone has everyone's key, as after the sa_key exchange
        for b in drivers:
            if a is not b:
                assert a.on_message(b.peer_id, b.key_message(0), 0.0) == []
    return drivers


def _deliver(drivers: list[SecureDriver], sender: SecureDriver, sends: list[Send]) -> int:
    """Deliver `sends` and everything they trigger; returns how many masked vectors flew."""
    by_id = {d.peer_id: d for d in drivers}
    queue = [(sender, s) for s in sends]
    masked = 0
    while queue:
        src, send = queue.pop(0)
        masked += isinstance(send.message, MaskedUpdate) * len(send.to)
        for peer in send.to:
            dst = by_id[peer]
            queue += [(dst, s) for s in dst.on_message(src.peer_id, send.message, 1.0)]
    return masked


def test_groups_announced_before_training_ends_are_masked_ahead_and_answered_on_contribute() -> (
    None
):
    drivers = _drivers(5)
    agg, members = drivers[0], drivers[1:]
    rng = np.random.default_rng(0)
    updates = {m.peer_id: rng.uniform(-1, 1, D).astype(np.float32) for m in members}

    # Our training starts: the groups go out while the neighbours still train.
    sends = agg.announce(1, [m.peer_id for m in members], now=0.0)
    assert _deliver(drivers, agg, sends) == 0  # nobody has an update to mask yet
    for m in members:
        held = [s for s in m.member._sessions.values() if s.round == 1]
        assert len(held) == 1 and held[0].premask is not None  # mask computed ahead
    assert agg.take_result(1) is None

    # Each neighbour finishes training: contributing answers the waiting announcement.
    masked = 0
    for m in members:
        masked += _deliver(drivers, m, m.contribute(1, updates[m.peer_id]))
    assert masked == len(members)

    assert agg.take_result(0) is None  # another round's result is not handed out
    result = agg.take_result(1)
    assert result is not None and result.round == 1
    assert agg.take_result(1) is None  # once
    for group, mean in zip(result.groups, result.means, strict=True):
        expected = np.mean([updates[p] for p in group], axis=0)
        np.testing.assert_allclose(mean, expected, atol=1e-5)


def test_a_result_nobody_took_is_dropped_when_a_later_round_is_announced() -> None:
    drivers = _drivers(4)
    agg, members = drivers[0], drivers[1:]
    _deliver(drivers, agg, agg.announce(1, [m.peer_id for m in members], now=0.0))
    for m in members:
        _deliver(drivers, m, m.contribute(1, np.zeros(D, np.float32)))
    # We caught up past round 1 before collecting it: its means must not leak into 3.
    agg.announce(3, [m.peer_id for m in members], now=2.0)
    assert agg.take_result(1) is None
    assert agg.take_result(3) is None


def test_masks_computed_ahead_stay_within_the_memory_budget() -> None:
    drivers = _drivers(6)
    member = drivers[5]
    member.member.premask_budget = 2 * 4 * D  # room for two aggregators' masks
    others = [d.peer_id for d in drivers]
    for agg in drivers[:5]:
        neighbours = [p for p in others if p != agg.peer_id]
        for send in agg.announce(1, neighbours, now=0.0):
            if member.peer_id in send.to:
                member.on_message(agg.peer_id, send.message, 0.5)
    held = [s for s in member.member._sessions.values() if s.premask is not None]
    assert len(member.member._sessions) == 5 and len(held) == 2
    # The rest are masked on demand when the update is ready: every group is answered.
    sends = member.contribute(1, np.zeros(D, np.float32))
    assert len(sends) == 5
    assert (member.member.masked_ahead, member.member.masked_on_demand) == (2, 3)
    status = member.status()
    assert (status["masked_ahead"], status["masked_on_demand"]) == (2, 3)
    assert status["groups_formed"] == 0  # it aggregated nothing itself
