"""The node's mesh: connections to its peers, and nothing about learning or rounds.

It dials and serves, admits a peer (the allow list, one connection per pair, the same
federation and model fingerprint in its Hello), runs a reader and a writer task per
connection (direct in-memory ones: one inbox task for all, and no writer), queues
outbound messages without ever blocking the caller, keeps peers
alive with heartbeats (closing silent ones), learns addresses by peer exchange and
mDNS, and says goodbye on the way out. Everything else a peer sends goes up to the
daemon through the callbacks given at construction; the mesh never imports the daemon
or touches the round machine. Each dial, connection and message runs inside the
supervisor's guard (docs/architecture.md, "The supervision boundary").
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from functools import partial

import trio

from p2pfl import __version__
from p2pfl.config import NodeConfig
from p2pfl.learning.fingerprint import Fingerprint
from p2pfl.logs import event
from p2pfl.membership import PeerState, PeerTable
from p2pfl.node.link import Link, closed_cause
from p2pfl.node.transports import bound_transport
from p2pfl.supervision import Supervisor
from p2pfl.transport.base import Connection, ConnectionClosed, HandshakeError, Transport
from p2pfl.transport.memory import DirectConnection
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import Bye, Hello, Message, PeerList, Ping, Pong

log = logging.getLogger("p2pfl.node")

PEER_EXCHANGE_EVERY = 10  # heartbeats
RTT_SAMPLE_EVERY = 5  # heartbeats
MAX_BAD_MESSAGES = 20  # per connection, before we hang up on the peer
MISMATCH_HOLD_OFF = 60.0  # seconds to ignore an address that proved the wrong id
LOG_EVERY = 10.0  # seconds between repeated warnings about one peer
RETIRE_GRACE = 5.0  # seconds a duplicate connection is still read before closing
OFFLOAD_DECODE_BYTES = 1 << 20  # payloads this large are decoded in a worker thread


class Mesh:
    """Links to peers: dials, serving, per-link reader and writer, heartbeats, discovery.

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
        self._refused_logged: set[tuple[str, str]] = set()
        # Payloads of direct in-memory links, served by one task (`_inbox_loop`).
        self._inbox: deque[tuple[Link, bytes | Exception]] = deque()
        self._inbox_wake = trio.Event()
        self._inbox_running = False

    # ---- running -----------------------------------------------------------------------

    async def listen(self, nursery: trio.Nursery) -> None:
        """Serve inbound connections (as tasks of `nursery`) from now on."""
        self._nursery = nursery
        self.listen_addresses = await nursery.start(self.transport.listen, self._on_inbound)

    def start(self, nursery: trio.Nursery) -> None:
        """Start discovery, dialing and heartbeats (after `listen`)."""
        if self.config.mdns and not self.config.listen.startswith("mem:"):
            nursery.start_soon(self._discover)
        nursery.start_soon(self._dial_loop)
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

    def _peer_list_payload(self) -> bytes:
        return codec.encode(
            PeerList(self.id, self.current_round(), tuple(self.peers.exchange_list()))
        )

    # ---- one link: writer, reader, the mesh's own messages -----------------------------

    async def _writer(self, link: Link) -> None:
        rec = self.peers.peers[link.peer_id]

        def written(n: int) -> None:
            rec.bytes_out += n
            self.bytes_sent += n

        await link.pump(written)

    async def _reader(self, link: Link) -> None:
        while True:
            try:
                item: bytes | Exception = await link.conn.receive()
            except (
                ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                WireError,
            ) as exc:
                item = exc
            if not await self._take(link, item):
                return

    async def _take(self, link: Link, item: bytes | Exception) -> bool:
        """One thing a link's peer sent: a payload to count, decode, check and handle,
        or the error that ends the link (EOF, a reset, bad framing). False ends the link.
        Every link's reader comes here, and so does the inbox of direct links."""
        peer = link.peer_id
        if isinstance(item, WireError):
            # A framing error leaves the stream unusable: hang up on this peer only.
            self.count_rejection(peer, item.reason, item.detail)
            link.close_reason = f"bad framing ({item.reason})"
            return False
        if isinstance(item, Exception):
            link.close_reason = link.close_reason or closed_cause(item)
            return False
        rec = self.peers.peers[peer]
        n = len(item) + 4
        rec.bytes_in += n
        rec.messages_in += 1
        self.bytes_received += n
        try:
            msg = await self._decode(item)
        except WireError as exc:
            self.count_rejection(peer, exc.reason, exc.detail)
            link.bad_messages += 1
            if link.bad_messages > MAX_BAD_MESSAGES:
                log.warning(
                    "peer %s sent %d bad messages; closing",
                    peer[:12],
                    link.bad_messages,
                    extra=event("peer.closing", peer=peer, reason="bad_messages"),
                )
                return False
            return True
        if msg.sender != peer:
            self.count_rejection(peer, "spoofed_sender", f"claims to be {msg.sender[:12]}")
            return True
        rec.last_seen = trio.current_time()
        before = self.supervisor.total
        keep = True
        with self.supervisor.guard(f"message:{msg.TYPE}", peer):
            keep = self._handle(link, msg)
        if self.supervisor.total != before:
            # The message was dropped; a peer whose messages keep failing is cut off.
            link.bad_messages += 1
            if link.bad_messages > MAX_BAD_MESSAGES:
                log.warning(
                    "peer %s: too many failed messages; closing",
                    peer[:12],
                    extra=event("peer.closing", peer=peer, reason="failed_messages"),
                )
                return False
        return keep is not False

    async def _serve_direct(self, link: Link, conn: DirectConnection) -> None:
        """A direct in-memory link: what the peer sends goes to this mesh's one inbox
        task (`_inbox_loop`), not to a reader of its own; this task only holds the link
        open until the inbox ends it (or its scope is cancelled)."""
        await self._writer(link)  # a direct link's writer only takes the byte counter
        if not self._inbox_running:
            assert self._nursery is not None
            self._inbox_running = True
            self._nursery.start_soon(self._inbox_loop)
        conn.attach(partial(self._arrive, link))
        await link.ended.wait()

    def _arrive(self, link: Link, item: bytes | Exception) -> None:
        self._inbox.append((link, item))
        self._inbox_wake.set()

    async def _inbox_loop(self) -> None:
        """Every direct link's payloads in arrival order, each through `_take` like a
        reader's: one task wakes per batch, not one reader per message (1000 in-process
        nodes have 8000 link ends)."""
        while True:
            while self._inbox:
                link, item = self._inbox.popleft()
                if isinstance(item, bytes) and link.direct is not None:
                    link.direct.taken(len(item))
                if link.ended.is_set() or link.scope.cancel_called:
                    continue  # like a reader that was cancelled with payloads unread
                try:
                    keep = await self._take(link, item)
                except Exception as exc:  # contained as a reader's would be: the link ends
                    keep = False
                    with self.supervisor.guard("connection", link.peer_id):
                        raise exc  # (a guard per message would cost more than the message)
                if not keep:
                    link.ended.set()
            self._inbox_wake = trio.Event()
            await self._inbox_wake.wait()

    async def _decode(self, payload: bytes) -> Message:
        """Unpack and check one message; a model-sized one off the event loop (copying
        and checking 40 MB took the loop from heartbeats for tens of milliseconds).
        The reader awaits it, so a link's messages keep their order."""
        if not self.offload or len(payload) < OFFLOAD_DECODE_BYTES:
            return codec.decode(payload, limits=self.limits)
        return await trio.to_thread.run_sync(partial(codec.decode, payload, limits=self.limits))

    def _handle(self, link: Link, msg: Message) -> bool:
        """Handle the mesh's own messages (hello, heartbeats, peer exchange, goodbye) and
        hand the others to the daemon. Returns False to close the connection."""
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
        while True:
            await trio.sleep(self.config.heartbeat_interval)
            beats += 1
            with self.supervisor.guard("heartbeat"):
                self._heartbeat(beats)

    def _heartbeat(self, beats: int) -> None:
        now = trio.current_time()
        self._ping_nonce += 1
        ping = codec.encode(Ping(self.id, self.current_round(), self._ping_nonce, now))
        exchange = None
        if self.config.peer_exchange and beats % PEER_EXCHANGE_EVERY == 0:
            exchange = self._peer_list_payload()
        interval = self.config.heartbeat_interval
        for peer in list(self.links):
            # Any message proves a peer alive: ping only peers that were quiet for
            # an interval, plus an RTT sample every few beats. In a large mesh this
            # halves heartbeat traffic, which otherwise swamps in-process runs.
            rec = self.peers.peers[peer]
            quiet = rec.last_seen is None or now - rec.last_seen >= 0.9 * interval
            if quiet or beats % RTT_SAMPLE_EVERY == 0:
                self.enqueue(peer, ping, urgent=True)
                self.peers.pinged(peer, now)
            if exchange is not None:
                self.enqueue(peer, exchange)
        self.on_unresponsive(frozenset(self.peers.unresponsive_peers(now, after=2.0 * interval)))
        for peer, link in self.links.items():
            # A frame still arriving counts as hearing from the peer (TCP transport).
            arrived = getattr(link.conn, "last_activity", None)
            if arrived is not None:
                self.peers.seen(peer, arrived)
        for peer in self.peers.silent_peers(now, self.config.heartbeat_timeout):
            silent = self.links.get(peer)
            if silent is not None:
                # Logged once, as the link ends (`_serve`).
                silent.close_reason = (
                    f"heartbeat timeout (silent for {self.config.heartbeat_timeout:.1f}s)"
                )
                self.counters["heartbeat_failures"] += 1
                silent.closed_state = PeerState.FAILED
                silent.scope.cancel()

    # ---- discovery ---------------------------------------------------------------------

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
            self.notify_peers_changed()

    def _on_mdns_ignored(self, service: str, reason: str) -> None:
        self.counters[f"mdns_ignored_{reason}"] += 1
        log.debug("mDNS: ignored %s (%s)", service, reason)

    def _on_mdns_removed(self, peer_id: str) -> None:
        # Its goodbye: don't redial soon. An open connection stays until TCP says otherwise.
        self.peers.hold_off_peer(peer_id, trio.current_time(), 30.0)

    # ---- connections -------------------------------------------------------------------

    async def _dial_loop(self) -> None:
        while True:
            now = trio.current_time()
            assert self._nursery is not None
            for target in self.peers.due_targets(now):
                self.peers.dial_started(target.address)
                self._nursery.start_soon(
                    self._dial, target.address, target.peer_id, target.found_via
                )
            # Until a backoff ends or the table changes (no polling: docs/scenarios.md).
            with trio.move_on_at(self.peers.next_dial_at(now)):
                await self._peers_changed.wait()

    async def _dial(self, address: str, expected: str | None, found_via: str) -> None:
        with self.supervisor.guard("dial", expected):
            await self._dial_unguarded(address, expected, found_via)
        # The dial's end set this address's backoff: the dial loop recomputes its wake-up.
        self.notify_peers_changed()

    async def _dial_unguarded(self, address: str, expected: str | None, found_via: str) -> None:
        try:
            with trio.fail_after(10):
                conn = await self.transport.connect(address, expected)
        except HandshakeError as exc:
            self.peers.dial_failed(address, trio.current_time(), f"handshake: {exc}")
            self.peers.hold_off(address, trio.current_time(), MISMATCH_HOLD_OFF)
            self.counters["handshake_failures"] += 1
            log.warning(
                "refused %s: %s",
                address,
                exc,
                extra=event(
                    "handshake.failed", address=address, direction="outbound", reason=str(exc)
                ),
            )
            return
        except (OSError, trio.TooSlowError) as exc:
            why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            delay = self.peers.dial_failed(address, trio.current_time(), why)
            self.counters["dial_failures"] += 1
            log.debug(
                "dial %s failed (%s); retry in %.1fs",
                address,
                exc,
                delay,
                extra=event(
                    "dial.failed", address=address, error=str(exc), retry_s=round(delay, 3)
                ),
            )
            return
        except Exception as exc:
            # Anything else (an address no transport can dial, a bug) backs off like a
            # failed dial and is contained by the caller's guard.
            self.peers.dial_failed(address, trio.current_time(), f"{type(exc).__name__}: {exc}")
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
            log.warning(
                "peer %s is not in the allow list; closing",
                peer[:12],
                extra=event("peer.refused", peer=peer, reason="not_allowed", detail=""),
            )
            await conn.aclose()
            return
        if self.stopping:
            await conn.aclose()
            return
        link = Link(conn, peer, found_via)
        existing = self.links.get(peer)
        if existing is None:
            self.links[peer] = link
            rec = self.peers.connected(peer, now=trio.current_time(), found_via=found_via)
            if rec.connects > 1:
                self.counters["reconnects"] += 1
            self.on_connected(peer)
            self.notify_peers_changed()
            self._send_greeting(peer)
            log.info(
                "peer %s connected (%s%s)",
                peer[:12],
                "outbound" if conn.outbound else "inbound",
                "" if found_via == "inbound" else f", found via {found_via}",
                extra=event(
                    "peer.connected",
                    peer=peer,
                    direction="outbound" if conn.outbound else "inbound",
                    found_via=found_via,
                    address=dialed,
                ),
            )
        elif self._preferred(conn.outbound, peer) and not self._preferred(
            existing.conn.outbound, peer
        ):
            self.links[peer] = link
            self._send_greeting(peer)
            self._retire(existing, successor=link)
        else:
            self._retire(link, successor=None)
        try:
            with link.scope:
                if link.direct is not None:
                    await self._serve_direct(link, link.direct)
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, link)
                    await self._reader(link)
                    if link.closed_state is PeerState.REFUSED:
                        # We refuse its model: let our Hello reach it first, or a peer
                        # that dialed us never learns why (it would show "disconnected"
                        # and redial soon instead of holding off).
                        await link.flush()
                    nursery.cancel_scope.cancel()
        finally:
            if self.links.get(peer) is link:
                del self.links[peer]
                if link.close_reason is not None and link.closed_state is not PeerState.LEFT:
                    # One line per lost peer (a Bye was logged as "left" already).
                    log.warning(
                        "lost peer %s: %s",
                        peer[:12],
                        link.close_reason,
                        extra=event(
                            "peer.disconnected", peer=peer, how="lost", reason=link.close_reason
                        ),
                    )
                with self.supervisor.guard("peer_lost", peer):
                    self._forget_link(peer, link)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.aclose()

    def _forget_link(self, peer: str, link: Link) -> None:
        """The peer's only link closed: the peer table and the daemon let go of it."""
        self.peers.disconnected(peer, link.closed_state)
        self.notify_peers_changed()
        self.on_lost(peer)

    def _send_greeting(self, peer: str) -> None:
        hello = Hello(
            self.id,
            self.current_round(),
            self.config.federation,
            tuple(self.listen_addresses),
            __version__,
            self.fingerprint.digest,
        )
        self.enqueue(peer, codec.encode(hello))
        for payload in self.greeting():
            self.enqueue(peer, payload)
        if self.config.peer_exchange:
            self.enqueue(peer, self._peer_list_payload())

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


def _host_of(address: str) -> str:
    host = address.rpartition(":")[0]
    return host.strip("[]")


def _advertised(address: str, observed_host: str) -> str:
    """A peer listening on 0.0.0.0/:: is reachable at the address we see it from."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", "") and observed_host:
        host = f"[{observed_host}]" if ":" in observed_host else observed_host
    return f"{host}:{port}"
