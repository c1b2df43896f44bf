"""The asynchronous mode of one node (sans-IO): no round barrier.

A node trains, sends the result to its neighbours, mixes it with the newest model each
neighbour has sent since its last mix, and trains again. There is no round: a node
waits for its neighbours' models only while they are as fast as it is (a `grace` of
half its own training time), and for at least `min_inputs` of them (FedBuff's buffer
size K, Nguyen et al. 2022). A device five times slower than the rest therefore holds
back only its own steps, a node whose training is faster than its links does not race
ahead alone, and without stragglers every neighbour is mixed, as in the rounds.
`max_wait` bounds any wait.

Each model carries a *version*, a Lamport clock over training steps: after a mix a
node's version is one more than the (lower) median of its own and the mixed inputs'
versions, if that is ahead of its own. A slow node that mixes in faster neighbours'
models therefore jumps to about their version (its next model is not "stale"), while
one peer claiming a huge version moves nobody (the median). A node is done when its
version reaches the target.

Staleness is how far an input's version lags ours; inputs are weighted by
`samples * (1 + staleness) ** -a` (the polynomial staleness function of FedAsync, Xie
et al. 2019) and dropped beyond `max_staleness`. The mix is the node's aggregation rule
over its own model and the buffer, so a robust rule keeps its guarantees over what a
step mixes: each neighbour's model is used once, and a neighbour counts at most once.

A neighbour that has reached the target sends no more steps: a node stops waiting for
it, and when only finished neighbours are left (it restarted late, say) it asks them for
their final models and mixes those, which takes it to their version.

Same events and actions as `RoundMachine` (the daemon drives either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2pfl.aggregation import AggregationRule
from p2pfl.protocol.actions import (
    Action,
    Aggregate,
    Aggregated,
    Broadcast,
    Finished,
    Rejected,
    RequestState,
    Train,
)
from p2pfl.protocol.rounds import (
    REJECTIONS_KEPT,
    Phase,
    adoptable,
    bad_update,
    choose_neighbours,
    flat_params,
)
from p2pfl.wire.tensors import all_finite


@dataclass(frozen=True)
class GossipSettings:
    target_rounds: int = 10  # the version to reach; 0 = run forever
    staleness_exponent: float = 0.5  # a in (1 + s) ** -a; 0 = no discount
    max_staleness: int = 20  # inputs lagging more versions than this are not mixed
    min_inputs: int = 1  # neighbours' models to wait for before mixing (0 = never wait)
    max_wait: float = 30.0  # seconds a step waits for them at most
    # Once min_inputs are in, how long (a fraction of our own step's training time) to
    # wait for the other neighbours: peers as fast as we are make it, stragglers do not.
    grace: float = 0.5
    neighbour_count: int | None = None  # None = all connected peers
    rule_name: str = "mean"
    # Hand the rule's work out as an Aggregate action instead of running it here.
    defer_aggregation: bool = False


@dataclass(frozen=True, slots=True)
class _Input:
    version: int
    params: np.ndarray
    samples: int


@dataclass
class GossipMachine:
    """State of one node's asynchronous gossip. Feed events, execute the returned actions."""

    params: np.ndarray
    rule: AggregationRule
    settings: GossipSettings = field(default_factory=GossipSettings)
    round: int = 0  # our version
    node_id: str = ""
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    phase: Phase = Phase.STARTING
    deadline: float | None = None  # while waiting for inputs
    _train_started: float = 0.0
    _grace_at: float | None = None  # until then, only every live neighbour is enough
    # Peers known not to answer (set by the daemon; nothing here waits for anybody).
    unresponsive: frozenset[str] = frozenset()
    _buffer: dict[str, _Input] = field(default_factory=dict)  # peer -> newest unmixed model
    _last_version: dict[str, int] = field(default_factory=dict)  # peer -> newest seen
    _peer_rounds: dict[str, int] = field(default_factory=dict)  # from heartbeats too
    _to: tuple[str, ...] = ()  # whom this step's model went to
    _asked: tuple[str, ...] = ()  # finished neighbours asked for their model this step
    _rejected: list[tuple[str, str]] = field(default_factory=list)
    _own: _Input | None = None
    _neighbours: int = 0
    # While the rule runs elsewhere: (senders, their models, row ids, the new version).
    _deferred: tuple[tuple[str, ...], tuple[np.ndarray, ...], tuple[str, ...], int] | None = None

    def __post_init__(self) -> None:
        self.params = flat_params(self.params)

    # ---- events ----------------------------------------------------------------------

    def start(self, now: float, peers: list[str]) -> list[Action]:
        if self.phase is not Phase.STARTING:
            return []
        return self._next_step(now)

    def trained(
        self, now: float, round: int, params: np.ndarray, samples: int, peers: list[str]
    ) -> list[Action]:
        """A local step finished: send it, mix it with the buffer, train again."""
        if self.phase is not Phase.TRAINING or round != self.round:
            return []
        own = _Input(self.round, np.ascontiguousarray(params, dtype=np.float32), samples)
        self._own = own
        to = choose_neighbours(peers, self.settings.neighbour_count, self.rng)
        self._to = to
        self._asked = ()
        self._neighbours = len(to)
        actions: list[Action] = [Broadcast(self.round, own.params, samples, to)]
        self.phase = Phase.COLLECTING
        self.deadline = now + self.settings.max_wait
        grace = self.settings.grace * max(0.0, now - self._train_started)
        self._grace_at = now + grace if grace > 0 else None
        return actions + self._maybe_mix(now)

    def receive_update(
        self, now: float, sender: str, round: int, params: np.ndarray, samples: int
    ) -> list[Action]:
        """A neighbour's model at version `round`: kept until our next mix (a newer one
        from the same neighbour replaces it)."""
        reason = self._check(sender, round, params, samples)
        if reason is not None:
            if len(self._rejected) < REJECTIONS_KEPT:
                self._rejected.append((sender, reason))
            return [Rejected(sender, round, reason)]
        self._last_version[sender] = round
        self._note(sender, round)
        self._buffer[sender] = _Input(round, params, samples)
        return self._maybe_mix(now) if self.phase is Phase.COLLECTING else []

    def aggregated(self, now: float, round: int, new: np.ndarray) -> list[Action]:
        """The rule's result for the step at version `round` (after an Aggregate)."""
        if self.phase is not Phase.AGGREGATING or round != self.round or self._deferred is None:
            return []
        senders, received, ids, version = self._deferred
        self._deferred = None
        return self._adopt(now, new, senders, received, ids, version)

    def peer_lost(self, now: float, peer: str) -> list[Action]:
        self._buffer.pop(peer, None)
        self._last_version.pop(peer, None)
        self._peer_rounds.pop(peer, None)
        self._to = tuple(p for p in self._to if p != peer)
        self._asked = tuple(p for p in self._asked if p != peer)
        return self._maybe_mix(now) if self.phase is Phase.COLLECTING else []

    def observe_peer_round(self, now: float, peer: str, round: int) -> list[Action]:
        """A peer's version from its hello or heartbeat: it may have finished."""
        self._note(peer, round)
        return self._maybe_mix(now) if self.phase is Phase.COLLECTING else []

    def receive_state(
        self, now: float, sender: str, round: int, params: np.ndarray
    ) -> list[Action]:
        """A finished neighbour's final model, which we asked for: mixed like a step."""
        if self.phase is not Phase.COLLECTING or sender not in self._asked:
            return []
        self._asked = tuple(p for p in self._asked if p != sender)
        if params.shape != self.params.shape or not all_finite(params):
            return [Rejected(sender, round, "bad_state"), *self._maybe_mix(now)]
        assert self._own is not None
        self._note(sender, round)
        state = np.ascontiguousarray(params, dtype=np.float32)
        self._buffer[sender] = _Input(round, state, self._own.samples)
        return self._maybe_mix(now)

    def receive_abstain(self, now: float, sender: str, round: int) -> list[Action]:
        return []  # only secure aggregation abstains, and it needs the synchronous rounds

    def tick(self, now: float) -> list[Action]:
        """The grace ended (min_inputs now suffice) or `max_wait` passed (mix what
        there is)."""
        if self.phase is not Phase.COLLECTING:
            return []
        if self._grace_at is not None and now >= self._grace_at:
            self._grace_at = None
        if self.deadline is not None and now >= self.deadline:
            return self._mix(now)
        return self._maybe_mix(now)

    @property
    def next_wakeup(self) -> float | None:
        if self.phase is not Phase.COLLECTING:
            return None
        if self._grace_at is not None and self.deadline is not None:
            return min(self._grace_at, self.deadline)
        return self.deadline

    # ---- queries ---------------------------------------------------------------------

    @property
    def received_this_round(self) -> tuple[str, ...]:
        return tuple(sorted(self._buffer))

    @property
    def expected_this_round(self) -> int:
        return self._neighbours

    # ---- internals -------------------------------------------------------------------

    def _done(self) -> bool:
        return self.settings.target_rounds > 0 and self.round >= self.settings.target_rounds

    def _next_step(self, now: float) -> list[Action]:
        if self._done():
            self.phase = Phase.DONE
            return [Finished(self.round)]
        self.phase = Phase.TRAINING
        self._own = None
        self._train_started = now
        return [Train(self.round, self.params.copy())]

    def _check(self, sender: str, round: int, params: np.ndarray, samples: int) -> str | None:
        if self.phase is Phase.DONE:
            return "stale"
        if round <= self._last_version.get(sender, -1):
            return "duplicate"  # a version we have (or a newer one): a resend or a replay
        if self.round - round > self.settings.max_staleness:
            return "stale"
        return bad_update(params, samples, self.params)

    def _fresh(self) -> dict[str, _Input]:
        limit = self.settings.max_staleness
        return {p: x for p, x in self._buffer.items() if self.round - x.version <= limit}

    def _finished(self, peer: str) -> bool:
        target = self.settings.target_rounds
        return target > 0 and self._peer_rounds.get(peer, -1) >= target

    def _note(self, peer: str, round: int) -> None:
        if round > self._peer_rounds.get(peer, -1):
            self._peer_rounds[peer] = round

    def _maybe_mix(self, now: float) -> list[Action]:
        """Mix once every live neighbour's model is in, or `min_inputs` of them once the
        grace is over. Finished neighbours send no more: when only they are left, ask
        them for their final models. With nobody at all, wait for `max_wait` (a peer
        may connect) rather than race ahead alone."""
        if self.settings.min_inputs == 0:
            return self._mix(now)
        fresh = self._fresh()
        live = [p for p in self._to if not self._finished(p)]
        if live:
            if sum(p in fresh for p in live) >= len(live):
                return self._mix(now)  # nobody left to wait for
            enough = len(fresh) >= min(self.settings.min_inputs, len(live))
            return self._mix(now) if enough and self._grace_at is None else []
        if self._asked:
            return []  # every finished neighbour asked answers first (max_wait at most)
        if fresh:
            return self._mix(now)
        finished = tuple(p for p in self._to if self._finished(p))
        if not finished:
            return []
        self._asked = finished
        return [RequestState(finished)]

    def _mix(self, now: float) -> list[Action]:
        """Our step's model and every fresh buffered one, through the rule."""
        assert self._own is not None
        self.deadline = None
        self._grace_at = None
        fresh = self._fresh()
        self._buffer.clear()  # each neighbour's model is mixed once
        senders = tuple(sorted(fresh))
        # Canonical order (by peer id, ours included), as in the synchronous rounds.
        inputs = sorted([(self.node_id, self._own), *fresh.items()], key=lambda item: item[0])
        a = self.settings.staleness_exponent
        weights = np.array(
            [x.samples * (1.0 + max(0, self.round - x.version)) ** -a for _, x in inputs],
            dtype=np.float64,
        )
        versions = sorted([self.round, *(x.version for x in fresh.values())])
        # Lower median: a single peer claiming a far-ahead version cannot move us.
        version = max(self.round, versions[(len(versions) - 1) // 2]) + 1
        received = tuple(fresh[s].params for s in senders)
        ids = tuple(i for i, _ in inputs)
        own = self._own.params
        if self.settings.defer_aggregation:
            self.phase = Phase.AGGREGATING
            self._deferred = (senders, received, ids, version)
            return [Aggregate(self.round, tuple(x.params for _, x in inputs), weights, own)]
        new = self.rule(np.stack([x.params for _, x in inputs]), weights, own)
        return self._adopt(now, new, senders, received, ids, version)

    def _adopt(
        self,
        now: float,
        new: np.ndarray,
        senders: tuple[str, ...],
        received: tuple[np.ndarray, ...],
        ids: tuple[str, ...],
        version: int,
    ) -> list[Action]:
        assert self._own is not None
        new, guard = adoptable(new, self._own.params, self.node_id, self.round)
        step = self.round
        self.params = new
        self.round = version
        rejected = tuple(self._rejected)
        self._rejected = []
        done = Aggregated(
            step, self.params, senders, rejected, False, self.settings.rule_name, received, ids
        )
        return [done, *guard, *self._next_step(now)]
