"""mDNS discovery with zeroconf, bridged into trio.

zeroconf runs its own asyncio loop and a browser thread. Its callbacks only post
`(name, change)` events into a bounded trio channel via the trio token (never blocking
that thread); every blocking zeroconf call (start, the ~1.6 s registration probe,
lookups, goodbye and close) runs in `trio.to_thread`, so the trio loop never stalls.

Safety: zeroconf defaults to every interface. Here the interfaces are always explicit
IPv4 addresses and IPv4-only; an empty list is refused rather than widened.

What is found is a *claim* (see `txt.py`): the node dials the address expecting the
claimed id and the TLS handshake proves it. mDNS never decides liveness; it only adds
addresses and, on a goodbye, tells the node a peer left cleanly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
import trio
from zeroconf import (
    DNSQuestionType,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import (
    Error as ZeroconfError,
)

from p2pfl.discovery.txt import (
    SERVICE_TYPE,
    TxtError,
    encode_txt,
    host_name,
    instance_name,
    parse_txt,
    peer_id_of_instance,
)

__all__ = ["SERVICE_TYPE", "default_interfaces", "run_mdns"]

log = logging.getLogger("p2pfl.discovery.mdns")

MAX_PENDING_EVENTS = 1024  # zeroconf -> trio events not yet handled; beyond that we drop
MAX_TRACKED = 1024  # service names remembered at once (found or being resolved)
RESOLVE_TIMEOUT_MS = 2000  # asking for SRV/TXT/A when the announcement lacked them
RESOLVERS = 4  # concurrent lookups, so one silent fake service cannot stall the rest
CLOSE_TIMEOUT = 5.0  # goodbye (3 x 125 ms) plus closing zeroconf's loop

_Event = tuple[str, ServiceStateChange]


@dataclass(frozen=True)
class _Resolved:
    properties: dict[bytes, bytes | None]
    port: int | None
    addresses: list[str]


async def run_mdns(
    *,
    peer_id: str,
    federation: str,
    port: int,
    address: str,
    interfaces: Sequence[str],
    on_found: Callable[[str, str], None],
    on_removed: Callable[[str], None],
    on_ignored: Callable[[str, str], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce this node and report other p2pfl nodes of `federation` until cancelled.

    `address` is the host we listen on; 0.0.0.0 (or "") advertises every interface
    address. Callbacks run in the trio thread: `on_found(claimed_id, "ip:port")` for a
    new or moved same-federation, compatible service that is not us; `on_removed(id)`
    when such a service said goodbye; `on_ignored(name, reason)` (optional, for status
    and tests) when a record was refused. `started()` fires once we are registered and
    browsing. On cancellation we send goodbye packets and close, shielded and bounded.
    """
    ifaces = _checked_interfaces(interfaces)
    advertised = ifaces if address.strip("[]") in ("", "0.0.0.0", "::") else [address]
    advertised = _checked_interfaces(advertised)
    info = ServiceInfo(
        SERVICE_TYPE,
        instance_name(peer_id),
        port=port,
        properties=encode_txt(peer_id, federation, port),
        server=host_name(peer_id),
        addresses=[socket.inet_aton(a) for a in advertised],
    )
    tracker = _Tracker(peer_id, federation, ifaces, on_found, on_removed, on_ignored)
    token = trio.lowlevel.current_trio_token()
    send, recv = trio.open_memory_channel[_Event](MAX_PENDING_EVENTS)

    def post(name: str, change: ServiceStateChange) -> None:  # trio thread
        try:
            send.send_nowait((name, change))
        except trio.WouldBlock:
            log.warning("mDNS: too many pending events; dropped one for %s", name[:80])
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:  # zeroconf's browser thread
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(post, name, state_change)

    zc = await trio.to_thread.run_sync(_open_zeroconf, ifaces)
    browser: ServiceBrowser | None = None
    registered = False
    try:
        async with trio.open_nursery() as nursery:
            tracker.nursery = nursery
            tracker.zc = zc
            nursery.start_soon(tracker.consume, recv)
            # Browse first: others are found while our own probe (~1.6 s) runs.
            browser = await trio.to_thread.run_sync(_browse, zc, on_change)
            registered = await trio.to_thread.run_sync(_register, zc, info)
            if registered:
                log.info("mDNS: announcing %s on %s", instance_name(peer_id), ", ".join(ifaces))
            task_status.started()
            await trio.sleep_forever()
    finally:
        send.close()
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
            await trio.to_thread.run_sync(
                _close, zc, browser, info if registered else None, abandon_on_cancel=True
            )
        if scope.cancelled_caught:
            log.warning("mDNS: closing zeroconf took longer than %.0fs; left it", CLOSE_TIMEOUT)


