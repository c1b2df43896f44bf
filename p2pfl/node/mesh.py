"""The node's mesh: connections to its peers, and nothing about learning or rounds.

This is the mesh's surface and its own protocol. It queues outbound messages without
ever blocking the caller, writes each link, handles the messages that are the mesh's
own (a Hello of the same federation and model fingerprint, heartbeats, peer exchange,
goodbye), keeps peers alive with heartbeats (closing silent ones), learns addresses by
peer exchange and mDNS, and says goodbye on the way out. Dialing, serving and
admission live in `connections.py`, reading links in `intake.py`, mDNS in
`mdns_peers.py`. Everything else a peer sends goes up to the daemon through the
callbacks given at construction; the mesh never imports the daemon or touches the round
machine. Each dial, connection and message runs inside the supervisor's guard
(docs/architecture.md, "The supervision boundary").
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Callable

import trio

from p2pfl.config import NodeConfig
from p2pfl.learning.fingerprint import Fingerprint
from p2pfl.logs import event
from p2pfl.membership import PeerState, PeerTable
from p2pfl.node.connections import MISMATCH_HOLD_OFF, Connections
from p2pfl.node.intake import Intake
from p2pfl.node.link import Link
from p2pfl.node.mdns_peers import MdnsPeers
from p2pfl.node.transports import bound_transport
from p2pfl.supervision import Supervisor
from p2pfl.transport.base import Transport
from p2pfl.wire import codec
from p2pfl.wire.messages import Bye, Hello, Message, PeerList, Ping, Pong

log = logging.getLogger("p2pfl.node")

PEER_EXCHANGE_EVERY = 10  # heartbeats
RTT_SAMPLE_EVERY = 5  # heartbeats
QUIET_FRACTION = 0.9  # of an interval without a message from a peer: it is quiet
ASK_AFTER = 1.9  # intervals a peer may stay quiet while we send to it (< timeout / 3)
MESH_MESSAGES = frozenset({Ping, Pong, Hello, PeerList, Bye})  # handled here, not upstream
BEAT_SLACK = 0.02  # of an interval: heartbeats this close together wake together
LOG_EVERY = 10.0  # seconds between repeated warnings about one peer


class Mesh:
    """Links to peers: the surface the daemon uses, heartbeats and the mesh's own messages.

    Its parts: `connections` (dialing, serving, admission), `intake` (reading links),
    and mDNS (`MdnsPeers`) when enabled.

    Reports to its owner only through the callbacks:
    `current_round()` for the round our messages carry; `on_connected(peer)` when a peer
    gets its first link; `greeting()` for the payloads that follow our Hello on every
    new link; `on_message(link, msg)` for every message that is not the mesh's own
    (False closes the link); `on_peer_round(peer, round, now)` when a peer says its
    round; `on_unresponsive(peers)` after each heartbeat; `on_lost(peer)` when a peer's
    only link is gone.
    """

    def __init__(
        self,
        config: NodeConfig,
        peer_id: str,
        transport: Transport,
        *,
        num_params: int,
        fingerprint: Fingerprint,
        supervisor: Supervisor,
        counters: Counter[str],
        current_round: Callable[[], int],
        on_connected: Callable[[str], None],
        greeting: Callable[[], list[bytes]],
        on_message: Callable[[Link, Message], bool],
        on_peer_round: Callable[[str, int, float], None],
        on_unresponsive: Callable[[frozenset[str]], None],
        on_lost: Callable[[str], None],
        offload: bool = False,
    ) -> None:
        self.config = config
        # Decode large payloads in a worker thread (a real node; a simulation under a
        # mock clock decodes inline, so its time stays deterministic).
        self.offload = offload
        self.id = peer_id
        self.transport = transport
        self.fingerprint = fingerprint
        self.supervisor = supervisor
        self.counters = counters
        self.current_round = current_round
        self.on_connected = on_connected
        self.greeting = greeting
        self.on_message = on_message
        self.on_peer_round = on_peer_round
        self.on_unresponsive = on_unresponsive
        self.on_lost = on_lost

        self.limits = bound_transport(transport, config, num_params)
        # A peer's outbound queue holds a few models' worth of bytes, never unbounded.
        self.queue_limit = max(8 * 1024 * 1024, 3 * 4 * num_params)
        self.peers = PeerTable(self.id, max_peers=config.max_peers, seed=config.seed)
        for address in config.peers:
            self.peers.add_address(address, peer_id=None, found_via="bootstrap")
        self.frames_rejected: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.listen_addresses: list[str] = []
        self.links: dict[str, Link] = {}
        self.hello_from: set[str] = set()  # peers whose Hello we accepted
        self.stopping = False
        self._nursery: trio.Nursery | None = None
        self._peers_changed = trio.Event()
        self._ping_nonce = 0
        self.pings_sent = 0  # heartbeat pings, all links (liveness rides on traffic)
        self._refused_logged: set[tuple[str, str]] = set()
        self.intake = Intake(self, self._handle)
        self.connections = Connections(self)

    # ---- running -----------------------------------------------------------------------

    async def listen(self, nursery: trio.Nursery) -> None:
        """Serve inbound connections (as tasks of `nursery`) from now on."""
        self._nursery = nursery
        self.listen_addresses = await nursery.start(
            self.transport.listen, self.connections.on_inbound
        )

    def start(self, nursery: trio.Nursery) -> None:
        """Start discovery, dialing and heartbeats (after `listen`)."""
        if self.config.mdns and not self.config.listen.startswith("mem:"):
            nursery.start_soon(MdnsPeers(self).run)
        nursery.start_soon(self.connections.dial_loop)
        nursery.start_soon(self._heartbeat_loop)

    async def say_goodbye(self) -> None:
        links = list(self.links.values())
        self.links.clear()
        if not links:
            return
        payload = codec.encode(Bye(self.id, self.current_round(), "shutdown"))
        with trio.move_on_after(1.0):
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(self._send_bye_and_close, link, payload)

    async def _send_bye_and_close(self, link: Link, payload: bytes) -> None:
        await link.say_bye(payload)
        link.scope.cancel()
        with trio.move_on_after(0.5):
            await link.conn.aclose()

    @property
    def nursery(self) -> trio.Nursery:
        """Where links and dials run: the nursery `listen` was given."""
        assert self._nursery is not None
        return self._nursery

    def notify_peers_changed(self) -> None:
        self._peers_changed.set()
        self._peers_changed = trio.Event()

    async def peers_changed(self) -> None:
        """Wait for the next change of who is connected, known or ready."""
        await self._peers_changed.wait()

    # ---- sending -----------------------------------------------------------------------

    def enqueue(self, peer: str, payload: bytes, *, urgent: bool = False) -> bool:
        """Queue a message for a peer without ever blocking the caller; False if dropped.

        The queue is bounded in bytes: a peer that stops reading loses messages (and
        the drop is counted) instead of making us hold unbounded memory for it.
        Heartbeats are `urgent`: written ahead of queued model updates.
        """
        link = self.links.get(peer)
        if link is None:
            self.counters["send_no_connection"] += 1
            return False
        if not link.offer(payload, self.queue_limit, urgent=urgent):
            self.counters["send_queue_full"] += 1
            now = trio.current_time()
            if now - link.last_drop_logged >= LOG_EVERY:  # one line, not one per message
                link.last_drop_logged = now
                log.warning(
                    "peer %s is not reading; dropping messages (%d so far)",
                    peer[:12],
                    self.counters["send_queue_full"],
                    extra=event(
                        "peer.send_dropped", peer=peer, dropped=self.counters["send_queue_full"]
                    ),
                )
            return False
        return True

    def update_in_flight(self, peer: str, round: int) -> bool:
        current = self.links.get(peer)  # requests may come in on a retiring duplicate
        return current is not None and current.update_in_flight(round)

    def count_rejection(self, peer: str, reason: str, what: str) -> None:
        self.frames_rejected[reason] += 1
        rec = self.peers.peers.get(peer)
        if rec is not None:
            rec.rejected += 1
        level = logging.DEBUG if reason in ("stale", "duplicate") else logging.WARNING
        log.log(
            level,
            "rejected message from %s (%s): %s",
            peer[:12],
            what,
            reason,
            extra=event("message.rejected", peer=peer, reason=reason, what=what),
        )

    def peer_list_payload(self) -> bytes:
        return codec.encode(
            PeerList(self.id, self.current_round(), tuple(self.peers.exchange_list()))
        )

    # ---- one link: its writer and the mesh's own messages -----------------------------

    async def write(self, link: Link) -> None:
        """A link's writer: drains its queues, counting the bytes written."""
        rec = self.peers.peers[link.peer_id]

        def written(n: int) -> None:
            rec.bytes_out += n
            self.bytes_sent += n

        await link.pump(written)

    def _handle(self, link: Link, msg: Message) -> bool:
        """Handle the mesh's own messages (hello, heartbeats, peer exchange, goodbye) and
        hand the others to the daemon. Returns False to close the connection.
        The intake calls it for every message a link delivers."""
        if type(msg) not in MESH_MESSAGES:  # most of them: updates and requests
            return self.on_message(link, msg)
        now = trio.current_time()
        peer = link.peer_id
        rec = self.peers.peers[peer]
        match msg:
            case Ping():
                rec.round = msg.round
                pong = Pong(self.id, self.current_round(), msg.nonce, msg.sent_at)
                self.enqueue(peer, codec.encode(pong), urgent=True)
                self.on_peer_round(peer, msg.round, now)
            case Pong():
                rec.round = msg.round
                self.peers.ponged(peer)
                if msg.sent_at <= now:
                    rec.rtt = now - msg.sent_at
                self.on_peer_round(peer, msg.round, now)
            case Hello():
                if msg.federation != self.config.federation:
                    self.count_rejection(peer, "wrong_federation", msg.federation)
                    return False
                if msg.fingerprint != self.fingerprint.digest:
                    self._refuse_incompatible(link, msg.fingerprint, now)
                    return False
                rec.refused = None
                rec.round = msg.round
                if peer not in self.hello_from:
                    self.hello_from.add(peer)
                    self.notify_peers_changed()
                host = _host_of(link.conn.remote_address)
                for address in msg.listen[:8]:
                    self.peers.set_listen_address(peer, _advertised(address, host))
                self.on_peer_round(peer, msg.round, now)
            case PeerList():
                if self.config.peer_exchange:
                    for peer_id, address in msg.peers[:64]:
                        if self.peers.add_address(
                            address, peer_id=peer_id, found_via="peer-exchange"
                        ):
                            self.notify_peers_changed()
            case Bye():
                log.info(
                    "peer %s left (%s)",
                    peer[:12],
                    msg.reason or "bye",
                    extra=event("peer.disconnected", peer=peer, how="left", reason=msg.reason),
                )
                link.closed_state = PeerState.LEFT
                self.peers.hold_off_peer(peer, now, 2.0)
                return False
            case _:
                return self.on_message(link, msg)
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
                extra=event("peer.refused", peer=peer, reason="incompatible", detail=why),
            )

    # ---- heartbeats --------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        beats = 0
        metronome = Metronome.current()
        interval = self.config.heartbeat_interval
        while True:
            await metronome.sleep_until(trio.current_time() + interval, slack=BEAT_SLACK * interval)
            beats += 1
            with self.supervisor.guard("heartbeat"):
                self._heartbeat(beats)

    def _heartbeat(self, beats: int) -> None:
        now = trio.current_time()
        exchange = None
        if self.config.peer_exchange and beats % PEER_EXCHANGE_EVERY == 0:
            exchange = self.peer_list_payload()
        interval = self.config.heartbeat_interval
        quiet_after = QUIET_FRACTION * interval
        # However busy our side of a link, a peer quiet this long is asked: a peer
        # only keeps quiet on a link that carries our traffic, so asking is then what
        # makes it speak (and what tells a dead peer from one with nothing to say).
        ask_after = max(quiet_after, min(ASK_AFTER * interval, self.config.heartbeat_timeout / 3))
        ping = None
        for peer, link in list(self.links.items()):
            # Liveness rides on traffic (docs/protocol.md, "Failure detection"):
            # anything from the peer within the interval shows it alive, anything we
            # sent it since the last beat shows it we are. A ping goes on a link quiet
            # both ways (its Pong speaks for the peer), to a peer quiet for `ask_after`
            # while we keep sending, and on any link not pinged for RTT_SAMPLE_EVERY
            # beats: an RTT sample, and the check that the peer still reads
            # (`unresponsive_peers`).
            rec = self.peers.peers[peer]
            quiet = math.inf if rec.last_seen is None else now - rec.last_seen
            sent = link.offers != link.offers_at_beat
            if beats - link.pinged_at_beat >= RTT_SAMPLE_EVERY or (
                quiet >= quiet_after and (not sent or quiet >= ask_after)
            ):
                link.pinged_at_beat = beats
                if ping is None:
                    self._ping_nonce += 1
                    ping = codec.encode(Ping(self.id, self.current_round(), self._ping_nonce, now))
                self.enqueue(peer, ping, urgent=True)
                self.peers.pinged(peer, now)
                self.pings_sent += 1
            if exchange is not None:
                self.enqueue(peer, exchange)
            link.offers_at_beat = link.offers
        self.on_unresponsive(frozenset(self.peers.unresponsive_peers(now, after=2.0 * interval)))
        for peer, link in self.links.items():
            # A frame still arriving counts as hearing from the peer (TCP transport).
            arrived = getattr(link.conn, "last_activity", None)
            if arrived is not None:
                self.peers.seen(peer, arrived)
        for peer in self.peers.silent_peers(now, self.config.heartbeat_timeout):
            silent = self.links.get(peer)
            if silent is not None:
                # Logged once, as the link ends (`Connections._serve`).
                silent.close_reason = (
                    f"heartbeat timeout (silent for {self.config.heartbeat_timeout:.1f}s)"
                )
                self.counters["heartbeat_failures"] += 1
                silent.closed_state = PeerState.FAILED
                silent.scope.cancel()


