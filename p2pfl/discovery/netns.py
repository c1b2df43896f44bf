"""Throwaway Linux network namespaces joined by a bridge: a LAN of "hosts" on one machine.

Test and benchmark tooling for discovery across hosts (root only). Every link lives
inside namespaces created here: the bridge sits in its own namespace and each host's
veth pair is created there and one end moved into the host, so the machine's own
interfaces are never touched. Names are unique per lab and everything is deleted on
exit, even after an error (processes started inside must be stopped by the caller
first, or they keep their namespace alive).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

SUBNET = "10.231.0"  # private addresses; only ever exist inside the lab's namespaces


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no `ip`, not permitted)."""


@dataclass
class Lab:
    tag: str
    hosts: list[str] = field(default_factory=list)  # one namespace per host
    addresses: list[str] = field(default_factory=list)  # host i's IPv4 address
    bridge: str = ""  # the namespace holding the bridge

    def argv(self, i: int, command: Sequence[str]) -> list[str]:
        """`command` run inside host i's namespace."""
        return ["ip", "netns", "exec", self.hosts[i], *command]

    def run(self, i: int, command: Sequence[str], timeout: float = 10.0) -> str:
        return _ip_run(self.argv(i, command), timeout)


def unavailable_reason() -> str | None:
    """Why a lab cannot be built here, or None if it can (tries a namespace for real)."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"p2t{secrets.token_hex(3)}p"
    try:
        _ip("netns", "add", probe)
    except (NetnsUnavailable, OSError) as exc:
        return f"`ip netns add` is not permitted here: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except NetnsUnavailable as exc:
        return f"cannot create a bridge inside a namespace: {exc}"
    finally:
        _quiet_delete(probe)
    return None


@contextmanager
def lab(n: int, subnet: str = SUBNET) -> Iterator[Lab]:
    """n hosts on one bridged /24; always removed on exit."""
    if not 1 <= n <= 200:
        raise ValueError("a lab has 1..200 hosts")
    tag = secrets.token_hex(3)
    made = Lab(tag)
    try:
        made.bridge = f"p2t{tag}b"
        _ip("netns", "add", made.bridge)
        _ip("-n", made.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", made.bridge, "link", "set", "br0", "up")
        for i in range(n):
            host = f"p2t{tag}n{i}"
            _ip("netns", "add", host)
            made.hosts.append(host)
            address = f"{subnet}.{i + 1}"
            _ip(
                "-n", made.bridge, "link", "add", f"v{i}", "type", "veth",
                "peer", "name", "e0", "netns", host,
            )  # fmt: skip
            _ip("-n", made.bridge, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", host, "addr", "add", f"{address}/24", "dev", "e0")
            _ip("-n", host, "link", "set", "e0", "up")
            _ip("-n", host, "link", "set", "lo", "up")
            made.addresses.append(address)
        yield made
    finally:
        for host in made.hosts:
            _quiet_delete(host)
        if made.bridge:
            _quiet_delete(made.bridge)


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces of a lab that still exist (for tests that check the cleanup)."""
    out = _ip_run(["ip", "netns", "list"], 10.0)
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"p2t{tag}")]


def _ip(*args: str) -> None:
    _ip_run(["ip", *args], 10.0)


def _ip_run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise NetnsUnavailable(str(exc)) from None
    if done.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _quiet_delete(namespace: str) -> None:
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)