def default_interfaces(listen_host: str) -> list[str]:
    """IPv4 interface addresses for mDNS given the host the node listens on.

    A specific IPv4 address gives just that address (loopback included: a node on
    loopback is found on loopback); a wildcard gives every non-loopback IPv4 interface;
    anything else (IPv6, a host name) gives none, so mDNS stays off unless asked.
    """
    return select_interfaces(listen_host, local_ipv4_addresses())


def select_interfaces(listen_host: str, local: Sequence[tuple[str, int]]) -> list[str]:
    """Pure part of `default_interfaces`: `local` is [(ipv4, prefix_len), ...]."""
    host = listen_host.strip().strip("[]")
    if host in ("", "0.0.0.0", "::", "*"):
        return sorted({ip for ip, _ in local if not ipaddress.IPv4Address(ip).is_loopback})
    if host == "localhost":
        return ["127.0.0.1"]
    try:
        return [str(ipaddress.IPv4Address(host))]
    except ValueError:
        return []


def local_ipv4_addresses() -> list[tuple[str, int]]:
    """Every IPv4 address of this host with its prefix length (via ifaddr, no ioctls)."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str):
                out.append((ip.ip, ip.network_prefix))
    return out


# ---- trio side ------------------------------------------------------------------------


class _Tracker:
    """What we have reported per service name, so callbacks fire once per change.

    Also serialises lookups per name and ignores results that a later goodbye made
    stale (each name has a generation, bumped on removal).
    """

    def __init__(
        self,
        peer_id: str,
        federation: str,
        interfaces: list[str],
        on_found: Callable[[str, str], None],
        on_removed: Callable[[str], None],
        on_ignored: Callable[[str, str], None] | None,
    ) -> None:
        self.peer_id = peer_id
        self.federation = federation
        self.networks = _networks(interfaces)
        self.on_loopback = any(ipaddress.IPv4Address(i).is_loopback for i in interfaces)
        self.on_found = on_found
        self.on_removed = on_removed
        self.on_ignored = on_ignored
        self.found: dict[str, tuple[str, str]] = {}  # name -> (claimed id, "ip:port")
        self.resolving: dict[str, bool] = {}  # name -> "changed again while resolving"
        self.generation: dict[str, int] = {}
        self.limiter = trio.CapacityLimiter(RESOLVERS)
        self.nursery: trio.Nursery | None = None
        self.zc: Zeroconf | None = None

    async def consume(self, recv: trio.MemoryReceiveChannel[_Event]) -> None:
        async for name, change in recv:
            self.handle(name, change)

    def handle(self, name: str, change: ServiceStateChange) -> None:
        name_id = peer_id_of_instance(name)
        if name_id is None:
            self.ignore(name, "foreign_name")
            return
        if name_id == self.peer_id:
            return  # ourselves
        if change is ServiceStateChange.Removed:
            self.generation[name] = self.generation.get(name, 0) + 1
            self.resolving.pop(name, None)
            gone = self.found.pop(name, None)
            if gone is not None:
                log.info("mDNS: %s said goodbye", gone[0][:12])
                self.on_removed(gone[0])
            return
        if name in self.resolving:
            self.resolving[name] = True
            return
        if len(self.found) + len(self.resolving) >= MAX_TRACKED:
            self.ignore(name, "too_many_services")
            return
        self.resolving[name] = False
        assert self.nursery is not None
        self.nursery.start_soon(self.resolve, name, name_id)

    async def resolve(self, name: str, name_id: str) -> None:
        assert self.zc is not None
        while True:
            generation = self.generation.get(name, 0)
            result = await trio.to_thread.run_sync(
                _lookup, self.zc, name, limiter=self.limiter, abandon_on_cancel=True
            )
            if self.generation.get(name, 0) != generation or name not in self.resolving:
                return  # said goodbye while we were looking it up
            if result is not None:
                self.accept(name, name_id, result)
            else:
                self.ignore(name, "unresolved")
            if not self.resolving.get(name, False):
                break
            self.resolving[name] = False  # it changed meanwhile: look again
        self.resolving.pop(name, None)

    def accept(self, name: str, name_id: str, result: _Resolved) -> None:
        try:
            claim = parse_txt(result.properties, expect_federation=self.federation)
        except TxtError as exc:
            self.ignore(name, exc.reason)
            return
        if claim.peer_id != name_id:
            self.ignore(name, "name_mismatch")
            return
        if result.port is not None and result.port != claim.port:
            self.ignore(name, "port_mismatch")
            return
        ip = self.pick_address(result.addresses)
        if ip is None:
            self.ignore(name, "no_usable_address")
            return
        found = (claim.peer_id, f"{ip}:{claim.port}")
        if self.found.get(name) == found:
            return
        self.found[name] = found
        log.info("mDNS: found %s at %s", found[0][:12], found[1])
        self.on_found(*found)

    def pick_address(self, addresses: Sequence[str]) -> str | None:
        """An address we can reach: on one of our interface networks if possible.

        Loopback is only accepted when we browse on loopback ourselves; multicast,
        broadcast-like and unspecified addresses never.
        """
        usable = []
        for text in addresses:
            try:
                ip = ipaddress.IPv4Address(text)
            except ValueError:
                continue
            if (
                ip.is_multicast
                or ip.is_unspecified
                or ip == ipaddress.IPv4Address("255.255.255.255")
            ):
                continue
            if ip.is_loopback and not self.on_loopback:
                continue
            usable.append(ip)
        for ip in usable:
            if any(ip in net for net in self.networks):
                return str(ip)
        return str(usable[0]) if usable else None

    def ignore(self, name: str, reason: str) -> None:
        log.debug("mDNS: ignoring %s: %s", name[:80], reason)
        if self.on_ignored is not None:
            self.on_ignored(name, reason)


def _checked_interfaces(interfaces: Sequence[str]) -> list[str]:
    """Explicit IPv4 addresses only: the one guard against multicasting everywhere."""
    if isinstance(interfaces, str):
        raise TypeError("interfaces must be a sequence of IPv4 addresses, not a string")
    out = []
    for item in interfaces:
        ip = ipaddress.IPv4Address(item)  # ValueError for anything else
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"{item!r} is not an interface address")
        out.append(str(ip))
    if not out:
        raise ValueError("mDNS needs at least one explicit IPv4 interface address")
    return list(dict.fromkeys(out))


def _networks(interfaces: Sequence[str]) -> list[ipaddress.IPv4Network]:
    prefixes = dict(local_ipv4_addresses())
    return [
        ipaddress.IPv4Network(f"{ip}/{prefixes.get(ip, 32)}", strict=False) for ip in interfaces
    ]


# ---- zeroconf side (worker threads) ---------------------------------------------------


def _open_zeroconf(interfaces: list[str]) -> Zeroconf:
    return Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)


def _browse(zc: Zeroconf, handler: Callable[..., None]) -> ServiceBrowser:
    # Multicast questions only: several nodes on one host share UDP port 5353, and a
    # unicast answer would reach just one of them.
    return ServiceBrowser(zc, SERVICE_TYPE, handlers=[handler], question_type=DNSQuestionType.QM)


def _lookup(zc: Zeroconf, name: str) -> _Resolved | None:
    info = ServiceInfo(SERVICE_TYPE, name)
    try:
        if not info.load_from_cache(zc):
            info.request(zc, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM)
    except Exception as exc:  # zeroconf closing under us, malformed cache entries
        log.debug("mDNS: lookup of %s failed: %r", name[:80], exc)
        return None
    props: dict[bytes, bytes | None] = dict(info.properties or {})
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not props or not addresses:
        return None
    return _Resolved(props, info.port, addresses)


def _register(zc: Zeroconf, info: ServiceInfo) -> bool:
    """Announce; on a name conflict keep browsing without announcing.

    Our instance name is derived from our peer id, so a conflict means another copy of
    this node (same data dir) or someone squatting our name. Crashing would hand that
    someone a denial of service; browsing still finds peers, and they find us by our
    own dials, bootstrap addresses or peer exchange.
    """
    try:
        zc.register_service(info)
    except ZeroconfError as exc:
        log.error("mDNS: cannot announce %s (%r); browsing only", info.name, exc)
        return False
    return True


def _close(zc: Zeroconf, browser: ServiceBrowser | None, info: ServiceInfo | None) -> None:
    """Goodbye first (peers drop us at once), then stop browsing and close the sockets."""
    steps: list[Callable[[], Any]] = []
    if info is not None:
        steps.append(lambda: zc.unregister_service(info))
    if browser is not None:
        steps.append(browser.cancel)
    steps.append(zc.close)
    for step in steps:
        try:
            step()
        except Exception as exc:
            log.debug("mDNS: error while closing: %r", exc)
