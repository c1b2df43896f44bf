"""A leader's side of one secure-aggregation v2 round (sans-IO; docs/secure-aggregation.md).

The leader only coordinates: it collects joins, announces the chooser list (members
recompute the groups), fixes who masks (U1) and whose vectors are in (U2), rebuilds
what dropped members left behind from Shamir shares, and returns each group's mean.
It learns one sum per group; members guard everything else. Time is fed in: the
caller calls `on_timeout(now)` at `next_deadline()`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from p2pfl.secure.errors import Refused
from p2pfl.secure.group_messages import (
    GroupAbort,
    GroupJoin,
    GroupMean,
    GroupMessage,
    GroupOffer,
    GroupSend,
    MaskedVector,
    MaskList,
    Relayed,
    Sealed,
    SetupDone,
    Unmasking,
    UnmaskList,
)
from p2pfl.secure.masking import SumRejected, add_streams, fixed_point
from p2pfl.secure.messages import SESSION_LEN
from p2pfl.secure.round_keys import RoundScope, pair_seeds_from_secret
from p2pfl.secure.schedule import MIN_GROUP, partition
from p2pfl.secure.shamir import ShamirError, Share, reconstruct

Phase = Literal["setup", "collect", "reveal", "done", "failed"]


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    federation: str
    group_size: int = 4
    min_group: int = MIN_GROUP
    clip: float = 16.0
    join_timeout: float = 5.0
    setup_timeout: float = 10.0
    collect_timeout: float = 30.0  # members may still be training
    reveal_timeout: float = 5.0


@dataclass(slots=True, eq=False)
class _Group:
    index: int
    members: tuple[str, ...]
    deadline: float
    phase: Phase = "setup"
    keys: dict[str, bytes] = field(default_factory=dict)  # round public keys (SetupDone)
    setups: dict[str, tuple[bytes, bytes, bytes, bytes]] = field(default_factory=dict)
    relayed: set[tuple[str, str, str]] = field(default_factory=set)  # (from, to, kind)
    u1: tuple[str, ...] = ()
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    u2: tuple[str, ...] = ()
    reveals: dict[str, Unmasking] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # members that left the round (said or lost)
    mean: np.ndarray | None = None
    reason: str = ""


class LeaderRound:
    """One leader's groups for one round."""

    def __init__(
        self,
        settings: LeaderSettings,
        me: str,
        round: int,
        dim: int,
        now: float,
        expected: Iterable[str] = (),
    ) -> None:
        """`expected`: our secure neighbours. Every member declares its choice to all
        its neighbours, so once each of them (and we) declared, the chooser list is
        final and the offer goes out at once instead of at `join_timeout`."""
        self.settings = settings
        self.expected = {*expected, me}
        self.declared: set[str] = set()
        self.me = me
        self.round = round
        self.dim = dim
        self.session = secrets.token_bytes(SESSION_LEN)
        self.joins: set[str] = set()
        self.groups: list[_Group] = []
        self.join_deadline = now + settings.join_timeout
        self.closed = False
        self._offer: GroupOffer | None = None

    # ---- time ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if not self.closed:
            return self.join_deadline
        live = [g.deadline for g in self.groups if g.phase not in ("done", "failed")]
        return min(live, default=None)

    def on_timeout(self, now: float) -> list[GroupSend]:
        if not self.closed:
            return self.close_joins(now) if now >= self.join_deadline else []
        sends: list[GroupSend] = []
        for g in self.groups:
            if g.phase in ("done", "failed") or now < g.deadline:
                continue
            if g.phase == "setup":
                sends += self._mask_list(g, now)
            elif g.phase == "collect":
                sends += self._unmask(g, now)
            elif g.phase == "reveal":
                self._finish(g)
        return sends

    @property
    def done(self) -> bool:
        return self.closed and all(g.phase in ("done", "failed") for g in self.groups)

    # ---- messages --------------------------------------------------------------------

    def on_message(self, sender: str, msg: GroupMessage, now: float) -> list[GroupSend]:
        if msg.round != self.round:
            raise Refused("wrong_round", f"{msg.round} != {self.round}")
        if isinstance(msg, GroupJoin):
            if self.closed:
                if msg.leader != self.me:
                    return []
                if self._offer is None or sender in self._offer.choosers:
                    raise Refused("late_join", sender)
                # The list is final, but the member learns so at once (it finds itself in
                # no group) instead of waiting for an offer until its own timeout.
                return [GroupSend((sender,), self._offer)]
            self.declared.add(sender)
            if msg.leader == self.me:
                self.joins.add(sender)
            return self.close_joins(now) if self.expected <= self.declared else []
        g = self._group_of(sender, msg)
        if isinstance(msg, SetupDone):
            if g.phase != "setup" or sender in g.keys:
                raise Refused("unexpected_setup_done", sender)
            g.keys[sender] = msg.public
            g.setups[sender] = (msg.public, msg.signature, msg.identity, msg.proof)
            return self._step(g, now)
        if isinstance(msg, Sealed):
            return self._relay(g, sender, msg)
        if isinstance(msg, MaskedVector):
            if g.phase != "collect" or sender not in g.u1 or sender in g.vectors:
                raise Refused("unexpected_vector", sender)
            if msg.masked.size != self.dim:
                raise Refused("wrong_dim", f"{msg.masked.size} != {self.dim}")
            g.vectors[sender] = msg.masked
            return self._step(g, now)
        if isinstance(msg, Unmasking):
            if g.phase != "reveal" or sender not in g.u2 or sender in g.reveals:
                raise Refused("unexpected_reveal", sender)
            g.reveals[sender] = msg
            return self._step(g, now)
        raise Refused("not_for_leaders", type(msg).__name__)

    def member_gone(self, peer: str, now: float) -> list[GroupSend]:
        """`peer` left the round (it said it abstains, or its link closed): wait for it
        no longer. Dropouts are what the Shamir shares are for, so its group goes on at
        once instead of at the step's deadline."""
        if not self.closed:
            self.expected.discard(peer)
            return self.close_joins(now) if self.expected <= self.declared else []
        sends: list[GroupSend] = []
        for g in self.groups:
            if peer in g.members and g.phase not in ("done", "failed"):
                g.gone.add(peer)
                sends += self._step(g, now)
        return sends

    def _step(self, g: _Group, now: float) -> list[GroupSend]:
        """Move on once everyone still in the group answered the current step."""
        if g.phase == "setup" and set(g.members) <= g.keys.keys() | g.gone:
            return self._mask_list(g, now)
        if g.phase == "collect" and set(g.u1) <= g.vectors.keys() | g.gone:
            return self._unmask(g, now)
        if g.phase == "reveal" and set(g.u2) <= g.reveals.keys() | g.gone:
            return self._finish(g)
        return []

    def close_joins(self, now: float) -> list[GroupSend]:
        """Announce the chooser list; members recompute the groups from it."""
        if self.closed:
            return []
        self.closed = True
        choosers = tuple(sorted(self.joins))
        s = self.settings
        parts = partition(s.federation, self.round, self.me, choosers, s.group_size, s.min_group)
        self.groups = [_Group(i, members, now + s.setup_timeout) for i, members in enumerate(parts)]
        if not choosers:
            return []
        offer = self._offer = GroupOffer(
            self.me,
            self.round,
            self.session,
            choosers,
            s.group_size,
            s.min_group,
            float(s.clip),
            self.dim,
        )
        # Choosers left out (too few chose us) get the offer too: they see there is no
        # group for them and apply their policy at once instead of at a timeout.
        return [GroupSend(choosers, offer)]

    def results(self) -> list[tuple[tuple[str, ...], np.ndarray]]:
        """(members summed, mean) of each completed group."""
        return [(g.u2, g.mean) for g in self.groups if g.mean is not None]

    # ---- steps -----------------------------------------------------------------------

    def _group_of(self, sender: str, msg: GroupMessage) -> _Group:
        session, index = getattr(msg, "session", None), getattr(msg, "group", None)
        if session != self.session or not isinstance(index, int):
            raise Refused("wrong_session", sender)
        if not 0 <= index < len(self.groups) or sender not in self.groups[index].members:
            raise Refused("not_in_group", sender)
        return self.groups[index]

    def _mask_list(self, g: _Group, now: float) -> list[GroupSend]:
        g.u1 = tuple(sorted(g.keys))
        if len(g.u1) < self.settings.min_group:
            return self._fail(g, "too_few_set_up")
        g.phase, g.deadline = "collect", now + self.settings.collect_timeout
        setups = tuple(g.setups[p] for p in g.u1)
        msg = MaskList(self.me, self.round, self.session, g.index, g.u1, setups)
        return [GroupSend(g.u1, msg)]

    def _relay(self, g: _Group, sender: str, msg: Sealed) -> list[GroupSend]:
        """Pass a sealed message between two members of the mask list, once per
        (from, to, kind): shares, commits and acks until the vectors are in."""
        if g.phase != "collect" or sender not in g.u1 or msg.peer not in g.u1:
            raise Refused("unexpected_sealed", sender)
        key = (sender, msg.peer, msg.kind)
        if msg.peer == sender or key in g.relayed:
            raise Refused("unexpected_sealed", sender)
        g.relayed.add(key)
        out = Relayed(self.me, self.round, self.session, g.index, sender, msg.kind, msg.box)
        return [GroupSend((msg.peer,), out)]

    def _unmask(self, g: _Group, now: float) -> list[GroupSend]:
        g.u2 = tuple(sorted(g.vectors))
        if len(g.u2) < self.settings.min_group:
            return self._fail(g, "too_few_vectors")
        g.phase, g.deadline = "reveal", now + self.settings.reveal_timeout
        return [GroupSend(g.u2, UnmaskList(self.me, self.round, self.session, g.index, g.u2))]

    def _finish(self, g: _Group) -> list[GroupSend]:
        """Remove self masks and dropped members' pair masks; decode; send the mean."""
        dropped = [p for p in g.u1 if p not in g.u2]
        try:
            undo_plus: list[bytes] = []
            undo_minus = [self._self_seed(g, u) for u in g.u2]
            scope = RoundScope(self.settings.federation, self.round, self.me, self.session, g.index)
            survivors = {u: g.keys[u] for u in g.u2}
            for v in dropped:
                secret = self._rebuild(g, v, "key")
                seeds = pair_seeds_from_secret(secret, v, g.keys[v], survivors, scope)
                # Survivor u added m_uv for v > u and subtracted it for v < u: undo it.
                for u, seed in seeds.items():
                    (undo_minus if v > u else undo_plus).append(seed)
            total = np.zeros(self.dim, dtype=np.uint32)
            for vector in g.vectors.values():
                np.add(total, vector, out=total)
            add_streams(total, plus=undo_plus, minus=undo_minus)
            g.mean = fixed_point(self.settings.clip, len(g.u1)).decode_mean(total, len(g.u2))
        except (ShamirError, SumRejected, Refused, ValueError) as exc:
            return self._fail(g, f"unmask_failed: {exc}")
        g.phase = "done"
        msg = GroupMean(self.me, self.round, self.session, g.index, g.u2, g.mean)
        return [GroupSend(g.u2, msg)]

    def _self_seed(self, g: _Group, u: str) -> bytes:
        reveal = g.reveals.get(u)
        return reveal.seed if reveal is not None else self._rebuild(g, u, "seed")

    def _rebuild(self, g: _Group, owner: str, kind: Literal["key", "seed"]) -> bytes:
        shares = []
        for r in g.reveals.values():
            for peer, raw in r.key_shares if kind == "key" else r.seed_shares:
                if peer == owner:
                    shares.append(Share.from_bytes(raw))
        if not shares:
            raise Refused("no_shares", f"{kind} of {owner}")
        return reconstruct(shares)

    def _fail(self, g: _Group, reason: str) -> list[GroupSend]:
        """Give the group up and tell its members, so they stop waiting for a mean."""
        g.phase, g.reason = "failed", reason
        short = reason.split(":", 1)[0]
        return [GroupSend(g.members, GroupAbort(self.me, self.round, self.session, g.index, short))]
