"""A tiny mDNS client independent of zeroconf: one RFC 6762 "legacy unicast" query.

It sends a plain DNS PTR question for `_p2pfl._tcp.local` to 224.0.0.251:5353 from an
ephemeral port on one interface; responders answer by unicast with the PTR, SRV, TXT
and A records (what `dig -p 5353 @224.0.0.251` would show). Tests use it to check that
what we publish is readable by a standard DNS parser, not just by zeroconf; it is also
a handy diagnostic: `python -m p2pfl.discovery.probe 127.0.0.1 [SECONDS]`.

The parser is strict and bounded (responses are untrusted): compression pointers must
point backwards, names are limited to 255 bytes, a malformed packet is skipped.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from p2pfl.discovery.txt import SERVICE_TYPE

MDNS_GROUP = ("224.0.0.251", 5353)
_PTR, _TXT, _SRV, _A = 12, 16, 33, 1


class DnsFormatError(ValueError):
    """A response packet is malformed."""


@dataclass
class Service:
    """One instance as seen in the answers: where it runs and what its TXT says."""

    name: str
    host: str | None = None
    port: int | None = None
    txt: dict[str, str] = field(default_factory=dict)
    addresses: list[str] = field(default_factory=list)


def build_query(service: str = SERVICE_TYPE, query_id: int | None = None) -> bytes:
    """A standard one-question DNS query (PTR, class IN).

    The id is random by default: zeroconf drops a packet identical to the previous one
    it received within a second, so two probes (ours, or another process's) with the
    same bytes would silence each other.
    """
    if query_id is None:
        query_id = secrets.randbelow(0x10000)
    header = struct.pack(">HHHHHH", query_id, 0, 1, 0, 0, 0)
    return header + _encode_name(service) + struct.pack(">HH", _PTR, 1)


def query(interface: str, service: str = SERVICE_TYPE, timeout: float = 2.0) -> list[Service]:
    """Ask once on `interface` (an IPv4 address) and collect answers for `timeout` s."""
    ipaddress.IPv4Address(interface)  # explicit interface only, never "all"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((interface, 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.sendto(build_query(service), MDNS_GROUP)
        packets = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                packets.append(sock.recv(9000))
            except TimeoutError:
                break
    finally:
        sock.close()
    services: dict[str, Service] = {}
    for packet in packets:
        try:
            merge(services, parse_response(packet))
        except DnsFormatError:
            continue
    return sorted(services.values(), key=lambda s: s.name)


@dataclass(frozen=True)
class Record:
    """One resource record; rdata stays inside its packet, where names may point."""

    name: str
    rtype: int
    packet: bytes
    start: int
    length: int

    @property
    def rdata(self) -> bytes:
        return self.packet[self.start : self.start + self.length]


def parse_response(packet: bytes) -> list[Record]:
    """All resource records of a response (answers, authority and additionals)."""
    if len(packet) < 12:
        raise DnsFormatError("short header")
    _id, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", packet)
    if not flags & 0x8000:
        raise DnsFormatError("not a response")
    pos = 12
    for _ in range(qd):
        _, pos = read_name(packet, pos)
        pos += 4
    records = []
    for _ in range(an + ns + ar):
        name, pos = read_name(packet, pos)
        if pos + 10 > len(packet):
            raise DnsFormatError("truncated record")
        rtype, _cls, _ttl, length = struct.unpack_from(">HHIH", packet, pos)
        pos += 10
        if pos + length > len(packet):
            raise DnsFormatError("truncated rdata")
        records.append(Record(name, rtype, packet, pos, length))
        pos += length
    return records


def merge(services: dict[str, Service], records: list[Record]) -> None:
    """Fold one response's records into per-instance Services (PTR first, then details)."""
    hosts: dict[str, list[str]] = {}
    for rec in records:
        if rec.rtype == _A and rec.length == 4:
            hosts.setdefault(rec.name.lower(), []).append(socket.inet_ntoa(rec.rdata))
    for rec in records:
        if rec.rtype == _PTR:
            target, _ = read_name(rec.packet, rec.start)
            services.setdefault(target.lower(), Service(target))
    for rec in records:
        svc = services.get(rec.name.lower())
        if svc is None:
            continue
        if rec.rtype == _SRV and rec.length >= 7:
            svc.port = struct.unpack_from(">H", rec.packet, rec.start + 4)[0]
            svc.host, _ = read_name(rec.packet, rec.start + 6)
            svc.addresses = hosts.get(svc.host.lower(), svc.addresses)
        elif rec.rtype == _TXT:
            svc.txt = parse_txt_rdata(rec.rdata)


def parse_txt_rdata(rdata: bytes) -> dict[str, str]:
    """TXT character-strings as key=value (first occurrence wins, as RFC 6763 says)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(rdata):
        n = rdata[pos]
        entry = rdata[pos + 1 : pos + 1 + n]
        pos += 1 + n
        key, _, value = entry.decode("utf-8", "replace").partition("=")
        out.setdefault(key, value)
    return out


def read_name(packet: bytes, pos: int) -> tuple[str, int]:
    """A possibly compressed domain name at `pos`; returns (name with final dot, next pos)."""
    labels: list[str] = []
    end: int | None = None
    seen = 0
    limit = pos
    while True:
        if pos >= len(packet):
            raise DnsFormatError("name runs past the packet")
        n = packet[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(packet):
                raise DnsFormatError("truncated pointer")
            target = ((n & 0x3F) << 8) | packet[pos + 1]
            if target >= limit:
                raise DnsFormatError("compression pointer does not point backwards")
            if end is None:
                end = pos + 2
            pos = limit = target
            continue
        if n & 0xC0:
            raise DnsFormatError("reserved label type")
        pos += 1
        if n == 0:
            break
        labels.append(packet[pos : pos + n].decode("utf-8", "replace"))
        seen += n + 1
        if seen > 255:
            raise DnsFormatError("name longer than 255 bytes")
        pos += n
    return ".".join(labels) + ".", end if end is not None else pos


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode()
        if not 1 <= len(raw) <= 63:
            raise ValueError(f"bad DNS label {label!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def main() -> None:
    interface = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    found = query(interface, timeout=timeout)
    print(json.dumps([s.__dict__ for s in found], indent=2))


if __name__ == "__main__":
    main()
