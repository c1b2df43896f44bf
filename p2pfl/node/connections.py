"""A mesh's connections: dialing, serving, admission, and one link per pair of peers.

Dials whatever the peer table says is due (backing off on failure, holding off an
address that proved the wrong id), serves inbound connections, admits a peer (never
ourselves, the allow list, not while stopping), and keeps one link per pair: when both
sides dial at once each keeps the connection the smaller id dialed, and the other is
retired without losing a message. A link's life ends here too: the peer table and the
daemon hear that the peer is gone. What runs on an open link is the mesh's writer and
the intake's reader.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from p2pfl import __version__
from p2pfl.logs import event
from p2pfl.membership import PeerState
from p2pfl.node.link import Link
from p2pfl.transport.base import Connection, HandshakeError
from p2pfl.wire import codec
from p2pfl.wire.messages import Hello

if TYPE_CHECKING:
    from p2pfl.node.mesh import Mesh

log = logging.getLogger("p2pfl.node")

MISMATCH_HOLD_OFF = 60.0  # seconds to ignore an address that proved the wrong id
RETIRE_GRACE = 5.0  # seconds a duplicate connection is still read before closing


class Connections:
    """Opens, admits, serves and closes the links of one mesh (`mesh.links`)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    # ---- dialing -----------------------------------------------------------------------

    async def dial_loop(self) -> None:
        mesh = self.mesh
        while True:
            now = trio.current_time()
            for target in mesh.peers.due_targets(now):
                mesh.peers.dial_started(target.address)
                mesh.nursery.start_soon(
                    self._dial, target.address, target.peer_id, target.found_via
                )
            # Until a backoff ends or the table changes (no polling: docs/scenarios.md).
            with trio.move_on_at(mesh.peers.next_dial_at(now)):
                await mesh.peers_changed()

    async def _dial(self, address: str, expected: str | None, found_via: str) -> None:
        with self.mesh.supervisor.guard("dial", expected):
            await self._dial_unguarded(address, expected, found_via)
        # The dial's end set this address's backoff: the dial loop recomputes its wake-up.
        self.mesh.notify_peers_changed()

    async def _dial_unguarded(self, address: str, expected: str | None, found_via: str) -> None:
        mesh = self.mesh
        peers = mesh.peers
        try:
            with trio.fail_after(10):
                conn = await mesh.transport.connect(address, expected)
        except HandshakeError as exc:
            peers.dial_failed(address, trio.current_time(), f"handshake: {exc}")
            peers.hold_off(address, trio.current_time(), MISMATCH_HOLD_OFF)
            mesh.counters["handshake_failures"] += 1
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
            delay = peers.dial_failed(address, trio.current_time(), why)
            mesh.counters["dial_failures"] += 1
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
            peers.dial_failed(address, trio.current_time(), f"{type(exc).__name__}: {exc}")
            mesh.counters["dial_failures"] += 1
            raise
        peers.dial_succeeded(address, conn.peer_id)
        opened = trio.current_time()
        try:
            with mesh.supervisor.guard("connection", conn.peer_id):
                await self._serve(conn, found_via, address)
        finally:
            now = trio.current_time()
            peers.connection_ended(address, now, now - opened, stable=mesh.config.heartbeat_timeout)

    # ---- serving -----------------------------------------------------------------------

    async def on_inbound(self, conn: Connection) -> None:
        mesh = self.mesh
        with mesh.supervisor.guard("connection", conn.peer_id):
            target = next(
                (t for t in mesh.peers.targets.values() if t.peer_id == conn.peer_id), None
            )
            await self._serve(conn, target.found_via if target else "inbound", None)

    def _preferred(self, outbound: bool, peer: str) -> bool:
        """Of two connections between a pair, both sides keep the one the smaller id dialed."""
        return outbound == (self.mesh.id < peer)

    async def _serve(self, conn: Connection, found_via: str, dialed: str | None) -> None:
        mesh = self.mesh
        peer = conn.peer_id
        if peer == mesh.id:
            if dialed is not None:
                mesh.peers.targets[dialed].is_self = True
            await conn.aclose()
            return
        if mesh.config.allow and peer not in mesh.config.allow:
            mesh.counters["not_admitted"] += 1
            log.warning(
                "peer %s is not in the allow list; closing",
                peer[:12],
                extra=event("peer.refused", peer=peer, reason="not_allowed", detail=""),
            )
            await conn.aclose()
            return
        if mesh.stopping:
            await conn.aclose()
            return
        link = Link(conn, peer, found_via)
        existing = mesh.links.get(peer)
        if existing is None:
            mesh.links[peer] = link
            rec = mesh.peers.connected(peer, now=trio.current_time(), found_via=found_via)
            if rec.connects > 1:
                mesh.counters["reconnects"] += 1
            mesh.on_connected(peer)
            mesh.notify_peers_changed()
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
            mesh.links[peer] = link
            self._send_greeting(peer)
            self._retire(existing, successor=link)
        else:
            self._retire(link, successor=None)
        try:
            with link.scope:
                if link.direct is not None:
                    await mesh.write(link)  # a direct link's writer only takes the byte counter
                    await mesh.intake.serve_direct(link, link.direct, mesh.nursery)
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(mesh.write, link)
                    await mesh.intake.read(link)
                    if link.closed_state is PeerState.REFUSED:
                        # We refuse its model: let our Hello reach it first, or a peer
                        # that dialed us never learns why (it would show "disconnected"
                        # and redial soon instead of holding off).
                        await link.flush()
                    nursery.cancel_scope.cancel()
        finally:
            if mesh.links.get(peer) is link:
                del mesh.links[peer]
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
                with mesh.supervisor.guard("peer_lost", peer):
                    self._forget_link(peer, link)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.aclose()

    def _forget_link(self, peer: str, link: Link) -> None:
        """The peer's only link closed: the peer table and the daemon let go of it."""
        mesh = self.mesh
        mesh.peers.disconnected(peer, link.closed_state)
        mesh.notify_peers_changed()
        mesh.on_lost(peer)

    def _send_greeting(self, peer: str) -> None:
        mesh = self.mesh
        hello = Hello(
            mesh.id,
            mesh.current_round(),
            mesh.config.federation,
            tuple(mesh.listen_addresses),
            __version__,
            mesh.fingerprint.digest,
        )
        mesh.enqueue(peer, codec.encode(hello))
        for payload in mesh.greeting():
            mesh.enqueue(peer, payload)
        if mesh.config.peer_exchange:
            mesh.enqueue(peer, mesh.peer_list_payload())

    # ---- duplicates --------------------------------------------------------------------

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
        self.mesh.nursery.start_soon(self._close_later, link)

    async def _close_later(self, link: Link) -> None:
        await trio.sleep(RETIRE_GRACE)
        link.scope.cancel()
