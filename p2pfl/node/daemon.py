"""One p2pfl node: the thin trio layer that wires transport, membership and rounds.

Everything that decides something lives in sans-IO modules (`protocol.rounds`,
`membership`, `wire`); this module only moves bytes, keeps time and runs tasks. The
round machine is fed from whichever task has news (trio runs one task at a time, so no
locking is needed) and its actions are executed synchronously, except training, which
runs as its own task (in a worker thread for real nodes).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from p2pfl import PROTOCOL_VERSION, __version__
from p2pfl.aggregation import Rule, make_rule
from p2pfl.compression import Pipeline, UpdateDecoder, parse_pipeline
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.datadir import DataDir, check_socket_path
from p2pfl.identity import Identity
from p2pfl.learning import Dataset, Model
from p2pfl.learning.attacks import Attack
from p2pfl.learning.fingerprint import Fingerprint
from p2pfl.membership import PeerState, PeerTable
from p2pfl.node.learner import Learner
from p2pfl.node.link import Link, closed_cause
from p2pfl.node.outbox import UpdateOutbox
from p2pfl.protocol import (
    Action,
    Aggregated,
    Broadcast,
    CaughtUp,
    Finished,
    Phase,
    Rejected,
    RequestState,
    RequestUpdates,
    RoundMachine,
    RoundSettings,
    Train,
)
from p2pfl.secure.driver import SecureDriver
from p2pfl.secure.protocol import SecureSettings, Send
from p2pfl.secure.wire import from_envelope, to_envelope
from p2pfl.supervision import Supervisor
from p2pfl.transport.base import Connection, ConnectionClosed, HandshakeError, Transport
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import (
    Bye,
    CompressedModelUpdate,
    Hello,
    Message,
    ModelUpdate,
    PeerList,
    Ping,
    Pong,
    SecureEnvelope,
    StateReply,
    StateRequest,
    UpdateRequest,
)

log = logging.getLogger("p2pfl.node")

CONTROL_SOCKET = "control.sock"
PEER_EXCHANGE_EVERY = 10  # heartbeats
RTT_SAMPLE_EVERY = 5  # heartbeats
MAX_BAD_MESSAGES = 20  # per connection, before we hang up on the peer
MISMATCH_HOLD_OFF = 60.0  # seconds to ignore an address that proved the wrong id
LOG_EVERY = 10.0  # seconds between repeated warnings about one peer
STATE_REPLY_EVERY = 1.0  # seconds: at most one state reply per peer per this
HELLO_GRACE = 2.0  # seconds to wait for connected peers' hellos before the first round
RETIRE_GRACE = 5.0  # seconds a duplicate connection is still read before closing
FAILED_TICK_PAUSE = 0.1  # seconds before the timer retries after a contained failure


class Node:
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
        self._secret = self._read_secret() if transport is None else None
        if control_socket:
            check_socket_path(Path(config.data_dir).expanduser() / CONTROL_SOCKET)
        # Checked (ours, writable by nobody else), created 0700, locked for the node's life.
        self.datadir = DataDir.open(Path(config.data_dir))
        self.data_dir = self.datadir.path
        self.identity = identity or Identity.load_or_create(self.data_dir)
        self.id = self.identity.peer_id
        self.role = role
        self.transport = transport or self._tcp_transport()
        if config.faults is not None:
            self.transport = self._faulty(self.transport, Path(config.faults))
        self.train_in_thread = train_in_thread
        self.control_socket = control_socket

        if self.attack is not None:
            self.role = "malicious"  # its labels are poisoned by the learner
            log.warning("this node is MALICIOUS for a study: attack %r", config.attack)

        start_round = 0
        params = self.model.get_params()
        ckpt = self.learner.resume(self.datadir)
        if ckpt is not None:
            start_round, params = ckpt.round, ckpt.params
            log.info("resuming from checkpoint at round %d", start_round)

        self.outbox = UpdateOutbox(
            self.id,
            pipeline,
            per_peer=config.neighbour_count is not None,
            keyframe_every=config.compression_keyframe_every,
            seed=config.seed,
        )
        if ckpt is not None:
            self.outbox.load_state(ckpt.compression)
        # Always able to decode compressed updates: the sender's pipeline is self-described.
        self.limits = self._bound_transport()
        self._decoder = UpdateDecoder(self.model.num_params, max_frame_size=self.limits.max_bin_len)
        self.secure: SecureDriver | None = None
        if config.secure_aggregation:
            rt = config.round_timeout
            self.secure = SecureDriver(
                self.identity,
                SecureSettings(
                    config.federation,
                    group_size=config.group_size,
                    collect_timeout=0.6 * rt,
                    retry_timeout=0.1 * rt,
                    max_attempts=3,
                ),
                self.model.num_params,
                round=start_round,
            )
        self._timing: dict[str, float] = {}  # this round's train/encode/aggregate/eval seconds
        self.machine = RoundMachine(
            params=params,
            rule=_TimedRule(rule, self._timing),
            settings=RoundSettings(
                target_rounds=config.rounds,
                quorum=config.quorum,
                round_timeout=config.round_timeout,
                neighbour_count=config.neighbour_count,
                catch_up_timeout=max(2.0, config.round_timeout / 2),
                # Secure rounds end on the secure protocol's own timeouts.
                adaptive_timeout=not config.secure_aggregation,
                nudge_fraction=None if config.secure_aggregation else 0.2,
                rule_name=config.aggregation,
            ),
            round=start_round,
            node_id=self.id,
            rng=np.random.default_rng([config.seed, config.node_index]),
        )
        self.peers = PeerTable(self.id, max_peers=config.max_peers, seed=config.seed)
        for address in config.peers:
            self.peers.add_address(address, peer_id=None, found_via="bootstrap")

        self.frames_rejected: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.listen_addresses: list[str] = []
        self.last_aggregation: dict[str, Any] | None = None
        self._links: dict[str, Link] = {}
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        self._peers_changed = trio.Event()
        self._round_started_at = 0.0
        self._started = 0.0  # set when run() starts
        self._ping_nonce = 0
        self._hello_from: set[str] = set()
        self._refused_logged: set[tuple[str, str]] = set()
        self._stopping = False

    # ---- construction helpers ----------------------------------------------------------

    def _tcp_transport(self) -> Transport:
        from p2pfl.transport.tcp import TcpTransport, parse_address

        host, port = parse_address(self.config.listen)
        return TcpTransport(
            self.identity,
            federation=self.config.federation,
            secret=self._secret,
            host=host,
            port=port,
            # Refusals by a resource bound (e.g. "inbound_refused") show in status.
            on_event=lambda name: self.counters.update((name,)),
        )

    def _bound_transport(self) -> codec.Limits:
        """Size the resource bounds to the model, now that it is built: frames of about
        twice its dense update, not 256 MiB whatever the model (docs/security.md)."""
        from p2pfl.transport.base import TransportLimits

        limits = TransportLimits.from_config(self.config, self.model.num_params)
        self.transport.set_limits(limits)
        # A TCP node can never dial a peer's 'mem:' address: refuse it at the codec.
        return codec.Limits(
            max_bin_len=limits.max_frame_size,
            memory_addresses=self.config.listen.startswith("mem:"),
        )

    def _read_secret(self) -> bytes | None:
        if self.config.secret_file is None:
            return None
        try:
            return Path(self.config.secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                "secret_file", f"cannot read {self.config.secret_file}: {exc.strerror}"
            ) from None

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

    def _faulty(self, inner: Transport, plan_file: Path) -> Transport:
        from p2pfl.transport.faults import FaultyTransport, load_fault_plan

        log.warning("fault injection active from %s", plan_file)
        return FaultyTransport(
            inner,
            load_fault_plan(plan_file),
            local_id=self.id,
            current_round=lambda: self.machine.round,
            seed=self.config.seed,
        )

    def close(self) -> None:
        """Release the data dir (its lock); `run()` does it when it ends."""
        self.datadir.close()

    # ---- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (or `stop()`); say goodbye to peers on the way out."""
        self._started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.learner.running = True
                self.listen_addresses = await nursery.start(self.transport.listen, self._on_inbound)
                if self.control_socket:
                    from p2pfl.control.server import serve_control

                    await nursery.start(
                        serve_control,
                        self.data_dir / CONTROL_SOCKET,
                        {"status": lambda _req: self.status()},
                    )
                if self.config.mdns and not self.config.listen.startswith("mem:"):
                    nursery.start_soon(self._discover)
                nursery.start_soon(self._dial_loop)
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._start_rounds)
                nursery.start_soon(self.learner.record_loop)
                log.info(
                    "node %s listening on %s (federation %r)",
                    self.id,
                    ", ".join(self.listen_addresses),
                    self.config.federation,
                )
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._say_goodbye()
            self.close()

    async def stop(self) -> None:
        """Clean shutdown: tell peers we leave, then cancel everything."""
        self._stopping = True
        await self._say_goodbye()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _say_goodbye(self) -> None:
        links = list(self._links.values())
        self._links.clear()
        if not links:
            return
        payload = codec.encode(Bye(self.id, self.machine.round, "shutdown"))
        with trio.move_on_after(1.0):
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(self._send_bye_and_close, link, payload)

    async def _send_bye_and_close(self, link: Link, payload: bytes) -> None:
        try:
            with trio.move_on_after(0.5):
                await link.conn.send(payload)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        link.scope.cancel()
        with trio.move_on_after(0.5):
            await link.conn.aclose()

    def _ready_peers(self) -> int:
        """Connected peers we can run a round with (with secure aggregation: keyed ones)."""
        connected = self.peers.connected_ids()
        if self.secure is None:
            return len(connected)
        return sum(1 for p in connected if p in self.secure.store)

    async def _start_rounds(self) -> None:
        need = min(self.config.min_peers, self.config.max_peers)
        last_note = trio.current_time()
        while self._ready_peers() < need:
            await self._peers_changed.wait()
            if trio.current_time() - last_note > 10:
                log.info("waiting for peers (%d/%d connected)", self.peers.connected_count(), need)
                last_note = trio.current_time()
        # Let the connected peers' hellos (their rounds) arrive first, so a restarted node
        # catches up from several peers rather than the first one that spoke.
        with trio.move_on_after(HELLO_GRACE):
            while not set(self.peers.connected_ids()) <= self._hello_from:
                await self._peers_changed.wait()
        self._round_started_at = trio.current_time()
        self._apply(self.machine.start(trio.current_time(), self.peers.connected_ids()))

    # ---- the round machine's actions ---------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Train):
                self.learner.round_started(action.round, action.params)
                if self.secure is not None:
                    self._announce_groups(action.round)
                assert self._nursery is not None
                self._nursery.start_soon(self._train, action.round, action.params)
            elif isinstance(action, Broadcast):
                self._broadcast(action)
            elif isinstance(action, Aggregated):
                self._on_aggregated(action)
            elif isinstance(action, RequestUpdates):
                ask = codec.encode(UpdateRequest(self.id, action.round))
                for peer in action.to:
                    self._enqueue(peer, ask)
                self.counters["update_requests_sent"] += len(action.to)
            elif isinstance(action, RequestState):
                payload = codec.encode(StateRequest(self.id, self.machine.round))
                for peer in action.to:
                    self._enqueue(peer, payload)
                log.info("behind peers: asking %d of them for their model", len(action.to))
            elif isinstance(action, CaughtUp):
                log.info(
                    "caught up from round %d to round %d (median of %d peers)",
                    action.from_round,
                    action.round,
                    len(action.sources),
                )
                self.counters["catch_ups"] += 1
                self._round_started_at = trio.current_time()
                self._checkpoint()
            elif isinstance(action, Rejected):
                self._count_rejection(action.peer, action.reason, f"round {action.round}")
            elif isinstance(action, Finished):
                log.info("finished %d rounds", action.round)
                self.learner.finish()  # after the last round's records
        self._wakeup.set()

    def _broadcast(self, action: Broadcast) -> None:
        """Our model for a round goes to the neighbours: masked inside the neighbours'
        groups with secure aggregation, otherwise one (maybe compressed) payload for all."""
        params = self.learner.outgoing(action.round, action.params)
        if params is None:
            return  # a silent attacker
        if self.secure is not None:
            self._send_secure(self.secure.contribute(action.round, params))
            self._secure_progress(trio.current_time())
            return
        started = time.perf_counter()
        payloads = self.outbox.payloads(action.round, params, action.samples, action.to)
        self._timing["encode_s"] = time.perf_counter() - started
        for peer, payload in payloads.items():
            if not self._enqueue(peer, payload):
                self.outbox.dropped(peer)
            else:
                self._links[peer].update_queued(action.round)

    def _announce_groups(self, round: int) -> None:
        """As our training starts: fix the round's neighbours and announce their groups."""
        assert self.secure is not None
        to = self.machine.preselect(round, self.peers.connected_ids())
        self._send_secure(self.secure.announce(round, to, trio.current_time()))
        # No _secure_progress here: we are training, and finished means wait in the
        # driver until _broadcast moves us to collecting.

    def _send_secure(self, sends: list[Send]) -> None:
        for send in sends:
            payload = codec.encode(to_envelope(send.message))
            for peer in send.to:
                self._enqueue(peer, payload)

    def _secure_progress(self, now: float) -> None:
        """Hand finished group means to the round machine once it collects that round
        (our own training may still run: the means wait in the driver until then)."""
        assert self.secure is not None
        if self.machine.phase is not Phase.COLLECTING:
            return
        result = self.secure.take_result(self.machine.round)
        if result is None:
            return
        if result.dropped:
            log.info(
                "secure round %d: %d groups dropped (%s)",
                result.round,
                len(result.dropped),
                ", ".join(r for _, r in result.dropped),
            )
        self._apply(
            self.machine.receive_group_means(now, result.round, result.means, result.counts)
        )
        self._wakeup.set()

    async def _train(self, round: int, params: np.ndarray) -> None:
        new, self._timing["train_s"] = await self.learner.train(round, params)
        self._apply(
            self.machine.trained(
                trio.current_time(), round, new, self.learner.samples, self.peers.connected_ids()
            )
        )

    def _on_aggregated(self, agg: Aggregated) -> None:
        now = trio.current_time()
        self.learner.overhear(agg.received)
        row: dict[str, Any] = {
            "round": agg.round,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "seconds": round(now - self._round_started_at, 4),
            "peers_heard": len(agg.senders),
            "timed_out": agg.timed_out,
            "update_raw_bytes": self.outbox.last_sizes[0],
            "update_wire_bytes": self.outbox.last_sizes[1],
            # Where the round's CPU went (real seconds, also under a mock clock).
            "timing": {k: round(v, 6) for k, v in sorted(self._timing.items())},
        }
        self._timing.clear()
        self._round_started_at = now
        if agg.timed_out:
            self.counters["timeouts"] += 1
        self.last_aggregation = {
            "round": agg.round,
            "rule": agg.rule,
            "inputs_used": len(agg.senders) + 1,
            "senders": list(agg.senders),
            "rejected": [{"peer": p, "reason": r} for p, r in agg.rejected],
            "timed_out": agg.timed_out,
            "fallbacks": getattr(self.machine.rule, "fallbacks", 0),
            "fallback": getattr(self.machine.rule, "last_fallback", None),
        }
        self.learner.record_round(agg.params, row, self.peers.connected_count())
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Snapshot the round machine's state and the compression streams now; the
        learner writes it in order with its other records."""
        self.learner.checkpoint(self.machine.round, self.machine.params, self.outbox.state())

    def _count_rejection(self, peer: str, reason: str, what: str) -> None:
        self.frames_rejected[reason] += 1
        rec = self.peers.peers.get(peer)
        if rec is not None:
            rec.rejected += 1
        level = logging.DEBUG if reason in ("stale", "duplicate") else logging.WARNING
        log.log(level, "rejected message from %s (%s): %s", peer[:12], what, reason)

    # ---- timers ------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            deadlines = [self.machine.next_wakeup]
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
                        self._send_secure(self.secure.on_timeout(now))
                        self._secure_progress(now)
                    self._apply(self.machine.tick(now))
                if self.supervisor.total != before:
                    await trio.sleep(FAILED_TICK_PAUSE)  # never spin on a failing deadline

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            await trio.sleep(self.config.heartbeat_interval)
            beats += 1
            with self.supervisor.guard("heartbeat"):
                self._heartbeat(beats)

    def _heartbeat(self, beats: int) -> None:
        now = trio.current_time()
        self._ping_nonce += 1
        ping = codec.encode(Ping(self.id, self.machine.round, self._ping_nonce, now))
        exchange = None
        if self.config.peer_exchange and beats % PEER_EXCHANGE_EVERY == 0:
            exchange = self._peer_list_payload()
        interval = self.config.heartbeat_interval
        for peer in list(self._links):
            # Any message proves a peer alive: ping only peers that were quiet for
            # an interval, plus an RTT sample every few beats. In a large mesh this
            # halves heartbeat traffic, which otherwise swamps in-process runs.
            rec = self.peers.peers[peer]
            quiet = rec.last_seen is None or now - rec.last_seen >= 0.9 * interval
            if quiet or beats % RTT_SAMPLE_EVERY == 0:
                self._enqueue(peer, ping)
                self.peers.pinged(peer, now)
            if exchange is not None:
                self._enqueue(peer, exchange)
        self.machine.unresponsive = frozenset(
            self.peers.unresponsive_peers(now, after=2.0 * interval)
        )
        for peer in self.peers.silent_peers(now, self.config.heartbeat_timeout):
            silent = self._links.get(peer)
            if silent is not None:
                # Logged once, as the link ends (`_serve`).
                silent.close_reason = (
                    f"heartbeat timeout (silent for {self.config.heartbeat_timeout:.1f}s)"
                )
                self.counters["heartbeat_failures"] += 1
                silent.closed_state = PeerState.FAILED
                silent.scope.cancel()

    # ---- connections -------------------------------------------------------------------

    async def _discover(self) -> None:
        """mDNS finds peers on the LAN; it is discovery only (liveness is heartbeats).

        A TXT record's peer id is only a claim: we dial with it as the expected id, so a
        spoofed record fails the TLS check and its address is held off.
        """
        from p2pfl.discovery.mdns import default_interfaces, run_mdns
        from p2pfl.transport.tcp import parse_address

        host, port = parse_address(self.listen_addresses[0])
        interfaces = list(self.config.mdns_interfaces) or default_interfaces(host)
        if not interfaces:
            log.warning("mDNS: no IPv4 interface for listen address %s; discovery off", host)
            return
        try:
            await run_mdns(
                peer_id=self.id,
                federation=self.config.federation,
                port=port,
                address=host,
                interfaces=interfaces,
                on_found=self._on_mdns_found,
                on_removed=self._on_mdns_removed,
                on_ignored=self._on_mdns_ignored,
            )
        except (OSError, ValueError) as exc:
            log.warning("mDNS unavailable on %s (%s); using bootstrap peers only", interfaces, exc)

    def _on_mdns_found(self, peer_id: str, address: str) -> None:
        with self.supervisor.guard("mdns", peer_id):
            self._add_mdns_peer(peer_id, address)

    def _add_mdns_peer(self, peer_id: str, address: str) -> None:
        if peer_id != self.id and self.peers.add_address(
            address, peer_id=peer_id, found_via="mdns"
        ):
            log.info("mDNS: found %s at %s", peer_id[:12], address)
            self._notify_peers_changed()

    def _on_mdns_ignored(self, service: str, reason: str) -> None:
        self.counters[f"mdns_ignored_{reason}"] += 1
        log.debug("mDNS: ignored %s (%s)", service, reason)

    def _on_mdns_removed(self, peer_id: str) -> None:
        # Its goodbye: don't redial soon. An open connection stays until TCP says otherwise.
        self.peers.hold_off_peer(peer_id, trio.current_time(), 30.0)

    async def _dial_loop(self) -> None:
        while True:
            now = trio.current_time()
            assert self._nursery is not None
            for target in self.peers.due_targets(now):
                self.peers.dial_started(target.address)
                self._nursery.start_soon(
                    self._dial, target.address, target.peer_id, target.found_via
                )
            with trio.move_on_after(0.25):
                await self._peers_changed.wait()

    async def _dial(self, address: str, expected: str | None, found_via: str) -> None:
        with self.supervisor.guard("dial", expected):
            await self._dial_unguarded(address, expected, found_via)

    async def _dial_unguarded(self, address: str, expected: str | None, found_via: str) -> None:
        try:
            with trio.fail_after(10):
                conn = await self.transport.connect(address, expected)
        except HandshakeError as exc:
            self.peers.dial_failed(address, trio.current_time())
            self.peers.hold_off(address, trio.current_time(), MISMATCH_HOLD_OFF)
            self.counters["handshake_failures"] += 1
            log.warning("refused %s: %s", address, exc)
            return
        except (OSError, trio.TooSlowError) as exc:
            delay = self.peers.dial_failed(address, trio.current_time())
            self.counters["dial_failures"] += 1
            log.debug("dial %s failed (%s); retry in %.1fs", address, exc, delay)
            return
        except Exception:
            # Anything else (an address no transport can dial, a bug) backs off like a
            # failed dial and is contained by the caller's guard.
            self.peers.dial_failed(address, trio.current_time())
            self.counters["dial_failures"] += 1
            raise
        self.peers.dial_succeeded(address, conn.peer_id)
        opened = trio.current_time()
        try:
            with self.supervisor.guard("connection", conn.peer_id):
                await self._serve(conn, found_via, address)
        finally:
            now = trio.current_time()
            self.peers.connection_ended(
                address, now, now - opened, stable=self.config.heartbeat_timeout
            )

    async def _on_inbound(self, conn: Connection) -> None:
        with self.supervisor.guard("connection", conn.peer_id):
            target = next(
                (t for t in self.peers.targets.values() if t.peer_id == conn.peer_id), None
            )
            await self._serve(conn, target.found_via if target else "inbound", None)

    def _preferred(self, outbound: bool, peer: str) -> bool:
        """Of two connections between a pair, both sides keep the one the smaller id dialed."""
        return outbound == (self.id < peer)

    async def _serve(self, conn: Connection, found_via: str, dialed: str | None) -> None:
        peer = conn.peer_id
        if peer == self.id:
            if dialed is not None:
                self.peers.targets[dialed].is_self = True
            await conn.aclose()
            return
        if self.config.allow and peer not in self.config.allow:
            self.counters["not_admitted"] += 1
            log.warning("peer %s is not in the allow list; closing", peer[:12])
            await conn.aclose()
            return
        if self._stopping:
            await conn.aclose()
            return
        link = Link(conn, peer, found_via)
        existing = self._links.get(peer)
        if existing is None:
            self._links[peer] = link
            rec = self.peers.connected(peer, now=trio.current_time(), found_via=found_via)
            if rec.connects > 1:
                self.counters["reconnects"] += 1
            self.outbox.peer_connected(peer)
            self._notify_peers_changed()
            self._send_greeting(peer)
        elif self._preferred(conn.outbound, peer) and not self._preferred(
            existing.conn.outbound, peer
        ):
            self._links[peer] = link
            self._send_greeting(peer)
            self._retire(existing, successor=link)
        else:
            self._retire(link, successor=None)
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, link)
                    await self._reader(link)
                    nursery.cancel_scope.cancel()
        finally:
            if self._links.get(peer) is link:
                del self._links[peer]
                if link.close_reason is not None and link.closed_state is not PeerState.LEFT:
                    # One line per lost peer (a Bye was logged as "left" already).
                    log.warning("lost peer %s: %s", peer[:12], link.close_reason)
                with self.supervisor.guard("peer_lost", peer):
                    self._forget_link(peer, link)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.aclose()

    def _forget_link(self, peer: str, link: Link) -> None:
        """The peer's only link closed: every component lets go of it."""
        self.peers.disconnected(peer, link.closed_state)
        self._decoder.forget(peer)
        if self.secure is not None:
            now = trio.current_time()
            self._send_secure(self.secure.peer_gone(peer, now))
            self._secure_progress(now)
        self._notify_peers_changed()
        self._apply(self.machine.peer_lost(trio.current_time(), peer))

    def _send_greeting(self, peer: str) -> None:
        hello = Hello(
            self.id,
            self.machine.round,
            self.config.federation,
            tuple(self.listen_addresses),
            __version__,
            self.fingerprint.digest,
        )
        self._enqueue(peer, codec.encode(hello))
        if self.secure is not None:
            key = self.secure.key_message(self.machine.round)
            self._enqueue(peer, codec.encode(to_envelope(key)))
        if self.config.peer_exchange:
            self._enqueue(peer, self._peer_list_payload())

    def _retire(self, link: Link, *, successor: Link | None) -> None:
        """Stop sending on a duplicate connection, but keep reading it for a grace period.

        When both sides dial at once, each keeps the connection the smaller id dialed.
        Messages the peer wrote on the other one before it saw the duplicate are still
        read, and our unsent ones move to the successor, so nothing is lost in the swap.
        """
        if link.retired:
            return
        link.retired = True
        if successor is not None:
            link.move_unsent_to(successor)
        assert self._nursery is not None
        self._nursery.start_soon(self._close_later, link)

    async def _close_later(self, link: Link) -> None:
        await trio.sleep(RETIRE_GRACE)
        link.scope.cancel()

    def _notify_peers_changed(self) -> None:
        self._peers_changed.set()
        self._peers_changed = trio.Event()

    def _enqueue(self, peer: str, payload: bytes) -> bool:
        """Queue a message for a peer without ever blocking the caller; False if dropped.

        The queue is bounded in bytes: a peer that stops reading loses messages (and
        the drop is counted) instead of making us hold unbounded memory for it.
        """
        link = self._links.get(peer)
        if link is None:
            self.counters["send_no_connection"] += 1
            return False
        limit = max(8 * 1024 * 1024, 3 * 4 * self.machine.params.size)
        if not link.offer(payload, limit):
            self.counters["send_queue_full"] += 1
            now = trio.current_time()
            if now - link.last_drop_logged >= LOG_EVERY:  # one line, not one per message
                link.last_drop_logged = now
                log.warning(
                    "peer %s is not reading; dropping messages (%d so far)",
                    peer[:12],
                    self.counters["send_queue_full"],
                )
            return False
        return True

    def _update_in_flight(self, peer: str, round: int) -> bool:
        current = self._links.get(peer)  # requests may come in on a retiring duplicate
        return current is not None and current.update_in_flight(round)

    async def _writer(self, link: Link) -> None:
        rec = self.peers.peers[link.peer_id]

        def written(n: int) -> None:
            rec.bytes_out += n
            self.bytes_sent += n

        await link.pump(written)

    async def _reader(self, link: Link) -> None:
        peer = link.peer_id
        rec = self.peers.peers[peer]
        while True:
            try:
                payload = await link.conn.receive()
            except (
                ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ) as exc:
                link.close_reason = link.close_reason or closed_cause(exc)
                return
            except WireError as exc:
                # A framing error leaves the stream unusable: hang up on this peer only.
                self._count_rejection(peer, exc.reason, exc.detail)
                link.close_reason = f"bad framing ({exc.reason})"
                return
            n = len(payload) + 4
            rec.bytes_in += n
            rec.messages_in += 1
            self.bytes_received += n
            try:
                msg = codec.decode(payload, limits=self.limits)
            except WireError as exc:
                self._count_rejection(peer, exc.reason, exc.detail)
                link.bad_messages += 1
                if link.bad_messages > MAX_BAD_MESSAGES:
                    log.warning(
                        "peer %s sent %d bad messages; closing", peer[:12], link.bad_messages
                    )
                    return
                continue
            if msg.sender != peer:
                self._count_rejection(peer, "spoofed_sender", f"claims to be {msg.sender[:12]}")
                continue
            rec.last_seen = trio.current_time()
            before = self.supervisor.total
            keep = True
            with self.supervisor.guard(f"message:{msg.TYPE}", peer):
                keep = self._dispatch(link, msg)
            if self.supervisor.total != before:
                # The message was dropped; a peer whose messages keep failing is cut off.
                link.bad_messages += 1
                if link.bad_messages > MAX_BAD_MESSAGES:
                    log.warning("peer %s: too many failed messages; closing", peer[:12])
                    return
            if keep is False:
                return

    def _dispatch(self, link: Link, msg: Message) -> bool:
        """Handle one message. Returns False to close the connection."""
        now = trio.current_time()
        peer = link.peer_id
        rec = self.peers.peers[peer]
        match msg:
            case SecureEnvelope():
                if self.secure is None:
                    self._count_rejection(peer, "secure_not_enabled", msg.kind)
                    return True
                try:
                    secure_msg = from_envelope(msg, max_dim=self.model.num_params)
                except WireError as exc:
                    self._count_rejection(peer, exc.reason, exc.detail)
                    return True
                self._send_secure(self.secure.on_message(peer, secure_msg, now))
                self._secure_progress(now)
                if secure_msg.TYPE == "sa_key":
                    self._notify_peers_changed()  # a peer became ready for secure rounds
            case ModelUpdate() | CompressedModelUpdate() if self.secure is not None:
                # Plain updates would defeat the point: every neighbour must mask.
                self._count_rejection(peer, "plain_update_in_secure_mode", f"round {msg.round}")
            case CompressedModelUpdate():
                try:
                    params = self._decoder.decode(peer, msg.round, msg.blob)
                except WireError as exc:
                    self._count_rejection(peer, exc.reason, exc.detail)
                    return True
                self._apply(self.machine.receive_update(now, peer, msg.round, params, msg.samples))
            case ModelUpdate():
                self._apply(
                    self.machine.receive_update(now, peer, msg.round, msg.params, msg.samples)
                )
            case Ping():
                rec.round = msg.round
                self._enqueue(
                    peer, codec.encode(Pong(self.id, self.machine.round, msg.nonce, msg.sent_at))
                )
                self._apply(self.machine.observe_peer_round(now, peer, msg.round))
            case Pong():
                rec.round = msg.round
                self.peers.ponged(peer)
                if msg.sent_at <= now:
                    rec.rtt = now - msg.sent_at
                self._apply(self.machine.observe_peer_round(now, peer, msg.round))
            case Hello():
                if msg.federation != self.config.federation:
                    self._count_rejection(peer, "wrong_federation", msg.federation)
                    return False
                if msg.fingerprint != self.fingerprint.digest:
                    self._refuse_incompatible(link, msg.fingerprint, now)
                    return False
                rec.refused = None
                rec.round = msg.round
                if peer not in self._hello_from:
                    self._hello_from.add(peer)
                    self._notify_peers_changed()
                host = _host_of(link.conn.remote_address)
                for address in msg.listen[:8]:
                    self.peers.set_listen_address(peer, _advertised(address, host))
                self._apply(self.machine.observe_peer_round(now, peer, msg.round))
            case PeerList():
                if self.config.peer_exchange:
                    for peer_id, address in msg.peers[:64]:
                        if self.peers.add_address(
                            address, peer_id=peer_id, found_via="peer-exchange"
                        ):
                            self._notify_peers_changed()
            case UpdateRequest() if self._update_in_flight(peer, msg.round):
                self.counters["resend_requests_in_flight"] += 1  # still queued: coming
            case UpdateRequest():
                payload = self.outbox.resend(peer, msg.round)
                if payload is not None and self._enqueue(peer, payload):
                    self._links[peer].update_queued(msg.round)
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
                    state = StateReply(
                        self.id, self.machine.round, self.machine.params, self.learner.samples
                    )
                    self._enqueue(peer, codec.encode(state))
            case StateRequest() if now - link.last_state_reply < STATE_REPLY_EVERY:
                # A 40-byte request must not buy a full model at line rate.
                self.counters["state_requests_throttled"] += 1
            case StateRequest():
                link.last_state_reply = now
                self._enqueue(
                    peer,
                    codec.encode(
                        StateReply(
                            self.id, self.machine.round, self.machine.params, self.learner.samples
                        )
                    ),
                )
            case StateReply():
                self._apply(self.machine.receive_state(now, peer, msg.round, msg.params))
            case Bye():
                log.info("peer %s left (%s)", peer[:12], msg.reason or "bye")
                link.closed_state = PeerState.LEFT
                self.peers.hold_off_peer(peer, now, 2.0)
                return False
        return True

    def _refuse_incompatible(self, link: Link, theirs: str, now: float) -> None:
        """A peer with another model or task can never learn with us: close, say why
        once per peer, show it in status, and do not redial it for a while."""
        peer = link.peer_id
        why = self.fingerprint.difference(theirs) or "another model"
        self.counters["incompatible_peers"] += 1
        rec = self.peers.peers.get(peer)
        if rec is not None:
            rec.refused = why
        link.closed_state = PeerState.REFUSED
        self.peers.hold_off_peer(peer, now, MISMATCH_HOLD_OFF)
        if (peer, theirs) not in self._refused_logged:
            self._refused_logged.add((peer, theirs))
            log.warning(
                "refusing peer %s: its %s; every node of a federation needs the same model "
                "and task",
                peer[:12],
                why,
            )

    def _peer_list_payload(self) -> bytes:
        return codec.encode(
            PeerList(self.id, self.machine.round, tuple(self.peers.exchange_list()))
        )

    # ---- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        params = self.machine.params
        return {
            "node": {
                "id": self.id,
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "listen": self.listen_addresses,
                "federation": self.config.federation,
                "uptime_s": round(now - self._started, 3),
                "pid": os.getpid(),
                "data_dir": str(self.data_dir),
                "role": self.role,
                "index": self.config.node_index,
            },
            "round": {
                "current": self.machine.round,
                "phase": str(self.machine.phase),
                "target": self.config.rounds or None,
                "heard": len(self.machine.received_this_round),
                "expected": self.machine.expected_this_round,
            },
            "model": {
                "name": self.config.model,
                "version": self.machine.round,
                "hash": hashlib.sha256(params.tobytes()).hexdigest()[:16],
                "params": int(params.size),
            },
            "last_aggregation": self.last_aggregation,
            "compression": None
            if not self.outbox.compressing
            else {
                "pipeline": list(self.config.compression),
                "raw_bytes": self.outbox.last_sizes[0],
                "wire_bytes": self.outbox.last_sizes[1],
                "ratio": round(self.outbox.last_sizes[0] / max(1, self.outbox.last_sizes[1]), 2),
            },
            "secure": None if self.secure is None else self.secure.status(),
            "history": self.history[-1000:],
            "peers": self.peers.snapshot(now),
            "counters": {
                "faults_injected": dict(counts())
                if callable(counts := getattr(self.transport, "counts", None))
                else None,
                "frames_rejected": dict(self.frames_rejected),
                "contained_errors": dict(self.supervisor.contained),
                "reconnects": self.counters["reconnects"],
                "timeouts": self.counters["timeouts"],
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                **{k: v for k, v in self.counters.items() if k not in ("reconnects", "timeouts")},
            },
        }

    @property
    def phase(self) -> Phase:
        return self.machine.phase

    # The learner's parts, where tools and tests have always found them.

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
        return self.learner.history

    @property
    def done(self) -> trio.Event:
        """Set once the last round's records are written."""
        return self.learner.done


def _host_of(address: str) -> str:
    host = address.rpartition(":")[0]
    return host.strip("[]")


def _advertised(address: str, observed_host: str) -> str:
    """A peer listening on 0.0.0.0/:: is reachable at the address we see it from."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", "") and observed_host:
        host = f"[{observed_host}]" if ":" in observed_host else observed_host
    return f"{host}:{port}"


class _TimedRule:
    """The aggregation rule, timed into the round's metrics row; otherwise the rule
    itself (its fallback counters and name read through)."""

    def __init__(self, rule: Rule, timing: dict[str, float]) -> None:
        self.rule = rule
        self.timing = timing

    def __call__(self, x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.rule(x, weights, own)
        finally:
            self.timing["aggregate_s"] = time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rule, name)
