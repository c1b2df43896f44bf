"""The round state machine of one node (sans-IO).

Each node runs rounds on its own: train from its current model -> send the result to
its neighbours -> collect the same round's models from neighbours until a quorum or a
timeout -> aggregate (its own model counts) -> next round. No coordinator decides
when a round starts; nodes stay loosely in step because each waits for the others.

The machine never does I/O and never reads a clock: the node feeds it events with the
current time and executes the actions it returns. That keeps every rule here (stale
and future messages, duplicates, quorum, timeouts, catch-up) testable without sockets.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from p2pfl.aggregation import AggregationRule
from p2pfl.protocol.actions import (
    Action,
    Aggregate,
    Aggregated,
    Broadcast,
    CaughtUp,
    Finished,
    Rejected,
    RequestState,
    RequestUpdates,
    Train,
)
from p2pfl.wire.tensors import all_finite

MIN_NUDGE_GAP = 0.05
"""Seconds: the earliest a missing update is asked for again once most have arrived."""
STATE_RETRY_GAP = 2.0
"""Seconds before peers that did not answer a catch-up are asked again (then doubling):
above the responders' one-reply-per-second throttle, and a full model may be in flight."""
MAJORITY_GRACE = 0.5
"""Seconds a catch-up still waits for the rest once a majority of the asked answered."""
REJECTIONS_KEPT = 256
"""A round's report lists at most this many rejected messages (all are counted): a
neighbour flooding duplicates must not grow it without bound."""


class Phase(StrEnum):
    STARTING = "starting"
    TRAINING = "training"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"  # the rule runs elsewhere (settings.defer_aggregation)
    CATCHING_UP = "catching_up"
    DONE = "done"


@dataclass(frozen=True)
class RoundSettings:
    target_rounds: int = 10  # 0 = run forever
    quorum: float = 1.0  # fraction of expected neighbours to wait for
    round_timeout: float = 30.0
    neighbour_count: int | None = None  # None = all connected peers
    max_rounds_ahead: int = 2  # future rounds buffered; beyond that we are lagging
    catch_up_lag: int = 2  # a peer this many rounds ahead makes us catch up
    catch_up_peers: int = 3  # ask up to this many peers; combine by median
    catch_up_timeout: float = 10.0
    rule_name: str = "mean"
    adaptive_timeout: bool = True
    # Fraction of the collection timeout after which silent neighbours are asked once
    # to resend (None: never). Lost messages then cost a fraction of a timeout.
    nudge_fraction: float | None = None
    min_round_timeout: float = 2.0
    adaptive_window: int = 5  # rounds of wait times the adaptive timeout looks at
    # Hand the rule's work out as an Aggregate action instead of running it here.
    defer_aggregation: bool = False
    # Neighbours' models that are bit-identical count once. With secure aggregation v2
    # every member of a group forwards the same group mean; counted once per neighbour
    # it would weigh in as often as we have neighbours in that group.
    distinct_inputs: bool = False


# (senders, timed_out, rejected, the senders' models, whose each input row is): the
# round while its rule runs.
_DeferredRound = tuple[
    tuple[str, ...], bool, tuple[tuple[str, str], ...], tuple[np.ndarray, ...], tuple[str, ...]
]


@dataclass
class _Pending:
    params: np.ndarray
    samples: int


