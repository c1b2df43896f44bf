"""One node's secure-aggregation v2 state across rounds (sans-IO): what the daemon drives.

Every node is a member each round and may lead groups; this class keeps one
`MemberRound` and one `LeaderRound` per live round, routes each message to the right
side, holds back messages for a round we have not started yet (neighbours run a round
ahead of us; their declarations arrive before our round starts), and counts refusals
instead of raising them. The node only moves the returned `GroupSend`s and the time.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np

from p2pfl.identity import Identity
from p2pfl.secure.errors import Refused
from p2pfl.secure.group_leader import LeaderRound, LeaderSettings
from p2pfl.secure.group_member import MemberPolicy, MemberRound
from p2pfl.secure.group_messages import (
    GroupJoin,
    GroupMean,
    GroupMessage,
    GroupSend,
    MaskedVector,
    Sealed,
    SetupDone,
    Unmasking,
)

log = logging.getLogger("p2pfl.secure")

TO_LEADER = (GroupJoin, SetupDone, Sealed, MaskedVector, Unmasking)
ROUND_WINDOW = 2  # rounds ahead of ours whose messages we keep until we get there
# Messages kept for a round we have not started: a neighbour legitimately sends at most
# a join and an offer before we get there, so a few per sender suffice, and one sender's
# burst cannot crowd out the others' declarations; the total bounds many senders.
HELD_PER_SENDER = 8
HELD_PER_ROUND = 1024


class GroupDriver:
    def __init__(
        self,
        identity: Identity,
        settings: LeaderSettings,
        policy: MemberPolicy,
        dim: int,
    ) -> None:
        self.identity = identity
        self.me = identity.peer_id
        self.settings = settings
        self.policy = policy
        self.dim = dim
        self.members: dict[int, MemberRound] = {}
        self.leaders: dict[int, LeaderRound] = {}
        self.round = -1  # the newest round we started
        self._held: dict[int, list[tuple[str, GroupMessage]]] = {}
        self.refused: Counter[str] = Counter()
        self.led: Counter[str] = Counter()  # groups we led, by how they ended

    # ---- rounds --------------------------------------------------------------------------

    def start_round(
        self, round: int, neighbours: Mapping[str, bytes], now: float
    ) -> list[GroupSend]:
        """Our round `round` begins: declare our leader, be ready to lead; replay what
        neighbours sent for this round before we got here. `neighbours`: our secure
        neighbours' identity keys (authenticated over our own channels)."""
        if round <= self.round:
            return []
        self.round = round
        for old in [r for r in self.members if r < round - 1]:
            del self.members[old]
        for old in [r for r in self.leaders if r < round - 1]:
            for g in self.leaders.pop(old).groups:
                self.led["completed" if g.phase == "done" else "failed"] += 1
        for old in [r for r in self._held if r < round]:
            del self._held[old]
        member = MemberRound(self.identity, self.policy, round, neighbours)
        self.members[round] = member
        self.leaders[round] = LeaderRound(self.settings, self.me, round, self.dim, now, neighbours)
        sends = self._route_all(member.join(), now)
        for sender, msg in self._held.pop(round, []):
            sends += self.on_message(sender, msg, now)
        return sends

    def contribute(self, round: int, update: np.ndarray, now: float) -> list[GroupSend]:
        member = self.members.get(round)
        if member is None:
            return []
        return self._guard(lambda: self._route_all(member.set_update(update), now))

    def mean(self, round: int) -> GroupMean | None:
        """Our group's mean for `round` once our group completed (to forward)."""
        member = self.members.get(round)
        return None if member is None else member.mean

    def led_results(self, round: int) -> list[tuple[tuple[str, ...], np.ndarray]]:
        leader = self.leaders.get(round)
        return [] if leader is None else leader.results()

    # ---- messages and time ---------------------------------------------------------------

    def on_message(self, sender: str, msg: GroupMessage, now: float) -> list[GroupSend]:
        """Route one checked message; refusals are counted and logged, never raised."""
        if msg.round > self.round:
            if msg.round > self.round + ROUND_WINDOW:
                self._refuse("round_too_far_ahead", sender)
                return []
            held = self._held.setdefault(msg.round, [])
            mine = sum(1 for s, _ in held if s == sender)
            if mine >= HELD_PER_SENDER or len(held) >= HELD_PER_ROUND:
                self._refuse("too_many_held", sender)
                return []
            held.append((sender, msg))
            return []
        if isinstance(msg, TO_LEADER):
            leader = self.leaders.get(msg.round)
            if leader is not None:
                return self._guard(
                    lambda: self._route_all(leader.on_message(sender, msg, now), now)
                )
        else:
            member = self.members.get(msg.round)
            if member is not None:
                return self._guard(lambda: self._route_all(member.on_message(sender, msg), now))
        self._refuse("round_gone", sender)
        return []

    def member_gone(self, peer: str, now: float, round: int | None = None) -> list[GroupSend]:
        """`peer` left `round` (or, if None, every live round): the groups we lead stop
        waiting for it."""
        sends: list[GroupSend] = []
        for r, leader in list(self.leaders.items()):
            if round is None or r == round:
                sends += self._guard(partial(self._leader_gone, leader, peer, now))
        return sends

    def _leader_gone(self, leader: LeaderRound, peer: str, now: float) -> list[GroupSend]:
        return self._route_all(leader.member_gone(peer, now), now)

    def on_timeout(self, now: float) -> list[GroupSend]:
        sends: list[GroupSend] = []
        for leader in list(self.leaders.values()):
            sends += self._guard(partial(self._leader_timeout, leader, now))
        return sends

    def _leader_timeout(self, leader: LeaderRound, now: float) -> list[GroupSend]:
        return self._route_all(leader.on_timeout(now), now)

    def next_deadline(self) -> float | None:
        deadlines = [d for lr in self.leaders.values() if (d := lr.next_deadline()) is not None]
        return min(deadlines, default=None)

    def status(self) -> dict[str, object]:
        return {"round": self.round, "refused": dict(self.refused)}

    # ---- internals -----------------------------------------------------------------------

    def _route_all(self, sends: list[GroupSend], now: float) -> list[GroupSend]:
        """Deliver what we send to ourselves (we may be our own leader, and our member
        declares to our leader side) and return the rest for the wire."""
        out: list[GroupSend] = []
        for send in sends:
            others = tuple(p for p in send.to if p != self.me)
            if others:
                out.append(GroupSend(others, send.message))
            if len(others) != len(send.to):
                out += self.on_message(self.me, send.message, now)
        return out

    def _guard(self, step: Callable[[], list[GroupSend]]) -> list[GroupSend]:
        try:
            return step()
        except Refused as exc:
            self._refuse(exc.reason, "")
            return []

    def _refuse(self, reason: str, sender: str) -> None:
        self.refused[reason] += 1
        log.debug(
            "secure aggregation v2: refused %s%s", reason, f" from {sender[:12]}" if sender else ""
        )
