"""The one parser for peer addresses: "host:port", "[ipv6]:port" and "mem:<name>".

Addresses reach us from config, mDNS and, above all, from peers (Hello.listen,
PeerList.peers), and end up in a dial. A string the dialer cannot parse must therefore
be refused where it enters, with a reason, never inside a dial task. Everything here
is pure and raises only ValueError("bad address ...").

Hosts are IP literals (IPv6 only in brackets, optionally with a %scope) or RFC 1123
style host names (letters, digits, '-', '_', dot-separated labels of 1..63 chars, at
most 253 chars, not all-numeric unless a valid IPv4 address).
"""

from __future__ import annotations

import ipaddress
import re

MAX_ADDR_LEN = 256
MAX_HOSTNAME_LEN = 253
MAX_MEM_NAME_LEN = 64
MEM_PREFIX = "mem:"

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_MEM_NAME = re.compile(r"[A-Za-z0-9._-]+\Z")
_DIGITS = re.compile(r"[0-9]{1,5}\Z")  # ASCII only: str.isdigit() also accepts '²'


def _bad(s: str, why: str) -> ValueError:
    shown = s if len(s) <= 60 else s[:57] + "..."
    return ValueError(f"bad address {shown!r}: {why}")


def _check_host(s: str, host: str, *, bracketed: bool) -> None:
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(s, "[...] must hold an IPv6 address") from None
        return
    if not host:
        raise _bad(s, "empty host")
    if len(host) > MAX_HOSTNAME_LEN:
        raise _bad(s, f"host longer than {MAX_HOSTNAME_LEN} chars")
    labels = host.split(".")
    if all(label.isascii() and label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _bad(s, "not a valid IPv4 address") from None
        return
    if not all(_LABEL.match(label) for label in labels):
        raise _bad(s, "host is neither an IP address nor a valid host name")


def parse_address(s: str) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port" into (host, port); port may be 0 (listen).

    ValueError ("bad address ...") for anything else, including "mem:" addresses.
    """
    if type(s) is not str:
        raise ValueError(f"bad address: expected str, got {type(s).__name__}")
    if len(s) > MAX_ADDR_LEN:
        raise _bad(s, f"longer than {MAX_ADDR_LEN} chars")
    if not s.isascii() or not s.isprintable() or " " in s:
        raise _bad(s, "only printable ASCII without spaces is allowed")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise _bad(s, "expected [ipv6]:port")
        port_text = rest[1:]
        bracketed = True
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise _bad(s, "expected host:port")
        if ":" in host:
            raise _bad(s, "write IPv6 hosts as [addr]:port")
        bracketed = False
    if not host:
        raise _bad(s, "empty host")
    if not _DIGITS.match(port_text) or not 0 <= int(port_text) <= 65535:
        raise _bad(s, "port must be a number in 0..65535")
    _check_host(s, host, bracketed=bracketed)
    return host, int(port_text)


def is_memory_address(s: str) -> bool:
    """True for an in-memory transport address "mem:<name>" (simulations, tests)."""
    name = s[len(MEM_PREFIX) :]
    return (
        s.startswith(MEM_PREFIX)
        and 0 < len(name) <= MAX_MEM_NAME_LEN
        and _MEM_NAME.match(name) is not None
    )


def check_peer_address(s: str, *, memory: bool = True) -> str:
    """An address a peer may tell us to dial: host:port with port 1..65535, or (when
    `memory`) mem:<name>.

    Returns `s` unchanged; ValueError says what is wrong.
    """
    if type(s) is str and is_memory_address(s):
        if not memory:
            raise _bad(s, "in-memory addresses cannot be dialed here")
        return s
    _, port = parse_address(s)
    if port == 0:
        raise _bad(s, "port 0 cannot be dialed")
    return s