class Metronome:
    """Every mesh's heartbeats in one trio run, woken by one task (a system task).

    A timer that expires costs trio a cancellation (an exception raised and caught) and
    a pass of its run loop: about 90 us of CPU, so 1000 in-process nodes beating once a
    second each spent a tenth of the event loop on their timers. Here one task sleeps
    until the earliest heartbeat due and then wakes every heartbeat due within its
    `slack` (a fiftieth of an interval, never late), by an Event each: about 50
    expiries a second instead of 1000. A heartbeat cancelled while it waits leaves its
    entry behind, which fires into an Event nobody waits for.
    """

    _current: trio.lowlevel.RunVar[Metronome] = trio.lowlevel.RunVar("p2pfl_metronome")

    def __init__(self) -> None:
        self._due: list[tuple[float, int, float, trio.Event]] = []  # deadline, seq, earliest
        self._seq = 0
        self._changed = trio.Event()

    @classmethod
    def current(cls) -> Metronome:
        """This trio run's metronome, started on first use."""
        try:
            return cls._current.get()
        except LookupError:
            metronome = cls()
            cls._current.set(metronome)
            trio.lowlevel.spawn_system_task(metronome._run, name="p2pfl heartbeats")
            return metronome

    async def sleep_until(self, deadline: float, *, slack: float = 0.0) -> None:
        """Sleep until `deadline`, or wake up to `slack` seconds sooner with others."""
        woken = trio.Event()
        self._seq += 1
        heapq.heappush(self._due, (deadline, self._seq, deadline - slack, woken))
        if self._due[0][3] is woken:
            self._changed.set()  # the earliest now: the ticking task sleeps less
        await woken.wait()

    async def _run(self) -> None:
        while True:
            changed = self._changed
            with trio.move_on_at(self._due[0][0] if self._due else math.inf):
                await changed.wait()
            if changed.is_set():
                self._changed = trio.Event()
            now = trio.current_time()
            while self._due and self._due[0][2] <= now:
                heapq.heappop(self._due)[3].set()


def _host_of(address: str) -> str:
    host = address.rpartition(":")[0]
    return host.strip("[]")


def _advertised(address: str, observed_host: str) -> str:
    """A peer listening on 0.0.0.0/:: is reachable at the address we see it from."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", "") and observed_host:
        host = f"[{observed_host}]" if ":" in observed_host else observed_host
    return f"{host}:{port}"
