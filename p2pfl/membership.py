"""Who we know, who we are connected to, and whom to dial next (sans-IO).

Two tables: peers by id (what we know about each authenticated peer) and dial targets
by address (where we might reach someone, learnt from bootstrap flags, peer exchange or
discovery). Keeping addresses separate from ids matters because a bootstrap address
comes with no id: the TLS handshake tells us who is there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from random import Random
from typing import Any


class PeerState(StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    FAILED = "failed"  # heartbeats stopped
    LEFT = "left"  # said goodbye
    REFUSED = "refused"  # cannot learn with us (another model or task): see `refused`


@dataclass
class PeerRecord:
    peer_id: str
    address: str | None  # where the peer listens (from its hello), if known
    found_via: str
    state: PeerState = PeerState.DISCONNECTED
    last_seen: float | None = None
    rtt: float | None = None
    # Since when our oldest unanswered ping waits (None: all answered). A peer that
    # stalls still sends, so `last_seen` stays fresh; only its missing pongs show it.
    ping_pending_since: float | None = None
    round: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    rejected: int = 0
    connects: int = 0
    refused: str | None = None  # why we refused it (e.g. another model), if we did


MAX_ERROR_TEXT = 200  # characters of a dial error kept per target


@dataclass
class DialTarget:
    address: str
    peer_id: str | None
    found_via: str
    failures: int = 0
    next_attempt: float = 0.0
    dialing: bool = False
    is_self: bool = False
    last_error: str | None = None  # why the last dial failed (status shows it)


class PeerTable:
    def __init__(
        self,
        local_id: str,
        *,
        max_peers: int = 64,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.local_id = local_id
        self.max_peers = max_peers
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._rng = Random(seed)
        self.peers: dict[str, PeerRecord] = {}
        self.targets: dict[str, DialTarget] = {}

    # ---- addresses -------------------------------------------------------------------

    def addresses(self) -> dict[str, set[str]]:
        """Peer id -> the addresses we know it by: those we dialled it at and the one
        it announced."""
        known: dict[str, set[str]] = {}
        for target in self.targets.values():
            if target.peer_id is not None:
                known.setdefault(target.peer_id, set()).add(target.address)
        for peer, rec in self.peers.items():
            if rec.address is not None:
                known.setdefault(peer, set()).add(rec.address)
        return known

    def add_address(self, address: str, *, peer_id: str | None, found_via: str) -> bool:
        """Remember a place to dial. Returns True if it is new."""
        if peer_id == self.local_id:
            return False
        target = self.targets.get(address)
        if target is not None:
            if peer_id is not None and (
                target.peer_id is None or (target.peer_id != peer_id and target.failures > 0)
            ):
                # A claim that already failed its handshake (e.g. a spoofed mDNS record
                # that got there first) must not keep the real peer's address held off.
                target.peer_id = peer_id
                target.failures = 0
                target.next_attempt = 0.0
                return True
            return False
        if len(self.targets) >= self.max_targets and not self._evict_failed():
            return False  # bounded: a peer cannot flood us with addresses
        self.targets[address] = DialTarget(address, peer_id, found_via)
        return True

    @property
    def max_targets(self) -> int:
        """Dial targets kept in total (docs/security.md, "Resource bounds")."""
        return 4 * self.max_peers

    def _evict_failed(self) -> bool:
        """Make room by forgetting the learnt address that failed most often. Without
        this, whoever fills the table first (e.g. a peer listing unreachable addresses)
        would keep every later, real address out for the node's whole life. Bootstrap
        addresses, targets being dialed and addresses of connected peers stay."""
        victim: DialTarget | None = None
        for t in self.targets.values():
            if (
                t.failures == 0
                or t.dialing
                or t.is_self
                or t.found_via == "bootstrap"
                or (t.peer_id is not None and self.is_connected(t.peer_id))
            ):
                continue
            if victim is None or t.failures > victim.failures:
                victim = t
        if victim is None:
            return False
        del self.targets[victim.address]
        return True

    def due_targets(self, now: float) -> list[DialTarget]:
        """Targets to dial now: not us, not already connected, not in backoff."""
        if self.connected_count() >= self.max_peers:
            return []
        due = []
        for t in self.targets.values():
            if t.dialing or t.is_self or now < t.next_attempt:
                continue
            if t.peer_id is not None and self.is_connected(t.peer_id):
                continue
            if any(
                p.address == t.address and p.state is PeerState.CONNECTED
                for p in self.peers.values()
            ):
                continue
            due.append(t)
        return due

    def next_dial_at(self, now: float) -> float:
        """When the earliest target still in backoff becomes due (inf: none is).

        The dial loop sleeps until then or until the table changes, instead of polling:
        polling four times a second cost 1000 in-process nodes 4000 wake-ups (and as many
        expired timeouts) a second. Targets being dialed or that are us never fall due
        by themselves; a dial's end, a new address or a lost peer wake the loop instead.
        """
        if self.connected_count() >= self.max_peers:
            return math.inf
        return min(
            (
                t.next_attempt
                for t in self.targets.values()
                if not t.dialing and not t.is_self and t.next_attempt > now
            ),
            default=math.inf,
        )

    def dial_status(self, now: float) -> list[dict[str, Any]]:
        """Dial targets that are failing or not connected, for status: where the node
        tries to go, why it last failed and when it tries again (an operator's first
        question when a node sits alone)."""
        out = []
        for t in sorted(self.targets.values(), key=lambda t: (-t.failures, t.address)):
            connected = t.peer_id is not None and self.is_connected(t.peer_id)
            if t.is_self or (connected and t.failures == 0):
                continue
            out.append(
                {
                    "address": t.address,
                    "peer_id": t.peer_id,
                    "found_via": t.found_via,
                    "connected": connected,
                    "failures": t.failures,
                    "last_error": t.last_error,
                    "dialing": t.dialing,
                    "retry_in_s": None if t.dialing else round(max(0.0, t.next_attempt - now), 3),
                }
            )
        return out

    def dial_started(self, address: str) -> None:
        self.targets[address].dialing = True

    def dial_failed(self, address: str, now: float, error: str | None = None) -> float:
        """Record a failed dial and why; returns the backoff delay (exponential,
        jittered)."""
        t = self.targets[address]
        t.dialing = False
        t.failures += 1
        if error is not None:
            t.last_error = error[:MAX_ERROR_TEXT]
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** min(t.failures - 1, 16))
        delay *= 0.5 + self._rng.random()
        t.next_attempt = now + delay
        return delay

    def dial_succeeded(self, address: str, peer_id: str) -> None:
        # The failure count is NOT reset here: a peer that accepts and hangs up at once
        # (allow list, half a partition) would otherwise be redialed in a hot loop.
        # `connection_ended` resets it once a connection has proved stable.
        t = self.targets[address]
        t.dialing = False
        t.peer_id = peer_id
        t.last_error = None
        if peer_id == self.local_id:
            t.is_self = True

    def connection_ended(self, address: str, now: float, lasted: float, stable: float) -> float:
        """A connection we dialed closed after `lasted` seconds; returns the redial delay.

        Stable connections redial promptly; short-lived ones back off like failed dials.
        """
        t = self.targets.get(address)
        if t is None:
            return 0.0
        if lasted >= stable:
            t.failures = 0
            t.next_attempt = max(t.next_attempt, now + self.backoff_base)
            return self.backoff_base
        t.dialing = True  # dial_failed expects an attempt in flight
        return self.dial_failed(address, now)

    def hold_off(self, address: str, now: float, delay: float) -> None:
        t = self.targets.get(address)
        if t is not None:
            t.next_attempt = max(t.next_attempt, now + delay)

    def hold_off_peer(self, peer_id: str, now: float, delay: float) -> None:
        for t in self.targets.values():
            if t.peer_id == peer_id:
                t.next_attempt = max(t.next_attempt, now + delay)

    # ---- peers -----------------------------------------------------------------------

    def connected(self, peer_id: str, *, now: float, found_via: str) -> PeerRecord:
        rec = self.peers.get(peer_id)
        if rec is None:
            rec = self.peers[peer_id] = PeerRecord(peer_id, None, found_via)
        rec.state = PeerState.CONNECTED
        rec.last_seen = now
        rec.ping_pending_since = None
        rec.connects += 1
        return rec

    def set_listen_address(self, peer_id: str, address: str) -> None:
        rec = self.peers.get(peer_id)
        if rec is not None:
            rec.address = address
        self.add_address(address, peer_id=peer_id, found_via=rec.found_via if rec else "hello")

    def disconnected(self, peer_id: str, state: PeerState = PeerState.DISCONNECTED) -> None:
        rec = self.peers.get(peer_id)
        if rec is not None and rec.state is PeerState.CONNECTED:
            # Refused stays refused whoever closed first, until its hello matches again.
            rec.state = PeerState.REFUSED if rec.refused else state

    def seen(self, peer_id: str, now: float) -> None:
        rec = self.peers.get(peer_id)
        if rec is not None and (rec.last_seen is None or now > rec.last_seen):
            rec.last_seen = now

    def pinged(self, peer_id: str, now: float) -> None:
        rec = self.peers.get(peer_id)
        if rec is not None and rec.ping_pending_since is None:
            rec.ping_pending_since = now

    def ponged(self, peer_id: str) -> None:
        rec = self.peers.get(peer_id)
        if rec is not None:
            rec.ping_pending_since = None

    def unresponsive_peers(self, now: float, after: float) -> list[str]:
        """Connected peers with a ping unanswered for more than `after` seconds: alive
        (they may still send) but not reading what we send, so not worth asking."""
        return sorted(
            p
            for p, r in self.peers.items()
            if r.state is PeerState.CONNECTED
            and r.ping_pending_since is not None
            and now - r.ping_pending_since > after
        )

    def is_connected(self, peer_id: str) -> bool:
        rec = self.peers.get(peer_id)
        return rec is not None and rec.state is PeerState.CONNECTED

    def connected_ids(self) -> list[str]:
        return sorted(p for p, r in self.peers.items() if r.state is PeerState.CONNECTED)

    def connected_count(self) -> int:
        return sum(1 for r in self.peers.values() if r.state is PeerState.CONNECTED)

    def silent_peers(self, now: float, timeout: float) -> list[str]:
        """Connected peers we have not heard from for `timeout` seconds (failure detector)."""
        return [
            p
            for p, r in self.peers.items()
            if r.state is PeerState.CONNECTED
            and r.last_seen is not None
            and now - r.last_seen > timeout
        ]

    def exchange_list(self, limit: int = 64) -> list[tuple[str, str]]:
        """(id, address) of connected peers with a known listen address, for peer exchange."""
        out = [
            (p, r.address)
            for p, r in sorted(self.peers.items())
            if r.state is PeerState.CONNECTED and r.address is not None
        ]
        return out[:limit]

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "id": r.peer_id,
                "address": r.address,
                "state": str(r.state),
                "found_via": r.found_via,
                "last_seen_s": None if r.last_seen is None else round(now - r.last_seen, 3),
                "rtt_ms": None if r.rtt is None else round(r.rtt * 1000, 3),
                "round": r.round,
                "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out,
                "messages_in": r.messages_in,
                "rejected": r.rejected,
                "connects": r.connects,
                "refused": r.refused,
            }
            for r in sorted(self.peers.values(), key=lambda r: r.peer_id)
        ]
