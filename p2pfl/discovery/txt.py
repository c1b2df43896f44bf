"""mDNS service records for p2pfl: instance names and TXT claims (sans-IO).

Anyone on the link can publish a `_p2pfl._tcp` service, so everything read from mDNS is
untrusted input. This module turns the raw record fields into a checked `Claim` or a
reason for ignoring them; it never decides whom to trust. The peer id in a claim is only
a hint of whom to expect at an address: the TLS handshake proves it or the dial fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from p2pfl import PROTOCOL_VERSION
from p2pfl.identity import is_peer_id

SERVICE_TYPE = "_p2pfl._tcp.local."
INSTANCE_PREFIX = "p2pfl-"
# Protocol versions we can talk to; a peer announcing anything else is not dialed.
COMPATIBLE_VERSIONS = frozenset({PROTOCOL_VERSION})
MAX_FEDERATION_LEN = 64  # the same bound NodeConfig enforces
MAX_TXT_ENTRIES = 16
MAX_TXT_VALUE_LEN = 255  # one DNS character-string
MAX_TXT_TOTAL = 1300  # keeps the whole record inside one mDNS packet


class TxtError(ValueError):
    """A service record is malformed or not for us; `reason` is a short stable token."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Claim:
    """What a service record says about itself (unproven)."""

    peer_id: str
    federation: str
    version: int
    port: int


def instance_name(peer_id: str) -> str:
    """Full service instance name for a peer id (one DNS label, well under 63 bytes)."""
    return f"{INSTANCE_PREFIX}{peer_id}.{SERVICE_TYPE}"


def host_name(peer_id: str) -> str:
    """The SRV target host for a peer id; unique per node so A records never collide."""
    return f"{INSTANCE_PREFIX}{peer_id}.local."


def peer_id_of_instance(name: str) -> str | None:
    """The peer id an instance name was derived from, or None if it is not ours."""
    suffix = "." + SERVICE_TYPE
    if not name.endswith(suffix) or not name.startswith(INSTANCE_PREFIX):
        return None
    candidate = name[len(INSTANCE_PREFIX) : -len(suffix)]
    return candidate if is_peer_id(candidate) else None


def encode_txt(peer_id: str, federation: str, port: int) -> dict[str, str]:
    """TXT properties for our own service; validated so we never publish what we reject."""
    props = {"id": peer_id, "fed": federation, "v": str(PROTOCOL_VERSION), "port": str(port)}
    parse_txt(_as_bytes(props), expect_federation=federation)
    return props


def parse_txt(
    raw: Mapping[bytes, bytes | None] | Iterable[tuple[bytes, bytes | None]],
    *,
    expect_federation: str,
) -> Claim:
    """Check raw TXT properties and return the claim, or raise TxtError saying why not.

    Checks are ordered cheapest first and bounded in size, so a hostile record costs
    little: entry count and lengths, then decoding, then the fields themselves.
    """
    items = list(raw.items() if isinstance(raw, Mapping) else raw)
    if len(items) > MAX_TXT_ENTRIES:
        raise TxtError("too_many_entries", f"{len(items)} TXT entries (max {MAX_TXT_ENTRIES})")
    total = 0
    fields: dict[str, str] = {}
    for key, value in items:
        if not isinstance(key, bytes) or not (value is None or isinstance(value, bytes)):
            raise TxtError("bad_type", "TXT keys and values must be bytes")
        if value is not None and len(value) > MAX_TXT_VALUE_LEN:
            raise TxtError("too_long", f"TXT value of {len(value)} bytes")
        total += len(key) + (0 if value is None else len(value)) + 2
        if total > MAX_TXT_TOTAL:
            raise TxtError("too_long", f"TXT record larger than {MAX_TXT_TOTAL} bytes")
        k = _printable(key, "key")
        if k in ("id", "fed", "v", "port"):
            if value is None:
                raise TxtError("missing", f"TXT key {k!r} has no value")
            if k in fields:
                raise TxtError("duplicate", f"TXT key {k!r} appears twice")
            fields[k] = _printable(value, k)
    for k in ("id", "fed", "v", "port"):
        if k not in fields:
            raise TxtError("missing", f"TXT key {k!r} is missing")

    peer_id = fields["id"]
    if not is_peer_id(peer_id):
        raise TxtError("bad_id", f"{peer_id[:40]!r} is not a peer id")
    federation = fields["fed"]
    if not 1 <= len(federation) <= MAX_FEDERATION_LEN:
        raise TxtError("bad_federation", f"federation name of {len(federation)} characters")
    if federation != expect_federation:
        raise TxtError("other_federation", f"federation {federation[:40]!r}")
    version = _small_int(fields["v"], "bad_version")
    if version not in COMPATIBLE_VERSIONS:
        raise TxtError("incompatible_version", f"protocol version {version}")
    port = _small_int(fields["port"], "bad_port")
    if not 1 <= port <= 65535:
        raise TxtError("bad_port", f"port {port}")
    return Claim(peer_id, federation, version, port)


def _printable(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TxtError("not_text", f"TXT {what} is not UTF-8") from None
    if not text.isprintable():
        raise TxtError("not_text", f"TXT {what} has control characters")
    return text


def _small_int(text: str, reason: str) -> int:
    # isdigit() accepts non-ASCII digits ("²"); only plain ASCII decimals are valid here.
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()):
        raise TxtError(reason, f"{text[:12]!r} is not a small decimal integer")
    return int(text)


def _as_bytes(props: Mapping[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in props.items()}
