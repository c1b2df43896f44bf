"""Discovery across "hosts": three network namespaces on a Linux bridge, no --peer at all.

Runs only as root with `ip netns` working (skips with the reason otherwise). The bridge
lives in a fourth namespace and every address is a private 10.231.0.x inside the lab,
so nothing touches this machine's own interfaces (see `p2pfl.discovery.netns`). One
`p2pfl node` process per namespace; their status is read over the control sockets in
their data dirs (unix sockets are files, reachable from outside the namespaces). The
fixture always stops the processes and deletes the namespaces, then checks both.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pfl.control.client import ControlError, query
from p2pfl.discovery import netns

N = 3


@dataclass
class Mesh:
    lab: netns.Lab
    dirs: list[Path]
    federation: str
    statuses: list[dict[str, Any]]


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("netns")
    federation = "netns-" + secrets.token_hex(4)
    procs: list[subprocess.Popen[bytes]] = []
    dirs = [root / f"n{i}" for i in range(N)]
    with netns.lab(N) as lab:
        tag = lab.tag
        try:
            for i, ip in enumerate(lab.addresses):
                cmd = [
                    sys.executable, "-m", "p2pfl", "node",
                    "--listen", f"{ip}:7470",
                    "--mdns-interface", ip,
                    "--federation", federation,
                    "--no-peer-exchange",  # every link must come from mDNS
                    "--nodes", str(N), "--node-index", str(i),
                    "--rounds", "2", "--min-peers", str(N - 1),
                    "--round-timeout", "20",
                    "--data-dir", str(dirs[i]),
                ]  # fmt: skip
                log = (root / f"n{i}.log").open("w")
                procs.append(
                    subprocess.Popen(lab.argv(i, cmd), stdout=log, stderr=subprocess.STDOUT)
                )

            def status(i: int) -> dict[str, Any] | None:
                try:
                    return query(dirs[i] / "control.sock")
                except ControlError:
                    return None

            def all_done() -> bool:
                return all(
                    (st := status(i)) is not None and st["round"]["phase"] == "done"
                    for i in range(N)
                )

            if not wait_for(all_done, 90):
                tails = [(root / f"n{i}.log").read_text()[-3000:] for i in range(N)]
                pytest.fail("nodes did not finish 2 rounds:\n" + "\n---\n".join(tails))
            statuses = [status(i) for i in range(N)]
            yield Mesh(lab, dirs, federation, [s for s in statuses if s is not None])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(timeout=20))
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes.append(p.wait())
    assert netns.leftover_namespaces(tag) == []
    assert codes == [0] * N, codes


def test_three_hosts_find_each_other_by_mdns_and_finish_two_rounds(mesh: Mesh) -> None:
    ids = {st["node"]["id"] for st in mesh.statuses}
    assert len(ids) == N
    links: dict[frozenset[str], set[str]] = {}
    for st, ip in zip(mesh.statuses, mesh.lab.addresses, strict=True):
        me = st["node"]["id"]
        assert st["round"]["current"] == 2
        assert st["history"][-1]["peers_heard"] == N - 1
        connected = [p for p in st["peers"] if p["state"] == "connected"]
        assert {p["id"] for p in connected} == ids - {me}
        for p in connected:
            assert p["found_via"] in ("mdns", "inbound")
            assert p["address"].rpartition(":")[0] in mesh.lab.addresses
            links.setdefault(frozenset((me, p["id"])), set()).add(p["found_via"])
        assert st["node"]["listen"] == [f"{ip}:7470"]
    assert len(links) == 3 and all("mdns" in v for v in links.values())
    assert len({st["model"]["hash"] for st in mesh.statuses}) == 1


def test_a_plain_dns_client_in_a_namespace_reads_our_records(mesh: Mesh) -> None:
    """Independent of zeroconf: one RFC 6762 legacy unicast query from host 0."""
    ip = mesh.lab.addresses[0]
    ids = {st["node"]["id"] for st in mesh.statuses}
    seen: dict[str, Any] = {}
    for _ in range(3):  # UDP on a loaded 2-core host: ask again rather than wait long
        out = mesh.lab.run(0, [sys.executable, "-m", "p2pfl.discovery.probe", ip, "1.5"], 30)
        seen.update({s["txt"].get("id"): s for s in json.loads(out)})
        if ids <= set(seen):
            break
    assert ids <= set(seen)
    for st, addr in zip(mesh.statuses, mesh.lab.addresses, strict=True):
        svc = seen[st["node"]["id"]]
        assert svc["port"] == 7470 and svc["addresses"] == [addr]
        assert svc["txt"]["fed"] == mesh.federation


AVAHI_TOOLS = ("avahi-daemon", "avahi-browse", "dbus-daemon")
# Only for the bus we start ourselves: root (the only user in it) may own and call anything.
AVAHI_BUS_CONFIG = """<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""
AVAHI_DAEMON_CONFIG = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces={interface}
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
disable-publishing=yes
"""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def avahi(mesh: Mesh, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """A D-Bus system bus and an avahi-daemon of our own, inside host 0's namespace only.

    Why this way: avahi-browse asks a running avahi-daemon over the *system* D-Bus, and
    neither may touch the machine's own bus or interfaces. So both daemons run under
    `ip netns exec` (no eth0 exists in there, and `allow-interfaces` names the host's
    veth anyway); the bus listens on a socket in our tmp dir, found by the
    DBUS_SYSTEM_BUS_ADDRESS the daemon and the browser are given; avahi's fixed pid
    directory is a tmpfs mounted in the private mount namespace `ip netns exec` makes,
    so a system avahi-daemon (if any) is never disturbed. Both are stopped afterwards.
    Yields the environment for avahi-browse and the daemon's log.
    """
    missing = [tool for tool in AVAHI_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: avahi-daemon avahi-utils dbus)")
    socket = tmp_path / "system_bus"
    (tmp_path / "bus.conf").write_text(AVAHI_BUS_CONFIG.format(socket=socket))
    (tmp_path / "avahi.conf").write_text(AVAHI_DAEMON_CONFIG.format(interface="e0"))
    env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket}"}
    bus_log = (tmp_path / "dbus.log").open("wb")
    bus = subprocess.Popen(
        mesh.lab.argv(0, ["dbus-daemon", f"--config-file={tmp_path / 'bus.conf'}", "--nofork"]),
        stdout=bus_log,
        stderr=subprocess.STDOUT,
    )
    daemon: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "avahi.log"
    try:
        if not wait_for(lambda: socket.exists() or bus.poll() is not None, 10) or not (
            socket.exists()
        ):
            pytest.fail("dbus-daemon did not start:\n" + (tmp_path / "dbus.log").read_text())
        script = (
            "mkdir -p /run/avahi-daemon && mount -t tmpfs p2pfl-avahi /run/avahi-daemon && "
            'exec avahi-daemon -f "$1" --no-drop-root --no-chroot --no-rlimits'
        )
        daemon = subprocess.Popen(
            mesh.lab.argv(0, ["env", *(f"{k}={v}" for k, v in env.items()), "sh", "-c",
                              script, "sh", str(tmp_path / "avahi.conf")]),
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        yield {**env}, log_path
    finally:
        if daemon is not None:
            _stop(daemon)
        _stop(bus)
        bus_log.close()


def test_avahi_browse_in_a_namespace_sees_the_nodes(
    mesh: Mesh, avahi: tuple[dict[str, str], Path]
) -> None:
    """A third-party mDNS stack (avahi) finds and resolves every node's service."""
    env, log_path = avahi
    ids = {st["node"]["id"] for st in mesh.statuses}
    wanted = {f"p2pfl-{i}" for i in ids}
    by_name: dict[str, list[str]] = {}
    errors: list[str] = []

    def browse() -> bool:
        # -t: stop once the cache is listed; retried, since the daemon may still be
        # starting or waiting for answers on a loaded host.
        argv = ["env", *(f"{k}={v}" for k, v in env.items())]
        argv += ["avahi-browse", "-rpt", "_p2pfl._tcp"]
        try:
            out = mesh.lab.run(0, argv, timeout=20)
        except netns.NetnsUnavailable as exc:
            errors.append(str(exc))
            return False
        for line in out.splitlines():
            fields = line.split(";")
            if fields[0] == "=" and len(fields) > 9:
                by_name[fields[3]] = fields
        return wanted <= set(by_name)

    if not wait_for(browse, 60):
        pytest.fail(
            f"avahi saw {sorted(by_name)}, wanted {sorted(wanted)}; last error: "
            f"{errors[-1:]}\navahi-daemon log:\n{log_path.read_text()[-3000:]}"
        )
    for st, address in zip(mesh.statuses, mesh.lab.addresses, strict=True):
        # =;iface;proto;name;type;domain;host;address;port;txt
        fields = by_name[f"p2pfl-{st['node']['id']}"]
        assert fields[1] == "e0" and fields[2] == "IPv4"
        assert (fields[7], fields[8]) == (address, "7470")
        assert f'"fed={mesh.federation}"' in fields[9]
    log = log_path.read_text()
    assert "on interface e0.IPv4" in log and "eth0" not in log


def test_a_lab_is_removed_even_when_its_user_fails() -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    tag = ""
    with pytest.raises(RuntimeError, match="boom"), netns.lab(2) as lab:
        tag = lab.tag
        assert set(netns.leftover_namespaces(tag)) == {lab.bridge, *lab.hosts}
        assert "10.231.0.2/24" in lab.run(1, ["ip", "-br", "addr"])
        raise RuntimeError("boom")
    assert tag and netns.leftover_namespaces(tag) == []
