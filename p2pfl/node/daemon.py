"""The daemon: one nursery that wires a node's parts and runs its rounds.

Everything that decides something lives in sans-IO modules (`protocol.rounds`,
`membership`, `wire`, `secure`); the node's trio layer is split by job: the mesh
(`mesh.py`: connections, heartbeats, discovery), the learner (`learner.py`: training,
evaluation, checkpoints, all off the event loop) and this daemon, which builds them,
keeps the timer, dispatches the peers' round messages and applies the round machine's
actions. The machine is fed from whichever task has news (trio runs one task at a
time, so no locking is needed) and its actions are executed synchronously, except
training, which runs as its own task (in a worker thread for real nodes).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from p2pfl.aggregation import RobustnessLedger, Rule, TimedRule, make_rule
from p2pfl.compression import Pipeline, UpdateDecoder, parse_pipeline, with_consensus
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.datadir import DataDir, check_socket_path
from p2pfl.identity import Identity
from p2pfl.learning import Dataset, Model
from p2pfl.learning.attacks import Attack
from p2pfl.learning.fingerprint import Fingerprint
from p2pfl.logs import event
from p2pfl.membership import PeerTable
from p2pfl.node.heap import trim_forever
from p2pfl.node.learner import Learner
from p2pfl.node.link import Link
from p2pfl.node.loopwatch import LoopWatch
from p2pfl.node.machines import Machine, build_machine
from p2pfl.node.mesh import LOG_EVERY, Mesh
from p2pfl.node.observers import serve_observers
from p2pfl.node.outbox import UpdateOutbox
from p2pfl.node.status import node_status
from p2pfl.node.study_attack import StudyAttack
from p2pfl.node.transports import faulty_transport, read_secret, tcp_transport
from p2pfl.protocol import (
    Action,
    Aggregate,
    Aggregated,
    Broadcast,
    CaughtUp,
    Finished,
    GossipMachine,
    Phase,
    Rejected,
    RequestState,
    RequestUpdates,
    Train,
)
from p2pfl.supervision import Supervisor
from p2pfl.transport.base import Transport
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import (
    CompressedModelUpdate,
    Message,
    ModelUpdate,
    SecureEnvelope,
    StateReply,
    StateRequest,
    UpdateRequest,
)

if TYPE_CHECKING:
    from p2pfl.node.secure_rounds import SecureRounds

log = logging.getLogger("p2pfl.node")

CONTROL_SOCKET = "control.sock"
STATE_REPLY_EVERY = 1.0  # seconds: at most one state reply per peer per this
HELLO_GRACE = 2.0  # seconds to wait for connected peers' hellos before the first round
FAILED_TICK_PAUSE = 0.1  # seconds before the timer retries after a contained failure


class Node:
    """One node: its mesh, its learner and its round machine, wired and run."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        model: Model | Callable[[NodeConfig], Model] | None = None,
        data: Dataset | None = None,
        identity: Identity | None = None,
        transport: Transport | None = None,
        train_in_thread: bool = True,
        control_socket: bool = True,
        role: str = "honest",
    ) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        # Per-peer and per-message work runs behind this guard: no peer ends the daemon.
        # Its clock only spaces log lines, and it is also used from worker threads.
        self.supervisor = Supervisor(log, time.monotonic, log_every=LOG_EVERY)
        # Every configuration check runs before anything is created on disk, so a typo
        # leaves no fresh data dir or identity.key behind (docs/cli.md, "Exit codes").
        rule = self._rule()
        pipeline = self._pipeline()
        self.learner = Learner(
            config,
            model=model,
            data=data,
            supervisor=self.supervisor,
            counters=self.counters,
            threaded=train_in_thread,
        )
        secret = read_secret(config)
        if control_socket:
            check_socket_path(Path(config.data_dir).expanduser() / CONTROL_SOCKET)
        # Checked (ours, writable by nobody else), created 0700, locked for the node's life.
        self.datadir = DataDir.open(Path(config.data_dir))
        self.data_dir = self.datadir.path
        self.identity = identity or Identity.load_or_create(self.data_dir)
        self.id = self.identity.peer_id
        self.role = role
        transport = transport or tcp_transport(config, self.identity, secret, self.counters)
        if config.faults is not None:
            transport = faulty_transport(
                transport,
                Path(config.faults),
                local_id=self.id,
                current_round=lambda: self.machine.round,
                seed=config.seed,
            )
        self.control_socket = control_socket
        # Only a node that owns its event loop watches it (in-process scenarios share one).
        self.loopwatch = LoopWatch() if train_in_thread else None

        if self.attack is not None:
            self.role = "malicious"  # its labels are poisoned by the learner
            log.warning("this node is MALICIOUS for a study: attack %r", config.attack)

        start_round = 0
        params = self.model.get_params()
        ckpt = self.learner.resume(self.datadir)
        if ckpt is not None:
            start_round, params = ckpt.round, ckpt.params  # (the learner logs it)

        self.outbox = UpdateOutbox(
            self.id,
            pipeline,
            # An attacker with honest_to neighbours sends two models a round: compressed,
            # each peer then needs its own stream; so does the asynchronous mode, which
            # skips a peer whose last model is still on its way.
            per_peer=config.neighbour_count is not None
            or bool(config.attack_honest_to)
            or config.mode == "async",
            keyframe_every=config.compression_keyframe_every,
            seed=config.seed,
        )
        if ckpt is not None:
            self.outbox.load_state(ckpt.compression)
        self.mesh = Mesh(
            config,
            self.id,
            transport,
            num_params=self.model.num_params,
            fingerprint=self.fingerprint,
            supervisor=self.supervisor,
            counters=self.counters,
            current_round=lambda: self.machine.round,
            on_connected=self._on_connected,
            greeting=self._greeting,
            on_message=self._on_message,
            on_peer_round=self._on_peer_round,
            on_unresponsive=self._on_unresponsive,
            on_lost=self._on_lost,
            offload=train_in_thread,
        )
        # Always able to decode compressed updates: the sender's pipeline is self-described.
        self._decoder = UpdateDecoder(self.model.num_params, max_frame_size=self.limits.max_bin_len)
        self.secure: SecureRounds | None = None
        if config.secure_aggregation:  # p2pfl.secure is imported only by nodes that use it
            from p2pfl.node.secure_rounds import SecureRounds
            from p2pfl.secure.admission import Admission

            allow = frozenset(config.allow) if config.allow else None
            self.secure = SecureRounds(self, Admission(config.federation, secret, allow))
        # A malicious study node's wire behaviour (honest_to, accomplices); None if honest.
        self.study = None if self.attack is None else StudyAttack(config, self.learner, self.peers)
        self._timing: dict[str, float] = {}  # this round's train/encode/aggregate/eval seconds
        # The outer optimizer (FedAvgM, FedAdam, ...) turns the aggregate into our next
        # model; with FedAvg (and no consensus step) this is the timed rule.
        outer_rule = self.learner.outer_rule(
            with_consensus(TimedRule(rule, self._timing), config, self.outbox.public_copy)
        )
        self.machine: Machine = build_machine(
            config,
            params,
            outer_rule,
            round=start_round,
            node_id=self.id,
            threaded=train_in_thread,
        )
        self.last_aggregation: dict[str, Any] | None = None
        # The rule's fallbacks and guards by reason, and each neighbour's suspicion score.
        self.ledger = RobustnessLedger(self.id)
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        self._armed: float | None = None  # the machine's wake-up the timer sleeps until
        self._encoded = trio.Event()  # the last off-loop broadcast is enqueued
        self._encoded.set()
        self._round_started_at = 0.0
        self.started_at = 0.0  # set when run() starts (trio time)

    # ---- construction helpers ----------------------------------------------------------

    def _rule(self) -> Rule:
        try:
            return make_rule(
                self.config.aggregation,
                f=self.config.tolerate,
                options=dict(self.config.aggregation_options),
            )
        except ValueError as exc:
            raise ConfigError("aggregation", str(exc)) from None

    def _pipeline(self) -> Pipeline | None:
        if not self.config.compression:
            return None
        try:
            return parse_pipeline(self.config.compression)
        except ValueError as exc:
            raise ConfigError("compression", str(exc)) from None

    def close(self) -> None:
        """Release the data dir (its lock); `run()` does it when it ends."""
        self.datadir.close()

    # ---- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (or `stop()`); say goodbye to peers on the way out."""
        self.started_at = trio.current_time()
        if self.loopwatch is not None:
            trio.lowlevel.add_instrument(self.loopwatch)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.learner.running = True
                await self.mesh.listen(nursery)
                self.metrics_port = await serve_observers(self, nursery)
                self.mesh.start(nursery)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._start_rounds)
                nursery.start_soon(self.learner.record_loop)
                if self.loopwatch is not None:  # a node that owns its process
                    nursery.start_soon(trim_forever)
                log.info(
                    "node %s listening on %s (federation %r)",
                    self.id,
                    ", ".join(self.listen_addresses),
                    self.config.federation,
                    extra=event("node.started", peer_id=self.id, listen=self.listen_addresses),
                )
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.mesh.say_goodbye()
            self.close()
            if self.loopwatch is not None:
                trio.lowlevel.remove_instrument(self.loopwatch)

    async def stop(self) -> None:
        """Clean shutdown: tell peers we leave, then cancel everything."""
        self.mesh.stopping = True
        await self.mesh.say_goodbye()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _ready_peers(self) -> int:
        """Connected peers we can run a round with (with secure aggregation: keyed ones)."""
        connected = self.peers.connected_ids()
        return len(connected) if self.secure is None else self.secure.ready(connected)

    async def _wait_for_peers(self, need: int) -> None:
        last_note = trio.current_time()
        while self._ready_peers() < need:
            await self.mesh.peers_changed()
            if trio.current_time() - last_note > 10:
                log.info("waiting for peers (%d/%d connected)", self.peers.connected_count(), need)
                last_note = trio.current_time()

    async def _start_rounds(self) -> None:
        need = min(self.config.min_peers, self.config.max_peers)
        if self.secure is not None:  # policy "wait": not without enough peers for a group
            need = max(need, self.secure.peers_needed())
        # Resumed from a checkpoint, a node catches up from the peers it waits for (the
        # more, the less one liar decides), but a neighbour may be down for good: after
        # a round timeout, any one peer will do.
        resumed = self.machine.round > 0 and self.secure is None
        with trio.move_on_after(self.config.round_timeout if resumed else math.inf):
            await self._wait_for_peers(need)
        if self._ready_peers() < need:
            log.info(
                "resuming with %d of %d peers (the others may be gone for good)",
                self._ready_peers(),
                need,
            )
            await self._wait_for_peers(1)
        # Let the connected peers' hellos (their rounds) arrive first, so a restarted node
        # catches up from several peers rather than the first one that spoke.
        with trio.move_on_after(HELLO_GRACE):
            while not set(self.peers.connected_ids()) <= self.mesh.hello_from:
                await self.mesh.peers_changed()
        self._round_started_at = trio.current_time()
        self._apply(self.machine.start(trio.current_time(), self.peers.connected_ids()))

    # ---- the round machine's actions ---------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Train):
                self.learner.round_started(action.round, action.params)
                if self.secure is not None:
                    self.secure.start_round(action.round, trio.current_time())
                assert self._nursery is not None
                self._nursery.start_soon(self._train, action.round, action.params)
            elif isinstance(action, Broadcast):
                if isinstance(self.machine, GossipMachine):
                    action = self._not_in_flight(action)
                plain = self.secure is None and not self.outbox.compressing
                if self.mesh.offload and plain and not self.config.attack_honest_to:
                    assert self._nursery is not None
                    self._encoded = trio.Event()
                    self._nursery.start_soon(self._broadcast_off_loop, action, self._encoded)
                else:
                    self._broadcast(action)
            elif isinstance(action, Aggregate):
                assert self._nursery is not None
                self._nursery.start_soon(self._aggregate, action)
            elif isinstance(action, Aggregated):
                self._on_aggregated(action)
            elif isinstance(action, RequestUpdates):
                ask = codec.encode(UpdateRequest(self.id, action.round))
                for peer in action.to:
                    self.mesh.enqueue(peer, ask)
                self.counters["update_requests_sent"] += len(action.to)
            elif isinstance(action, RequestState):
                payload = codec.encode(StateRequest(self.id, self.machine.round))
                for peer in action.to:
                    self.mesh.enqueue(peer, payload)
                log.info("behind peers: asking %d of them for their model", len(action.to))
            elif isinstance(action, CaughtUp):
                log.info(
                    "caught up from round %d to round %d (median of %d peers)",
                    action.from_round,
                    action.round,
                    len(action.sources),
                    extra=event(
                        "round.caught_up", round=action.round, from_round=action.from_round
                    ),
                )
                self.counters["catch_ups"] += 1
                self._round_started_at = trio.current_time()
                self._checkpoint()
            elif isinstance(action, Rejected):
                self.mesh.count_rejection(action.peer, action.reason, f"round {action.round}")
            elif isinstance(action, Finished):
                self.learner.finish(action.round)  # logs it; after the last round's records
        # Only when the timer's deadline moved (every heartbeat reaches here: at 1000
        # in-process nodes, waking the timer each time cost a tenth of the loop).
        if self.secure is not None or self.machine.next_wakeup != self._armed:
            self._wakeup.set()
        if self.secure is not None and self.secure.contributions:
            self.secure.progress(trio.current_time())  # e.g. collecting again after a catch-up

    def _not_in_flight(self, action: Broadcast) -> Broadcast:
        """Asynchronous mode: leave out the peers whose link still carries our previous
        model. A fast node then sends at most what each link can carry, and a peer gets
        our newest model, never a backlog of older ones."""
        links = self.mesh.links
        busy = [p for p in action.to if p in links and links[p].any_update_in_flight()]
        if not busy:
            return action
        self.counters["async_sends_skipped"] += len(busy)
        to = tuple(p for p in action.to if p not in busy)
        return Broadcast(action.round, action.params, action.samples, to)

    def _broadcast(self, action: Broadcast) -> None:
        """Our model for a round goes to the neighbours: masked inside the neighbours'
        groups with secure aggregation, otherwise one (maybe compressed) payload for all
        (a study attacker with `honest_to` neighbours: its honest model to those)."""
        params = self.learner.outgoing(action.round, action.params)
        honest = () if self.study is None else self.study.honest_recipients(action.round, action.to)
        if params is None:  # a silent attacker (maybe not towards everyone)
            if honest:
                self._send_model(action.round, action.params, action.samples, honest)
            return
        if self.secure is not None:
            self.secure.contribute(action, params, trio.current_time())
            return
        instead = dict.fromkeys(honest, action.params) if honest else None
        self._send_model(action.round, params, action.samples, action.to, instead=instead)

    def _send_model(
        self,
        round: int,
        params: np.ndarray,
        samples: int,
        to: tuple[str, ...],
        *,
        instead: dict[str, np.ndarray] | None = None,
    ) -> None:
        started = time.perf_counter()
        payloads = self.outbox.payloads(round, params, samples, to, instead=instead)
        self._timing["encode_s"] = time.perf_counter() - started
        self._enqueue_update(round, payloads)

    async def _broadcast_off_loop(self, action: Broadcast, encoded: trio.Event) -> None:
        """`_broadcast` for a plain update, its encoding (a copy and a pack of the whole
        model) in a worker thread. The round's aggregate waits for `encoded`, so the
        round's row, checkpoint and next round come after our model went out."""
        try:
            params = self.learner.outgoing(action.round, action.params)
            if params is None:
                return  # a silent attacker
            started = time.perf_counter()
            prepared = await trio.to_thread.run_sync(
                self.outbox.encode_plain, action.round, params, action.samples
            )
            self._timing["encode_s"] = time.perf_counter() - started
            payloads = self.outbox.payloads(
                action.round, params, action.samples, action.to, prepared=prepared
            )
            self._enqueue_update(action.round, payloads)
        finally:
            encoded.set()

    def _enqueue_update(self, round: int, payloads: dict[str, bytes]) -> None:
        for peer, payload in payloads.items():
            if not self.mesh.enqueue(peer, payload):
                self.outbox.dropped(peer)
            else:
                self.mesh.links[peer].update_queued(round)

    async def _train(self, round: int, params: np.ndarray) -> None:
        new, self._timing["train_s"] = await self.learner.train(round, params)
        self._apply(
            self.machine.trained(
                trio.current_time(), round, new, self.learner.samples, self.peers.connected_ids()
            )
        )

    async def _aggregate(self, action: Aggregate) -> None:
        """The round's rule in a worker thread: stacking and reducing a few 40 MB models
        takes a quarter of a second, which the event loop's heartbeats cannot spare. A
        rule that fails keeps our own model for the round (the round still ends)."""
        new = action.own
        with self.supervisor.guard("aggregate"):
            new = await trio.to_thread.run_sync(action.run, self.machine.rule)
        await self._encoded.wait()  # our own model for the round is out first
        self._apply(self.machine.aggregated(trio.current_time(), action.round, new))

    def _on_aggregated(self, agg: Aggregated) -> None:
        now = trio.current_time()
        if self.study is not None:  # what the attack overhears: not its accomplices
            self.study.overhear(agg.senders, agg.received)
        row: dict[str, Any] = {
            "round": agg.round,
            # Wall-clock seconds since the epoch: rows of several processes line up in
            # time (time to an accuracy, asynchronous runs where rounds do not).
            "time": round(time.time(), 3),
            "bytes_sent": self.mesh.bytes_sent,
            "bytes_received": self.mesh.bytes_received,
            "seconds": round(now - self._round_started_at, 4),
            "peers_heard": len(agg.senders),
            "timed_out": agg.timed_out,
            "update_raw_bytes": self.outbox.last_sizes[0],
            "update_wire_bytes": self.outbox.last_sizes[1],
            # Where the round's CPU went (real seconds, also under a mock clock).
            "timing": {k: round(v, 6) for k, v in sorted(self._timing.items())},
        }
        self._timing.clear()
        if self.learner.participation is not None:  # it sat this round out, or not
            row["trained"] = self.learner.participation.training
        self._round_started_at = now
        if agg.timed_out:
            self.counters["timeouts"] += 1
        # What the rule did this round (its report is the latest call's: the one that
        # produced this aggregate), counted and attributed to the peers of its rows
        # (not with secure aggregation: a row is then a group's mean, not a peer's).
        report = getattr(self.machine.rule, "last_report", None)
        row["rule"] = rule_row = self.ledger.record(
            agg.round, agg.inputs, report, agg.rejected, attribute=self.secure is None
        )
        self.last_aggregation = {
            "round": agg.round,
            "rule": agg.rule,
            "inputs_used": len(agg.senders) + 1,
            "senders": list(agg.senders),
            "rejected": [{"peer": p, "reason": r} for p, r in agg.rejected],
            "timed_out": agg.timed_out,
            "fallbacks": getattr(self.machine.rule, "fallbacks", 0),
            "fallback": getattr(self.machine.rule, "last_fallback", None),
            "guards": rule_row["guards"],
            "flagged": rule_row["flagged"],
        }
        if self.secure is not None:
            self.secure.aggregated(agg.received)
        self.learner.record_round(agg.params, row, self.peers.connected_count())
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Snapshot the round machine's state and the compression streams now; the
        learner writes it in order with its other records."""
        self.learner.checkpoint(self.machine.round, self.machine.params, self.outbox.state())

    # ---- timers ------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            deadlines = [self._armed] = [self.machine.next_wakeup]
            if self.secure is not None:
                deadlines.append(self.secure.next_deadline())
            deadline = min((d for d in deadlines if d is not None), default=math.inf)
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            now = trio.current_time()
            if now >= deadline:
                before = self.supervisor.total
                with self.supervisor.guard("timer"):
                    if self.secure is not None:
                        self.secure.on_timeout(now)
                    self._apply(self.machine.tick(now))
                if self.supervisor.total != before:
                    await trio.sleep(FAILED_TICK_PAUSE)  # never spin on a failing deadline

    # ---- what the mesh reports -----------------------------------------------------------

    def _on_connected(self, peer: str) -> None:
        self.outbox.peer_connected(peer)

    def _greeting(self) -> list[bytes]:
        """What follows our Hello on a new link (with secure aggregation, our key)."""
        return [] if self.secure is None else [self.secure.greeting(self.machine.round)]

    def _on_peer_round(self, peer: str, round: int, now: float) -> None:
        self._apply(self.machine.observe_peer_round(now, peer, round))

    def _on_unresponsive(self, peers: frozenset[str]) -> None:
        self.machine.unresponsive = peers

    def _on_lost(self, peer: str) -> None:
        """The peer's only link closed: every component lets go of it."""
        self._decoder.forget(peer)
        if self.secure is not None:
            self.secure.on_lost(peer, trio.current_time())
        self._apply(self.machine.peer_lost(trio.current_time(), peer))

    def _on_message(self, link: Link, msg: Message) -> bool:
        """Handle one message that is not the mesh's own. Returns False to close the
        connection."""
        now = trio.current_time()
        peer = link.peer_id
        match msg:
            case SecureEnvelope():
                if self.secure is None:
                    self.mesh.count_rejection(peer, "secure_not_enabled", msg.kind)
                else:
                    self.secure.on_envelope(peer, msg, now)
            case CompressedModelUpdate():
                try:
                    params = self._decoder.decode(peer, msg.round, msg.blob)
                except WireError as exc:
                    self.mesh.count_rejection(peer, exc.reason, exc.detail)
                    return True
                self._apply(self.machine.receive_update(now, peer, msg.round, params, msg.samples))
            case ModelUpdate():
                self._apply(
                    self.machine.receive_update(now, peer, msg.round, msg.params, msg.samples)
                )
            case UpdateRequest() if self.mesh.update_in_flight(peer, msg.round):
                self.counters["resend_requests_in_flight"] += 1  # still queued: coming
            case UpdateRequest():
                payload = self.outbox.resend(peer, msg.round)
                if payload is not None and self.mesh.enqueue(peer, payload):
                    self.mesh.links[peer].update_queued(msg.round)
                    self.counters["updates_resent"] += 1
                elif (
                    payload is None
                    and msg.round < self.machine.round
                    and now - link.last_state_reply >= STATE_REPLY_EVERY
                ):
                    # We are past that round and never sent it to this peer (a catch-up
                    # skipped it): say where we are, or the peer waits out a timeout.
                    link.last_state_reply = now
                    self.counters["skipped_round_replies"] += 1
                    self._send_state(peer)
            case StateRequest() if now - link.last_state_reply < STATE_REPLY_EVERY:
                # A 40-byte request must not buy a full model at line rate.
                self.counters["state_requests_throttled"] += 1
            case StateRequest():
                link.last_state_reply = now
                self._send_state(peer)
            case StateReply():
                self._apply(self.machine.receive_state(now, peer, msg.round, msg.params))
        return True

    def _send_state(self, peer: str) -> None:
        """Our round and model for a peer that is behind. In secure mode the model is
        the mean of the group means we received, never one our own update shaped
        alone; before we have one, nothing (the peer asks others)."""
        params = self.machine.params if self.secure is None else self.secure.public_params
        if params is None:
            self.counters["state_replies_withheld"] += 1
            return
        state = StateReply(self.id, self.machine.round, params, self.learner.samples)
        self.mesh.enqueue(peer, codec.encode(state))

    # ---- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `p2pfl status` shows (served on the control socket)."""
        return node_status(self)

    @property
    def phase(self) -> Phase:
        return self.machine.phase

    # The mesh's and the learner's parts, where tools and tests have always found them.

    @property
    def train_in_thread(self) -> bool:
        return self.learner.threaded

    @property
    def peers(self) -> PeerTable:
        return self.mesh.peers

    @property
    def transport(self) -> Transport:
        return self.mesh.transport

    @transport.setter
    def transport(self, transport: Transport) -> None:
        self.mesh.transport = transport

    @property
    def limits(self) -> codec.Limits:
        return self.mesh.limits

    @property
    def listen_addresses(self) -> list[str]:
        return self.mesh.listen_addresses

    @property
    def frames_rejected(self) -> Counter[str]:
        return self.mesh.frames_rejected

    @property
    def bytes_sent(self) -> int:
        return self.mesh.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.mesh.bytes_received

    @property
    def data(self) -> Dataset:
        return self.learner.data

    @property
    def model(self) -> Model:
        return self.learner.model

    @property
    def fingerprint(self) -> Fingerprint:
        return self.learner.fingerprint

    @property
    def attack(self) -> Attack | None:
        return self.learner.attack

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last rounds' rows (a bounded window; `all_rows()` has every round)."""
        return self.learner.history

    def all_rows(self) -> list[dict[str, Any]]:
        """Every round's row, from metrics.jsonl (reads the file: not for a hot loop)."""
        return self.learner.all_rows()

    @property
    def done(self) -> trio.Event:
        """Set once the last round's records are written."""
        return self.learner.done