@dataclass
class RoundMachine:
    """State of one node's rounds. Feed events, execute the returned actions."""

    params: np.ndarray
    rule: AggregationRule
    settings: RoundSettings = field(default_factory=RoundSettings)
    round: int = 0
    node_id: str = ""
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    phase: Phase = Phase.STARTING
    deadline: float | None = None
    _own: _Pending | None = None
    _expected: int = 0
    _received: dict[int, dict[str, _Pending]] = field(default_factory=dict)
    _abstained: dict[int, set[str]] = field(default_factory=dict)  # round -> peers sending none
    _rejected: list[tuple[str, str]] = field(default_factory=list)
    _peer_rounds: dict[str, int] = field(default_factory=dict)
    _states: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    _asked: tuple[str, ...] = ()
    _waiting_for: set[str] = field(default_factory=set)
    _waits: list[float] = field(default_factory=list)
    _collect_started: float = 0.0
    _collect_deadline: float = 0.0
    _sent_round: int = -1  # the last round whose own update went out (one per round)
    nudge_at: float | None = None
    _nudged: bool = False
    _resend_asked: set[str] = field(default_factory=set)
    _nudge_gap: float = 0.0
    # What the round's deferred aggregation reports besides the model (see _adopt).
    _deferred: _DeferredRound | None = None
    # Peers known not to answer (stalled readers): asked for state only as a last resort.
    unresponsive: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.params = flat_params(self.params)

    # ---- events ----------------------------------------------------------------------

    def start(self, now: float, peers: list[str]) -> list[Action]:
        """Begin (or resume) rounds. Catch up first if a peer is known to be ahead."""
        if self.phase is not Phase.STARTING:
            return []
        if self._done():
            self.phase = Phase.DONE
            return [Finished(self.round)]
        lagging = self._lagging_peers()
        if lagging:
            return self._begin_catch_up(now, lagging)
        return self._begin_training()

    def trained(
        self, now: float, round: int, params: np.ndarray, samples: int, peers: list[str]
    ) -> list[Action]:
        """Local training for `round` finished. `peers` are the currently connected ones."""
        if self.phase is not Phase.TRAINING or round != self.round:
            return []  # a training run made obsolete by a catch-up
        self._own = _Pending(np.ascontiguousarray(params, dtype=np.float32), samples)
        to = self._choose_neighbours(peers)
        self._waiting_for = set(to) - self._abstained.get(round, set())
        self._expected = len(self._waiting_for)
        self.phase = Phase.COLLECTING
        self._sent_round = self.round
        self._collect_started = now
        timeout = self._collect_timeout()
        self.deadline = self._collect_deadline = now + timeout
        self._nudged = False
        self._resend_asked = set()
        if self.settings.nudge_fraction is None:
            self.nudge_at = None
        else:
            self._nudge_gap = self._nudge_after(timeout)
            self.nudge_at = now + self._nudge_gap
        actions: list[Action] = [Broadcast(self.round, self._own.params, samples, to)]
        actions += self._maybe_aggregate(now, timed_out=False)
        if self.phase is Phase.COLLECTING:
            actions += self._ask_those_moved_on()
            self._nudge_early(now)
        return actions

    def receive_update(
        self, now: float, sender: str, round: int, params: np.ndarray, samples: int
    ) -> list[Action]:
        """A neighbour's model for `round`."""
        self._note_peer_round(sender, round)
        reason = self._check_update(sender, round, params, samples)
        actions: list[Action] = []
        if reason is not None:
            if round == self.round and len(self._rejected) < REJECTIONS_KEPT:
                self._rejected.append((sender, reason))
            actions.append(Rejected(sender, round, reason))
        else:
            self._received.setdefault(round, {})[sender] = _Pending(params, samples)
        actions += self._resend_if_moved_on(sender, round)
        if self._falls_behind(round):
            return [*actions, *self._begin_catch_up(now, self._lagging_peers())]
        if reason is None and round == self.round and self.phase is Phase.COLLECTING:
            actions += self._maybe_aggregate(now, timed_out=False)
            self._nudge_early(now)
        return actions

    def receive_abstain(self, now: float, sender: str, round: int) -> list[Action]:
        """`sender` sends no model for `round` (secure aggregation: it is in no group
        and its policy withholds its update): stop waiting for it."""
        self._note_peer_round(sender, round)
        if not self.round <= round <= self.round + self.settings.max_rounds_ahead:
            return []
        self._abstained.setdefault(round, set()).add(sender)
        if round != self.round or self.phase is not Phase.COLLECTING:
            return []  # applied when that round collects (`trained`)
        return self._stop_waiting_for(now, sender)

    def observe_peer_round(self, now: float, peer: str, round: int) -> list[Action]:
        """A peer told us its round (hello, heartbeat). Catch up if it is far ahead."""
        self._note_peer_round(peer, round)
        if self._falls_behind(round):
            return self._begin_catch_up(now, self._lagging_peers())
        return self._resend_if_moved_on(peer, round)

    def _falls_behind(self, peer_round: int) -> bool:
        """A peer this far ahead means we lag: catch up (unless already doing so)."""
        return peer_round >= self.round + self.settings.catch_up_lag and self.phase in (
            Phase.TRAINING,
            Phase.COLLECTING,
        )

    def _ask_those_moved_on(self) -> list[Action]:
        """Collecting began: neighbours already seen in a later round sent their model
        for ours before we heard of them (e.g. before we were back after a restart and
        caught up to this round), or it was lost: ask them now, not at a nudge."""
        ask: list[str] = []
        for peer in sorted(self._waiting_for):
            for action in self._resend_if_moved_on(peer, self._peer_rounds.get(peer, -1)):
                assert isinstance(action, RequestUpdates)
                ask += action.to
        return [RequestUpdates(self.round, tuple(ask))] if ask else []

    def _resend_if_moved_on(self, peer: str, round: int) -> list[Action]:
        """A neighbour we wait for is already in a later round: it has sent us its model
        for ours, which must have been lost. Ask for it now rather than at a timeout."""
        if (
            self.settings.nudge_fraction is None
            or self.phase is not Phase.COLLECTING
            or round <= self.round
            or peer not in self._waiting_for
            or peer in self._resend_asked
            or peer in self._received.get(self.round, {})
        ):
            return []
        self._resend_asked.add(peer)
        return [RequestUpdates(self.round, (peer,))]

    def receive_state(
        self, now: float, sender: str, round: int, params: np.ndarray
    ) -> list[Action]:
        """A peer's reply to our RequestState, or to our RequestUpdates for a round it
        has moved past without a model for us (it skipped that round by a catch-up):
        it will never send one, so we stop waiting for it."""
        self._note_peer_round(sender, round)
        if self.phase is Phase.COLLECTING and round > self.round:
            actions = self._stop_waiting_for(now, sender)
            if self._falls_behind(round):
                actions += self._begin_catch_up(now, self._lagging_peers())
            return actions
        if self.phase is not Phase.CATCHING_UP or sender not in self._asked:
            return []
        if params.shape != self.params.shape or not all_finite(params):
            return [Rejected(sender, round, "bad_state")]
        self._states[sender] = (round, np.ascontiguousarray(params, dtype=np.float32))
        if len(self._states) >= len(self._asked):
            return self._finish_catch_up(now)
        if 2 * len(self._states) > len(self._asked) and self.deadline is not None:
            # A majority is in (so no single peer decides): give the rest a moment, not
            # the whole catch-up timeout (one may be a peer that stopped reading).
            self.deadline = min(self.deadline, now + MAJORITY_GRACE)
        return []

    def peer_lost(self, now: float, peer: str) -> list[Action]:
        """A neighbour disconnected: stop waiting for it."""
        self._peer_rounds.pop(peer, None)
        actions: list[Action] = []
        if self.phase in (Phase.COLLECTING, Phase.CATCHING_UP):
            # Also while catching up: we may resume collecting this round afterwards.
            actions += self._stop_waiting_for(now, peer)
        if self.phase is Phase.CATCHING_UP and peer in self._asked:
            self._asked = tuple(p for p in self._asked if p != peer)
            if len(self._states) >= len(self._asked):
                actions += self._finish_catch_up(now)
        return actions

    def _stop_waiting_for(self, now: float, peer: str) -> list[Action]:
        """`peer` will not send its model for this round: the round can end without it."""
        if peer not in self._waiting_for or peer in self._received.get(self.round, {}):
            return []
        self._waiting_for.discard(peer)
        self._expected = len(self._waiting_for)
        if self.phase is not Phase.COLLECTING:
            return []
        return self._maybe_aggregate(now, timed_out=False)

    @property
    def next_wakeup(self) -> float | None:
        """When to call `tick`: the deadline, or earlier to nudge silent neighbours."""
        nudge = self.nudge_at if self.phase in (Phase.COLLECTING, Phase.CATCHING_UP) else None
        times = [t for t in (self.deadline, nudge) if t is not None]
        return min(times, default=None)

    def tick(self, now: float) -> list[Action]:
        """Call when `next_wakeup` has passed."""
        if (
            self.nudge_at is not None
            and now >= self.nudge_at
            and self.phase in (Phase.COLLECTING, Phase.CATCHING_UP)
            and (self.deadline is None or now < self.deadline)
        ):
            return self._ask_again(now)
        if self.deadline is None or now < self.deadline:
            return []
        if self.phase is Phase.COLLECTING and self._wait_longer(now):
            return []
        self.nudge_at = None
        self.deadline = None
        if self.phase is Phase.COLLECTING:
            return self._maybe_aggregate(now, timed_out=True)
        if self.phase is Phase.CATCHING_UP:
            return self._finish_catch_up(now)
        return []

    # ---- queries ---------------------------------------------------------------------

    @property
    def received_this_round(self) -> tuple[str, ...]:
        return tuple(self._received.get(self.round, {}))

    @property
    def expected_this_round(self) -> int:
        return self._expected

    # ---- internals -------------------------------------------------------------------

    def _done(self) -> bool:
        return self.settings.target_rounds > 0 and self.round >= self.settings.target_rounds

    def _begin_training(self) -> list[Action]:
        self.phase = Phase.TRAINING
        self.deadline = None
        self._own = None
        self._rejected = []
        return [Train(self.round, self.params.copy())]

    def _choose_neighbours(self, peers: list[str]) -> tuple[str, ...]:
        return choose_neighbours(peers, self.settings.neighbour_count, self.rng)

    def _check_update(
        self, sender: str, round: int, params: np.ndarray, samples: int
    ) -> str | None:
        if round < self.round or (self.phase is Phase.DONE):
            return "stale"
        horizon = self.round + self.settings.max_rounds_ahead
        if round > horizon:
            # Far ahead means we are lagging and will catch up to about that round:
            # keep the newest such round only (bounded), so after catching up its
            # models are already here and nobody has to wait for a timeout.
            far = [r for r in self._received if r > horizon]
            if round < max(far, default=-1):
                return "too_far_ahead"
            for r in far:
                if r < round:
                    del self._received[r]
        if sender in self._received.get(round, {}):
            return "duplicate"
        return bad_update(params, samples, self.params)

    def _ask_again(self, now: float) -> list[Action]:
        """A request or its answer may have been lost: ask those still silent again,
        then again after twice the gap. While collecting, the gap is capped at a quarter
        of the timeout, so a lossy link still gets several tries per round."""
        if self.phase is Phase.CATCHING_UP:
            self._nudge_gap *= 2.0
            self.nudge_at = now + self._nudge_gap
            silent = tuple(p for p in self._asked if p not in self._states)
            return [RequestState(silent)] if silent else []
        cap = max(MIN_NUDGE_GAP, 0.25 * self._collect_timeout())
        self._nudge_gap = min(max(2.0 * self._nudge_gap, MIN_NUDGE_GAP), cap)
        self.nudge_at = now + self._nudge_gap
        self._nudged = True
        received = self._received.get(self.round, {})
        missing = tuple(sorted(p for p in self._waiting_for if p not in received))
        return [RequestUpdates(self.round, missing)] if missing else []

    def _nudge_early(self, now: float) -> None:
        """Most neighbours' updates are in but not all: ask for the rest sooner than the
        timeout-based nudge, after as long again as the majority took (at least
        MIN_NUDGE_GAP). Neighbours train alike, so a straggler is more likely lost than
        slow; a request costs a few bytes, and a sender whose update is still queued
        for us ignores it, so asking early does not duplicate a transfer in progress.
        """
        if self.phase is not Phase.COLLECTING or self._nudged or self.nudge_at is None:
            return
        got = sum(p in self._waiting_for for p in self._received.get(self.round, {}))
        if got >= self._expected or 2 * got < self._expected:
            return
        gap = max(MIN_NUDGE_GAP, now - self._collect_started)
        if now + gap < self.nudge_at:
            self._nudge_gap = gap
            self.nudge_at = now + gap

    def _wait_longer(self, now: float) -> bool:
        """The adaptive timeout expired: keep waiting (up to `round_timeout` in all) if a
        neighbour we miss is merely behind, i.e. still in an earlier round and answering
        pings. Its update will come once it finishes that round; giving up on it would
        send us into the next round alone, a round ahead of everyone, and make them
        catch up: under message loss that cascaded into mostly wasted rounds.
        """
        hard = self._collect_started + self.settings.round_timeout
        if now >= hard:
            return False
        received = self._received.get(self.round, {})
        behind = [
            p
            for p in self._waiting_for
            if p not in received
            and self._peer_rounds.get(p, self.round) < self.round
            and p not in self.unresponsive
        ]
        if not behind:
            return False
        self.deadline = min(hard, now + self._collect_timeout())
        return True

    def _note_peer_round(self, peer: str, round: int) -> None:
        if round > self._peer_rounds.get(peer, -1):
            self._peer_rounds[peer] = round

    def _lagging_peers(self) -> list[str]:
        """Peers far enough ahead of us that we should adopt their state."""
        lag = self.settings.catch_up_lag
        ahead = [(r, p) for p, r in self._peer_rounds.items() if r >= self.round + lag]
        ahead.sort(reverse=True)
        return [p for _, p in ahead]

    def _maybe_aggregate(self, now: float, *, timed_out: bool) -> list[Action]:
        assert self._own is not None
        received = self._received.get(self.round, {})
        need = math.ceil(self.settings.quorum * self._expected - 1e-9)
        # Nobody expected because everyone said they send nothing: no reason to wait.
        nobody = self._expected == 0 and not self._abstained.get(self.round)
        if not timed_out and (nobody or len(received) < need):
            # With nobody to hear from we wait for the timeout: a peer may (re)connect,
            # and racing through rounds alone would leave the federation behind.
            return []
        if not (timed_out or self._nudged):
            # Only undisturbed rounds teach us how long neighbours normally take; rounds
            # that needed a resend would inflate the timeouts under message loss.
            self._waits.append(now - self._collect_started)
            del self._waits[: -self.settings.adaptive_window]
        senders = tuple(sorted(received))
        counted = _distinct(senders, received) if self.settings.distinct_inputs else senders
        # Inputs in one canonical order (by peer id, ours included) so that nodes that
        # aggregate the same inputs get bit-identical models.
        inputs = sorted(
            [(self.node_id, self._own), *((s, received[s]) for s in counted)],
            key=lambda item: item[0],
        )
        weights = np.array([p.samples for _, p in inputs], dtype=np.float64)
        rejected = tuple(self._rejected)
        received_params = tuple(received[s].params for s in senders)
        ids = tuple(i for i, _ in inputs)
        if self.settings.defer_aggregation:
            self.phase = Phase.AGGREGATING
            self.deadline = None
            self.nudge_at = None
            self._deferred = (senders, timed_out, rejected, received_params, ids)
            own = self._own.params
            return [Aggregate(self.round, tuple(p.params for _, p in inputs), weights, own)]
        new = self.rule(np.stack([p.params for _, p in inputs]), weights, self._own.params)
        return self._adopt(now, new, senders, timed_out, rejected, received_params, ids)

    def aggregated(self, now: float, round: int, new: np.ndarray) -> list[Action]:
        """The rule's result for `round` (after an Aggregate action)."""
        if self.phase is not Phase.AGGREGATING or round != self.round or self._deferred is None:
            return []  # made obsolete meanwhile (a catch-up)
        senders, timed_out, rejected, received_params, ids = self._deferred
        self._deferred = None
        return self._adopt(now, new, senders, timed_out, rejected, received_params, ids)

    def _adopt(
        self,
        now: float,
        new: np.ndarray,
        senders: tuple[str, ...],
        timed_out: bool,
        rejected: tuple[tuple[str, str], ...],
        received_params: tuple[np.ndarray, ...],
        ids: tuple[str, ...],
    ) -> list[Action]:
        """The round's aggregate becomes our model; on to the next round."""
        assert self._own is not None
        new, guard = adoptable(new, self._own.params, self.node_id, self.round)
        done_round = self.round
        self.params = new
        self.nudge_at = None
        self._advance_to(self.round + 1)
        actions: list[Action] = [
            Aggregated(
                done_round,
                self.params,
                senders,
                rejected,
                timed_out,
                self.settings.rule_name,
                received_params,
                ids,
            )
        ]
        actions += guard
        actions += self._next_round(now)
        return actions

    def _collect_timeout(self) -> float:
        """How long to wait for neighbours this round.

        Adapts to the federation: a few times the slowest wait of recent rounds that
        completed, never below `min_round_timeout` nor above `round_timeout`. A crashed
        neighbour then costs seconds, not the full configured timeout, every round.
        """
        s = self.settings
        if not s.adaptive_timeout or len(self._waits) < 3:
            return s.round_timeout
        return min(s.round_timeout, max(s.min_round_timeout, 4.0 * max(self._waits)))

    def _nudge_after(self, timeout: float) -> float:
        """When to ask silent neighbours to resend (a backstop: a neighbour seen in a
        later round is asked at once, see `_resend_if_moved_on`)."""
        assert self.settings.nudge_fraction is not None
        return self.settings.nudge_fraction * timeout

    def _advance_to(self, round: int) -> None:
        self.round = round
        for r in [r for r in self._received if r < round]:
            del self._received[r]
        for r in [r for r in self._abstained if r < round]:
            del self._abstained[r]

    def _next_round(self, now: float) -> list[Action]:
        if self._done():
            self.phase = Phase.DONE
            self.deadline = None
            return [Finished(self.round)]
        lagging = self._lagging_peers()
        if lagging:
            return self._begin_catch_up(now, lagging)
        return self._begin_training()

    def _begin_catch_up(self, now: float, lagging: list[str]) -> list[Action]:
        if not lagging:
            return []
        self.phase = Phase.CATCHING_UP
        # Ask the most advanced peers we know, lagging or not, so that one peer claiming
        # a far-ahead round cannot decide alone what we adopt (the median does).
        others = sorted(
            (p for p in self._peer_rounds if p not in lagging),
            key=lambda p: (-self._peer_rounds[p], p),
        )
        # Peers that stopped answering pings would only make us wait out the timeout:
        # ask the responsive ones first (stable sort keeps the order above otherwise).
        ranked = sorted([*lagging, *others], key=lambda p: p in self.unresponsive)
        self._asked = tuple(ranked[: self.settings.catch_up_peers])
        self._states = {}
        if self._sent_round != self.round:
            self._own = None  # a training run in progress is obsolete
        # else: our model for this round is out; keep it in case we stay in this round
        self.deadline = now + self.settings.catch_up_timeout
        self._nudge_gap = STATE_RETRY_GAP
        self.nudge_at = now + STATE_RETRY_GAP
        return [RequestState(self._asked)]

    def _finish_catch_up(self, now: float) -> list[Action]:
        """Adopt a robust combination of the states received, never a single peer's word
        when more than one answered: median round, coordinate-wise median model."""
        states = self._states
        self._states = {}
        self._asked = ()
        self.deadline = None
        self.nudge_at = None
        if not states:
            # Nobody answered: carry on from where we are; we may be asked again later.
            self._forget_lagging()
            return self._next_round_after_catch_up(now, None)
        rounds = sorted(r for r, _ in states.values())
        target = rounds[(len(rounds) - 1) // 2]  # lower median: one liar cannot push it up
        stacked = np.stack([p for _, p in states.values()])
        params = np.median(stacked, axis=0).astype(np.float32)
        from_round = self.round
        sources = tuple(sorted(states))
        if target > self.round:
            self.params = params
            self._advance_to(target)
        self._forget_lagging()
        caught = CaughtUp(from_round, self.round, self.params, sources)
        return self._next_round_after_catch_up(now, caught)

    def _forget_lagging(self) -> None:
        # Peer rounds are re-learnt from their next messages; forgetting them avoids
        # re-triggering a catch-up from stale knowledge.
        self._peer_rounds = {p: r for p, r in self._peer_rounds.items() if r < self.round}

    def _next_round_after_catch_up(self, now: float, caught: CaughtUp | None) -> list[Action]:
        actions: list[Action] = [caught] if caught is not None else []
        if self._done():
            self.phase = Phase.DONE
            return [*actions, Finished(self.round)]
        if self._sent_round == self.round and self._own is not None:
            # Still in the round whose model we already sent: training and sending it
            # again would give the neighbours a second, different model for one round
            # (dropped as a duplicate by those that have the first, taken by the rest)
            # and break compressed streams (one message per round). Collect on.
            return [*actions, *self._resume_collecting(now)]
        return [*actions, *self._begin_training()]

    def _resume_collecting(self, now: float) -> list[Action]:
        """Back to collecting the round we were collecting when the catch-up began, with
        that round's deadline: updates that arrived meanwhile count, the missing ones
        are asked for at once (the catch-up held back our nudges)."""
        self.phase = Phase.COLLECTING
        self.deadline = max(self._collect_deadline, now)
        if self.settings.nudge_fraction is not None:
            self._nudge_gap = max(self._nudge_gap, MIN_NUDGE_GAP)
            self.nudge_at = now
        return self._maybe_aggregate(now, timed_out=False)


def bad_update(params: np.ndarray, samples: int, own: np.ndarray) -> str | None:
    """Why a peer's model cannot enter an aggregation (the reason counted and logged),
    or None: a float32 vector of our model's shape, a sample count >= 0, all finite."""
    if params.dtype != np.float32 or params.shape != own.shape:
        return "bad_shape"
    if samples < 0:
        return "bad_samples"
    if not all_finite(params):
        return "non_finite"
    return None


def adoptable(
    new: np.ndarray, own: np.ndarray, node_id: str, round: int
) -> tuple[np.ndarray, list[Action]]:
    """The aggregate to adopt, or our own model if it is not a finite vector of our
    model's shape (finite but huge inputs can overflow a weighted sum), said as a
    rejection of our own."""
    if new.shape != own.shape or not all_finite(new):
        return own, [Rejected(node_id, round, "non_finite_aggregate")]
    return np.ascontiguousarray(new, dtype=np.float32), []


def flat_params(params: np.ndarray) -> np.ndarray:
    """A machine's model: one contiguous float32 vector, or a ValueError."""
    flat = np.ascontiguousarray(params, dtype=np.float32)
    if flat.ndim != 1:
        raise ValueError("params must be a flat float32 vector")
    return flat


def choose_neighbours(peers: list[str], k: int | None, rng: np.random.Generator) -> tuple[str, ...]:
    """All connected peers (k None), or k of them drawn with the node's seeded RNG."""
    ordered = sorted(set(peers))
    if k is None or k >= len(ordered):
        return tuple(ordered)
    picked = rng.choice(len(ordered), size=k, replace=False)
    return tuple(ordered[i] for i in sorted(picked))


def _distinct(senders: tuple[str, ...], received: dict[str, _Pending]) -> tuple[str, ...]:
    """The senders whose model no sender before them (in id order) sent bit for bit."""
    seen: set[tuple[bytes, int]] = set()
    kept = []
    for s in senders:
        params = received[s].params
        key = (
            hashlib.sha256(np.ascontiguousarray(params).data.cast("B")).digest(),
            params.size,
        )
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return tuple(kept)
