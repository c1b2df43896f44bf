"""mDNS for a mesh: addresses of peers on the LAN go into its peer table.

Discovery only (liveness is heartbeats), and nothing it hears is trusted: a TXT
record's peer id is only a claim, dialed as the expected id, so a spoofed record fails
the TLS check and its address is held off. The zeroconf side is `p2pfl.discovery.mdns`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from p2pfl.node.mesh import Mesh

log = logging.getLogger("p2pfl.node")

REMOVED_HOLD_OFF = 30.0  # seconds not to redial a peer whose mDNS record went away


class MdnsPeers:
    """Runs mDNS for one mesh (its listen address, federation and peer table)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    async def run(self) -> None:
        """Announce ourselves and browse for peers until cancelled (after `listen`)."""
        from p2pfl.discovery.mdns import default_interfaces, run_mdns
        from p2pfl.transport.tcp import parse_address

        mesh = self.mesh
        host, port = parse_address(mesh.listen_addresses[0])
        interfaces = list(mesh.config.mdns_interfaces) or default_interfaces(host)
        if not interfaces:
            log.warning("mDNS: no IPv4 interface for listen address %s; discovery off", host)
            return
        try:
            await run_mdns(
                peer_id=mesh.id,
                federation=mesh.config.federation,
                port=port,
                address=host,
                interfaces=interfaces,
                on_found=self._on_found,
                on_removed=self._on_removed,
                on_ignored=self._on_ignored,
            )
        except (OSError, ValueError) as exc:
            log.warning("mDNS unavailable on %s (%s); using bootstrap peers only", interfaces, exc)

    def _on_found(self, peer_id: str, address: str) -> None:
        with self.mesh.supervisor.guard("mdns", peer_id):
            self._add_peer(peer_id, address)

    def _add_peer(self, peer_id: str, address: str) -> None:
        mesh = self.mesh
        if peer_id != mesh.id and mesh.peers.add_address(
            address, peer_id=peer_id, found_via="mdns"
        ):
            log.info("mDNS: found %s at %s", peer_id[:12], address)
            mesh.notify_peers_changed()

    def _on_ignored(self, service: str, reason: str) -> None:
        self.mesh.counters[f"mdns_ignored_{reason}"] += 1
        log.debug("mDNS: ignored %s (%s)", service, reason)

    def _on_removed(self, peer_id: str) -> None:
        # Its goodbye: don't redial soon. An open connection stays until TCP says otherwise.
        self.mesh.peers.hold_off_peer(peer_id, trio.current_time(), REMOVED_HOLD_OFF)
