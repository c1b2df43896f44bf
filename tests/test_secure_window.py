"""A member's secure-session table is bounded per aggregator and by a round window.

Issue 12, reproduction 5: one neighbour announcing far-future rounds filled a member's
256-entry session table, after which honest aggregators were refused
(`too_many_sessions`) until the node restarted.
"""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.secure.messages import GroupAnnounce
from p2pfl.secure.protocol import ROUND_WINDOW, AggregatorRound, Refused, SecureSettings
from p2pfl.secure.simulate import SimNode, make_nodes

FED = "fed"


@pytest.fixture(scope="module")
def nodes() -> list[SimNode]:
    return make_nodes(6, FED)


def _announce(aggregator: SimNode, members: list[SimNode], round: int) -> GroupAnnounce:
    agg = AggregatorRound(
        SecureSettings(FED, group_size=4),
        aggregator=aggregator.peer_id,
        round=round,
        dim=8,
        keys={m.peer_id: m.key.announcement for m in members},
    )
    (send,) = agg.start(0.0)
    assert isinstance(send.message, GroupAnnounce)
    return send.message


def _refusal(member: SimNode, sender: SimNode, msg: GroupAnnounce) -> str | None:
    try:
        member.member.on_message(sender.peer_id, msg)
    except Refused as exc:
        return exc.reason
    return None


def test_a_flood_of_future_rounds_does_not_lock_out_honest_aggregators(
    nodes: list[SimNode],
) -> None:
    hostile, victim, *others = nodes
    honest = others.pop()
    group = [victim, *others]
    reasons = [_refusal(victim, hostile, _announce(hostile, group, r)) for r in range(1, 300)]
    accepted = [r for r, why in zip(range(1, 300), reasons, strict=True) if why is None]
    # Only the rounds inside the window around our round 0 are taken ...
    assert accepted == list(range(1, ROUND_WINDOW + 1))
    assert set(reasons) == {None, "round_outside_window"}
    # ... and an honest neighbour's announcement for our round is still answered.
    assert _refusal(victim, honest, _announce(honest, group, 1)) is None
    answers = victim.member.set_update(1, np.zeros(8, np.float32))
    assert (honest.peer_id,) in [a.to for a in answers]


def test_sessions_per_aggregator_are_capped_inside_the_window(nodes: list[SimNode]) -> None:
    hostile, victim, *others = nodes
    victim.member.advance(10)
    group = [victim, *others[:2]]
    window = range(9, 10 + ROUND_WINDOW + 1)
    reasons = [_refusal(victim, hostile, _announce(hostile, group, r)) for r in window]
    assert reasons.count(None) == victim.member.per_aggregator
    assert reasons.count("too_many_sessions") == len(window) - victim.member.per_aggregator
    # Moving on frees the old rounds' sessions; rounds behind the window are refused.
    victim.member.advance(13)
    assert _refusal(victim, hostile, _announce(hostile, group, 11)) == "round_outside_window"
    assert _refusal(victim, hostile, _announce(hostile, group, 14)) is None
