"""Why handshakes failed: readable reasons, the TLS alert that tells the peer, and,
per remote host, the inbound failures that status shows.

The dialer of a failed handshake records the reason against its dial target; the side
that was dialed had only a log line, so `p2pfl status` on it said "handshake failures"
and nothing about who or why (a node of another federation knocking every few
seconds looked like noise). This keeps, per remote host (the port is ephemeral), how
often, the last reason and when (`HandshakeFailures`, sans-IO: the caller passes the
time).

Bounded: at most `MAX_HOSTS` hosts (the least recently failing one is forgotten
first), reasons cut to `MAX_REASON` characters, so a scan from many addresses cannot
grow it.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import trio

from p2pfl.logs import event

log = logging.getLogger("p2pfl.transport")

MAX_HOSTS = 64
MAX_REASON = 200


def tls_reason(exc: BaseException) -> str:
    """The OpenSSL reason behind trio's BrokenResourceError, for one readable log line."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"{cause.reason}: {cause.verify_message} "
            "(peer is not in our federation: other name or secret?)"
        )
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
            reason += " (peer refused our certificate: other federation name or secret?)"
        return reason
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc) or type(exc).__name__


def log_inbound_failure(remote: str, reason: str) -> None:
    """One line per failed inbound handshake, with the reason (a wrong federation name
    or secret shows here on the side that was dialed)."""
    log.warning(
        "inbound handshake from %s failed: %s",
        remote,
        reason,
        extra=event("handshake.failed", address=remote, direction="inbound", reason=reason),
    )


async def send_alert(ssl_stream: trio.SSLStream[trio.SocketStream], stream: Any) -> None:
    """Send the TLS alert OpenSSL queued when our side of the handshake failed (e.g.
    unknown_ca for a peer of another federation). trio raises before sending it, so the
    peer saw only EOF and could not say why; best effort, through trio's outgoing BIO."""
    outgoing = getattr(ssl_stream, "_outgoing", None)
    data = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
    if data:
        with trio.move_on_after(1.0):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_all(data)


def refused_text(peer_id: str, address: str, what: str) -> str:
    return (
        f"peer {peer_id} at {address} {what} after the TLS handshake "
        "(it refused our certificate: other federation name or secret?)"
    )


@dataclass
class _Failing:
    failures: int
    last_error: str
    last_at: float


def host_of(remote: str) -> str:
    """'10.0.0.2:41234' -> '10.0.0.2', '[::1]:5' -> '::1'; anything else unchanged."""
    if remote.startswith("["):
        end = remote.find("]")
        return remote[1:end] if end > 0 else remote
    host, sep, port = remote.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else remote


class HandshakeFailures:
    """Inbound handshake failures by remote host: count, last reason, last time."""

    def __init__(self, max_hosts: int = MAX_HOSTS) -> None:
        self._max = max_hosts
        self._hosts: dict[str, _Failing] = {}  # insertion order = least recent first

    def __len__(self) -> int:
        return len(self._hosts)

    def record(self, remote: str, reason: str, now: float) -> None:
        host = host_of(remote)
        entry = self._hosts.pop(host, None)
        if entry is None:
            entry = _Failing(0, "", now)
            while len(self._hosts) >= self._max:
                del self._hosts[next(iter(self._hosts))]
        entry.failures += 1
        entry.last_error = reason[:MAX_REASON]
        entry.last_at = now
        self._hosts[host] = entry  # most recent last

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Most failures first: what status shows and `--json` carries."""
        rows = sorted(self._hosts.items(), key=lambda kv: (-kv[1].failures, kv[0]))
        return [
            {
                "address": host,
                "failures": e.failures,
                "last_error": e.last_error,
                "last_s": round(max(0.0, now - e.last_at), 3),
            }
            for host, e in rows
        ]
