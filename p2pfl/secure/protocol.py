"""Secure aggregation inside groups of neighbours: sans-IO state machines.

One `AggregatorRound` per (aggregator A, round): it announces the deterministic groups,
collects masked vectors, retries groups that lost members (survivors only, fresh masks
under a new `attempt`), asks for self-mask reveals once an attempt is complete, and
returns one mean per completed group for the robust rule. One `SecureMember` per node
answers every neighbour's announcements. Neither does I/O or reads a clock: callers
feed messages with `now` and send the returned `Send` actions; `next_deadline()` says
when to call `on_timeout`.

Why the self-mask and its reveal step. Retrying with survivors alone leaks: if member
k is declared dropped at attempt a and its vector arrives late, A holds the complete
attempt-a set, whose masks cancel, and the attempt-(a+1) survivors' sum; the difference
is k's update. So every vector also carries a self-mask from a fresh random seed, and a
member reveals that seed only when A shows it holds the vectors of *all* members of
that attempt (UnmaskRequest), and for at most one attempt per (A, round). An
incomplete attempt can then never be unmasked, late vectors are useless, and A learns
at most one sum containing a member's update per round. A member that goes silent
during the short reveal step makes its group fail for the round (counted): the others
have revealed, so a retry could leak, and is refused.

Invariants a member enforces (each refusal raises `Refused`):
- one announcement per (A, round) (a second grouping would give A other sums of the
  same updates); the grouping is the deterministic one; relayed keys verify;
- retries only shrink the previous attempt's member set, and never after a reveal;
- a reveal only for the attempt it answered last, with exactly its member set.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from p2pfl.secure.errors import Refused
from p2pfl.secure.grouping import MIN_GROUP, make_groups
from p2pfl.secure.keys import KeyAnnouncement, KeyRejected, SessionKey, verify_announcement
from p2pfl.secure.masking import (
    MaskContext,
    SumRejected,
    add_streams,
    fixed_point,
    mask_encoded,
    member_mask,
    pair_seed,
)
from p2pfl.secure.messages import (
    MAX_ATTEMPTS,
    SESSION_LEN,
    GroupAnnounce,
    GroupRetry,
    MaskedUpdate,
    MaskReveal,
    SecureMessage,
    UnmaskRequest,
    wire_size,
)

PREMASK_BUDGET = 64 << 20
# A member answers announcements for rounds in [own round - 1, own round + ROUND_WINDOW]:
# neighbours run a round or two ahead of us; further ahead, we will catch up instead.
ROUND_WINDOW = 2
"""Bytes of masks a member computes ahead (16 aggregators' masks at 1e6 parameters)."""


@dataclass(frozen=True, slots=True)
class SecureSettings:
    """Shared by aggregator and member sides; `clip` and `group_size` are A's choice."""

    federation: str
    group_size: int = 4
    clip: float = 16.0
    collect_timeout: float = 30.0  # attempt 0: members may still be training
    retry_timeout: float = 5.0  # retries and reveals: members are ready, answers are quick
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.group_size < MIN_GROUP:
            raise ValueError(f"group_size must be >= {MIN_GROUP}")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be in 1..{MAX_ATTEMPTS}")
        fixed_point(self.clip, 1)  # validates clip


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` to each peer in `to`."""

    to: tuple[str, ...]
    message: SecureMessage


@dataclass(slots=True)
class SecureStats:
    """Counters for status; add them up across rounds with `merge`."""

    groups_formed: int = 0
    groups_completed: int = 0
    groups_dropped: int = 0
    members_dropped: int = 0
    retries: int = 0
    rejected: int = 0
    late: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    plain_bytes: int = 0  # the same participants' updates as plain 32-bit fixed point

    def merge(self, other: SecureStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True, eq=False)
class SecureResult:
    """Group means (float32, (n_completed, dim)) for the robust rule, and what happened."""

    round: int
    means: np.ndarray = field(repr=False)
    counts: tuple[int, ...]
    groups: tuple[tuple[str, ...], ...]  # members summed in each completed group
    dropped: tuple[tuple[int, str], ...]  # (group index, reason)
    stats: SecureStats


# ================================================================ aggregator side

Phase = Literal["collect", "reveal", "done", "failed"]


@dataclass(slots=True, eq=False)
class _Group:
    index: int
    members: tuple[str, ...]  # of the current attempt
    deadline: float
    attempt: int = 0
    phase: Phase = "collect"
    total: np.ndarray | None = None  # running uint32 sum of this attempt's vectors
    sent: set[str] = field(default_factory=set)
    seeds: dict[str, bytes] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    mean: np.ndarray | None = None
    reason: str = ""


class AggregatorRound:
    """Aggregator A's secure aggregation for one round over its keyed neighbours.

    `keys` maps each neighbour that takes part to its verified announcement (from
    `KeyStore`); fewer than 3 means no group: the round yields no group means.
    """

    def __init__(
        self,
        settings: SecureSettings,
        *,
        aggregator: str,
        round: int,
        dim: int,
        keys: Mapping[str, KeyAnnouncement],
        session: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.aggregator = aggregator
        self.round = round
        self.dim = dim
        self.session = session if session is not None else secrets.token_bytes(SESSION_LEN)
        self.participants = tuple(sorted(p for p in keys if p != aggregator))
        self._keys = {p: keys[p] for p in self.participants}
        grouping = make_groups(
            settings.federation, round, aggregator, self.participants, settings.group_size
        )
        self.grouping = grouping
        self._groups: list[_Group] = []
        self._member_group = {m: i for i, g in enumerate(grouping) for m in g}
        self.stats = SecureStats(groups_formed=len(grouping))
        self.rejections: dict[str, int] = {}
        self._started = False

    # -- driving --------------------------------------------------------------------

    def start(self, now: float) -> list[Send]:
        """The announcement to every participant (nothing if no group can form)."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        deadline = now + self.settings.collect_timeout
        self._groups = [_Group(i, g, deadline) for i, g in enumerate(self.grouping)]
        if not self.grouping:
            return []
        index = {p: i for i, p in enumerate(self.participants)}
        msg = GroupAnnounce(
            sender=self.aggregator,
            round=self.round,
            session=self.session,
            group_size=self.settings.group_size,
            clip=float(self.settings.clip),
            dim=self.dim,
            participants=self.participants,
            keys=tuple(self._keys[p].to_bytes() for p in self.participants),
            groups=tuple(tuple(index[m] for m in g) for g in self.grouping),
        )
        grouped = tuple(self._member_group)
        self.stats.bytes_out += wire_size(msg) * len(grouped)
        self.stats.plain_bytes += (4 * self.dim + 64) * len(grouped)
        return [Send(tuple(sorted(grouped)), msg)]

    @property
    def done(self) -> bool:
        return self._started and all(g.phase in ("done", "failed") for g in self._groups)

    def next_deadline(self) -> float | None:
        pending = [g.deadline for g in self._groups if g.phase in ("collect", "reveal")]
        return min(pending) if pending else None

    def on_message(self, sender: str, msg: MaskedUpdate | MaskReveal, now: float) -> list[Send]:
        """A member's masked vector or reveal; bad or stale input is counted, never raised."""
        group = self._check(sender, msg)
        if group is None:
            return []
        self.stats.bytes_in += wire_size(msg)
        if isinstance(msg, MaskedUpdate):
            return self._on_masked(group, sender, msg, now)
        return self._on_reveal(group, sender, msg)

    def on_timeout(self, now: float) -> list[Send]:
        """Handle every group whose deadline has passed: retry, or fail it."""
        actions: list[Send] = []
        for g in self._groups:
            if g.phase in ("collect", "reveal") and g.deadline <= now:
                actions += self._expire(g, now)
        return actions

    def peer_gone(self, peer: str, now: float) -> list[Send]:
        """The transport lost `peer`: act now instead of waiting for the deadline."""
        index = self._member_group.get(peer)
        if index is None or not self._groups:
            return []
        g = self._groups[index]
        if peer not in g.members or g.phase not in ("collect", "reveal"):
            return []
        g.gone.add(peer)
        if g.phase == "reveal":
            return [] if peer in g.seeds else self._expire(g, now)  # can never complete
        if not set(g.members) - g.sent - g.gone:
            return self._expire(g, now)  # everyone still there has sent: retry now
        return []

    def result(self) -> SecureResult:
        done = [g for g in self._groups if g.phase == "done" and g.mean is not None]
        means = (
            np.stack([g.mean for g in done if g.mean is not None])
            if done
            else np.zeros((0, self.dim), dtype=np.float32)
        )
        return SecureResult(
            round=self.round,
            means=means,
            counts=tuple(len(g.members) for g in done),
            groups=tuple(g.members for g in done),
            dropped=tuple((g.index, g.reason) for g in self._groups if g.phase == "failed"),
            stats=self.stats,
        )

    # -- internals -------------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.stats.rejected += 1
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _check(self, sender: str, msg: MaskedUpdate | MaskReveal) -> _Group | None:
        if msg.sender != sender:
            self._reject("sender_mismatch")
            return None
        if msg.round != self.round or msg.session != self.session:
            self._reject("wrong_session")
            return None
        index = self._member_group.get(sender)
        if index is None or index != msg.group or not self._groups:
            self._reject("not_a_member")
            return None
        g = self._groups[index]
        if msg.attempt < g.attempt or sender not in g.members:
            self.stats.late += 1  # a superseded attempt: never summed, never unmasked
            return None
        expected = "collect" if isinstance(msg, MaskedUpdate) else "reveal"
        if msg.attempt != g.attempt or g.phase != expected:
            self._reject("wrong_phase")
            return None
        return g

    def _on_masked(self, g: _Group, sender: str, msg: MaskedUpdate, now: float) -> list[Send]:
        if sender in g.sent:
            self._reject("duplicate")
            return []
        if msg.masked.shape != (self.dim,):
            self._reject("wrong_dim")
            return []
        if g.total is None:
            g.total = np.array(msg.masked, dtype=np.uint32, copy=True)
        else:
            np.add(g.total, msg.masked, out=g.total)
        g.sent.add(sender)
        if set(g.members) - g.sent - g.gone:
            return []
        if g.gone.intersection(g.members):
            return self._expire(g, now)  # a sender is gone and could not reveal: retry
        g.phase = "reveal"
        g.deadline = now + self.settings.retry_timeout
        req = UnmaskRequest(
            sender=self.aggregator,
            round=self.round,
            session=self.session,
            group=g.index,
            attempt=g.attempt,
            members=g.members,
        )
        self.stats.bytes_out += wire_size(req) * len(g.members)
        return [Send(g.members, req)]

    def _on_reveal(self, g: _Group, sender: str, msg: MaskReveal) -> list[Send]:
        if sender in g.seeds:
            self._reject("duplicate")
            return []
        g.seeds[sender] = msg.seed
        assert g.total is not None
        # Each self mask is removed as its seed arrives (the sum is complete in this
        # phase), so after the last reveal only one stream and the decode remain.
        add_streams(g.total, minus=[msg.seed])
        if len(g.seeds) < len(g.members):
            return []
        codec = fixed_point(self.settings.clip, len(g.members))
        try:
            g.mean = codec.decode_mean(g.total, len(g.members))
        except SumRejected:
            self._fail(g, "bad_sum")
            return []
        g.phase = "done"
        g.total = None
        self.stats.groups_completed += 1
        return []

    def _fail(self, g: _Group, reason: str) -> None:
        g.phase = "failed"
        g.reason = reason
        g.total = None
        self.stats.groups_dropped += 1

    def _expire(self, g: _Group, now: float) -> list[Send]:
        if g.phase == "reveal":
            self.stats.members_dropped += len(set(g.members) - set(g.seeds))
            self._fail(g, "reveal_timeout")
            return []
        survivors = tuple(m for m in g.members if m in g.sent and m not in g.gone)
        self.stats.members_dropped += len(g.members) - len(survivors)
        if len(survivors) < MIN_GROUP:
            self._fail(g, "too_few_members")
            return []
        if g.attempt + 1 >= self.settings.max_attempts:
            self._fail(g, "max_attempts")
            return []
        g.attempt += 1
        g.members = survivors
        g.sent = set()
        g.total = None
        g.deadline = now + self.settings.retry_timeout
        self.stats.retries += 1
        retry = GroupRetry(
            sender=self.aggregator,
            round=self.round,
            session=self.session,
            group=g.index,
            attempt=g.attempt,
            members=survivors,
        )
        self.stats.bytes_out += wire_size(retry) * len(survivors)
        return [Send(survivors, retry)]


# ==================================================================== member side


@dataclass(slots=True, eq=False)
class _Membership:
    """This node's part in one aggregator's round."""

    aggregator: str
    round: int
    session: bytes
    group: int
    clip: float
    dim: int
    peer_keys: dict[str, bytes]  # group peers (not us) -> X25519 public key
    members: tuple[str, ...]  # of the attempt last answered (or announced)
    attempt: int = -1  # -1: announced, not answered yet (no update)
    self_seed: bytes = b""
    revealed: bool = False
    premask: np.ndarray | None = None  # attempt 0's whole mask, computed at announcement
    premask_seed: bytes = b""  # the self seed inside `premask`


class SecureMember:
    """This node answering its neighbours' secure-aggregation requests.

    `set_update(round, update)` gives the vector it contributes for that round (its
    trained model); announcements that arrive first wait for it (bounded).

    Its state is bounded per aggregator, not only in total: it accepts announcements
    only for rounds in [round - 1, round + round_window] around its own `round`
    (`advance` moves it), and at most round_window + 2 sessions from one aggregator, so
    one neighbour announcing far-future rounds cannot fill the table and lock out the
    honest ones.
    """

    def __init__(
        self,
        federation: str,
        key: SessionKey,
        *,
        round: int = 0,
        round_window: int = ROUND_WINDOW,
        max_sessions: int = 256,
        premask_budget: int = PREMASK_BUDGET,
    ) -> None:
        self.federation = federation
        self.key = key
        self.round = round
        self.round_window = round_window
        self.per_aggregator = round_window + 2
        self.max_sessions = max_sessions
        self.premask_budget = premask_budget
        self._updates: dict[int, np.ndarray] = {}
        self._sessions: dict[tuple[str, int], _Membership] = {}
        self.bytes_out = 0
        self.refused: dict[str, int] = {}  # refusals inside set_update (others raise)
        # Answers whose mask was computed ahead (announced while we trained) or not.
        self.masked_ahead = 0
        self.masked_on_demand = 0
        self._verified: dict[bytes, str] = {}  # announcement bytes -> peer id it verified for

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    def set_update(self, round: int, update: np.ndarray) -> list[Send]:
        """Record this round's update and answer announcements that were waiting for it."""
        update = np.asarray(update, dtype=np.float32)
        if update.ndim != 1:
            raise ValueError("update must be 1-D")
        self._updates[round] = update
        actions: list[Send] = []
        for key, m in list(self._sessions.items()):
            if m.round == round and m.attempt < 0:
                try:
                    actions += self._answer(m, 0, m.members)
                except Refused as exc:  # e.g. announced dim differs: give up that one
                    del self._sessions[key]
                    self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        return actions

    def advance(self, round: int) -> None:
        """Our own round is now `round`: move the accepted window, drop older state."""
        self.round = round
        self.forget_before(round - 1)

    def forget_before(self, round: int) -> None:
        """Drop state of rounds < `round` (call when they can no longer matter)."""
        self._updates = {r: u for r, u in self._updates.items() if r >= round}
        self._sessions = {k: m for k, m in self._sessions.items() if m.round >= round}

    def on_message(
        self, sender: str, msg: GroupAnnounce | GroupRetry | UnmaskRequest
    ) -> list[Send]:
        """Handle an aggregator's message; Refused (state unchanged) if it is not valid."""
        if msg.sender != sender or sender == self.peer_id:
            raise Refused("sender_mismatch")
        if isinstance(msg, GroupAnnounce):
            return self._on_announce(msg)
        m = self._sessions.get((sender, msg.round))
        if m is None or m.session != msg.session or m.group != msg.group or m.attempt < 0:
            raise Refused("unknown_session", f"{sender} round {msg.round}")
        if isinstance(msg, GroupRetry):
            return self._on_retry(m, msg)
        return self._on_unmask(m, msg)

    # -- internals -------------------------------------------------------------------

    def _on_announce(self, msg: GroupAnnounce) -> list[Send]:
        key = (msg.sender, msg.round)
        old = self._sessions.get(key)
        if old is not None:
            if old.session == msg.session:
                return []  # duplicate delivery
            raise Refused("second_announcement", "one grouping per aggregator and round")
        if not self.round - 1 <= msg.round <= self.round + self.round_window:
            raise Refused("round_outside_window", f"round {msg.round}, ours {self.round}")
        if sum(agg == msg.sender for agg, _ in self._sessions) >= self.per_aggregator:
            raise Refused("too_many_sessions", "from this aggregator")
        if len(self._sessions) >= self.max_sessions:
            raise Refused("too_many_sessions")
        me = self.peer_id
        if me not in msg.participants or msg.sender in msg.participants:
            raise Refused("not_a_participant")
        groups = make_groups(
            self.federation, msg.round, msg.sender, msg.participants, msg.group_size
        )
        index = {p: i for i, p in enumerate(msg.participants)}
        if tuple(tuple(index[p] for p in g) for g in groups) != msg.groups:
            raise Refused("bad_grouping", "not the deterministic grouping")
        group = next(i for i, g in enumerate(groups) if me in g)
        members = groups[group]
        if msg.keys[index[me]] != self.key.announcement.to_bytes():
            raise Refused("bad_key", "our own key was not relayed as announced")
        peer_keys: dict[str, bytes] = {}
        for p in members:
            if p == me:
                continue
            relayed = msg.keys[index[p]]
            if self._verified.get(relayed) != p:
                try:
                    verify_announcement(relayed, self.federation, expected_peer=p)
                except KeyRejected as exc:
                    raise Refused("bad_key", f"{p}: {exc}") from None
                if len(self._verified) >= 4096:
                    self._verified.clear()
                self._verified[relayed] = p
            peer_keys[p] = KeyAnnouncement.from_bytes(relayed).x25519_key
        m = _Membership(
            aggregator=msg.sender,
            round=msg.round,
            session=msg.session,
            group=group,
            clip=msg.clip,
            dim=msg.dim,
            peer_keys=peer_keys,
            members=members,
        )
        update = self._updates.get(msg.round)
        if update is not None and update.shape != (msg.dim,):
            raise Refused("wrong_dim", f"update has {update.size}, announced {msg.dim}")
        self._sessions[key] = m
        if update is None:
            self._precompute(m)
            return []
        return self._answer(m, 0, members)

    def _precompute(self, m: _Membership) -> None:
        """Compute attempt 0's mask now, while the update is still being trained.

        The mask does not depend on the update, so answering later costs one encode and
        one add pass instead of g keystreams. Bounded: `premask_budget` bytes in all
        (4 x dim per aggregator we are a member for), and only for rounds up to one past
        our newest update, so announcements for far rounds cannot make us spend memory
        or time ahead.
        """
        newest = max(self._updates, default=None)
        if newest is not None and m.round > newest + 1:
            return
        held = sum(s.premask.nbytes for s in self._sessions.values() if s.premask is not None)
        if held + 4 * m.dim > self.premask_budget:
            return
        ctx = MaskContext(self.federation, m.round, m.aggregator, m.session, m.group, 0)
        try:
            seeds = {p: pair_seed(self.key, p, m.peer_keys[p], ctx) for p in m.peer_keys}
        except KeyRejected:
            return  # answering will refuse it, as without precomputation
        m.premask_seed = secrets.token_bytes(32)
        m.premask = member_mask(m.dim, self.peer_id, seeds, m.premask_seed)

    def _on_retry(self, m: _Membership, msg: GroupRetry) -> list[Send]:
        if m.revealed:
            raise Refused("already_revealed", "no retry after a reveal")
        if msg.attempt <= m.attempt:
            raise Refused("stale_attempt")
        if self.peer_id not in msg.members or not set(msg.members) < set(m.members):
            raise Refused("bad_members", "a retry must shrink the previous attempt")
        return self._answer(m, msg.attempt, msg.members)

    def _on_unmask(self, m: _Membership, msg: UnmaskRequest) -> list[Send]:
        if msg.attempt != m.attempt or msg.members != m.members:
            raise Refused("bad_unmask", "not the attempt we answered, or not all its members")
        m.revealed = True  # idempotent: a duplicate request gets the same seed again
        reveal = MaskReveal(
            sender=self.peer_id,
            round=m.round,
            session=m.session,
            group=m.group,
            attempt=m.attempt,
            seed=m.self_seed,
        )
        self.bytes_out += wire_size(reveal)
        return [Send((m.aggregator,), reveal)]

    def _answer(self, m: _Membership, attempt: int, members: tuple[str, ...]) -> list[Send]:
        update = self._updates[m.round]
        if update.shape != (m.dim,):
            raise Refused("wrong_dim", f"update has {update.size}, announced {m.dim}")
        me = self.peer_id
        codec = fixed_point(m.clip, len(members))
        premask, m.premask = m.premask, None  # used once at most
        if premask is not None and attempt == 0 and members == m.members:
            self_seed = m.premask_seed
            masked = codec.encode_add(update, premask)
            self.masked_ahead += 1
        else:
            self.masked_on_demand += 1
            ctx = MaskContext(self.federation, m.round, m.aggregator, m.session, m.group, attempt)
            try:
                seeds = {p: pair_seed(self.key, p, m.peer_keys[p], ctx) for p in members if p != me}
            except KeyRejected as exc:
                raise Refused("bad_key", str(exc)) from None
            self_seed = secrets.token_bytes(32)
            masked = mask_encoded(codec.encode(update), me, seeds, self_seed, copy=False)
        m.attempt, m.members, m.self_seed = attempt, members, self_seed
        msg = MaskedUpdate(
            sender=me,
            round=m.round,
            session=m.session,
            group=m.group,
            attempt=attempt,
            masked=masked,
        )
        self.bytes_out += wire_size(msg)
        return [Send((m.aggregator,), msg)]


def drive_timeouts(agg: AggregatorRound, now: float) -> list[Send]:
    """Convenience for drivers: call on_timeout only if a deadline has passed."""
    deadline = agg.next_deadline()
    return agg.on_timeout(now) if deadline is not None and deadline <= now else []


__all__: Sequence[str] = (
    "AggregatorRound",
    "Refused",
    "SecureMember",
    "SecureResult",
    "SecureSettings",
    "SecureStats",
    "Send",
    "drive_timeouts",
)
