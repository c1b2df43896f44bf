"""mDNS discovery: TXT claims (pure), interface rules, and zeroconf on 127.0.0.1.

The zeroconf tests use real time (zeroconf runs its own thread, a mock clock cannot
drive it), bounded by `trio.fail_after`; durations are never asserted. Every zeroconf
instance here binds 127.0.0.1 only, and each test uses its own federation name so
parallel runs on this host never see each other's services as peers.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import IPVersion, NonUniqueNameException, ServiceInfo, Zeroconf

from p2pfl import PROTOCOL_VERSION
from p2pfl.config import NodeConfig
from p2pfl.discovery import mdns, probe
from p2pfl.discovery.mdns import SERVICE_TYPE, default_interfaces, run_mdns, select_interfaces
from p2pfl.discovery.txt import (
    MAX_TXT_ENTRIES,
    Claim,
    TxtError,
    encode_txt,
    host_name,
    instance_name,
    parse_txt,
    peer_id_of_instance,
)
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.scenario.schema import ScenarioError, parse_scenario
from p2pfl.transport.base import Connection
from p2pfl.transport.tcp import TcpTransport

A = Identity.from_seed(b"\x01" * 32).peer_id
B = Identity.from_seed(b"\x02" * 32).peer_id


def raw(**fields: str | None) -> dict[bytes, bytes | None]:
    return {k.encode(): None if v is None else v.encode() for k, v in fields.items()}


def good(**changes: str | None) -> dict[bytes, bytes | None]:
    fields: dict[str, str | None] = {"id": A, "fed": "lab", "v": str(PROTOCOL_VERSION)}
    fields["port"] = "7470"
    fields.update(changes)
    return raw(**{k: v for k, v in fields.items()})


# ---- TXT claims (sans-IO) ----------------------------------------------------------------


def test_encode_then_parse_round_trips() -> None:
    props = encode_txt(A, "lab", 7470)
    claim = parse_txt(raw(**props), expect_federation="lab")
    assert claim == Claim(A, "lab", PROTOCOL_VERSION, 7470)


def test_extra_unknown_keys_are_tolerated() -> None:
    claim = parse_txt({**good(), b"future": b"x", b"flag": None}, expect_federation="lab")
    assert claim.peer_id == A


@pytest.mark.parametrize(
    ("props", "reason"),
    [
        (good(fed="other"), "other_federation"),
        (good(fed=""), "bad_federation"),
        (good(fed="x" * 65), "bad_federation"),
        (good(v=str(PROTOCOL_VERSION + 1)), "incompatible_version"),
        (good(v="one"), "bad_version"),
        (good(v="1.0"), "bad_version"),
        (good(id="not-a-peer-id"), "bad_id"),
        (good(id=A.upper()), "bad_id"),
        (good(id=A + "a"), "bad_id"),
        (good(port="0"), "bad_port"),
        (good(port="65536"), "bad_port"),
        (good(port="-1"), "bad_port"),
        (good(port=" 80"), "bad_port"),
        (good(port="\u00b2"), "bad_port"),  # a unicode digit that int() would refuse
        (good(port="123456"), "bad_port"),
        (good(port=None), "missing"),
        (good(fed="lab\n"), "not_text"),
        ({k: v for k, v in good().items() if k != b"id"}, "missing"),
        ({**good(), b"\xff": b"x"}, "not_text"),
        ({**good(), b"fed": b"\xc3"}, "not_text"),
        ({**good(), **{f"k{i}".encode(): b"" for i in range(MAX_TXT_ENTRIES)}}, "too_many_entries"),
        (good(fed="x" * 256), "too_long"),
        ({**good(), **{f"k{i}".encode(): b"y" * 250 for i in range(6)}}, "too_long"),
    ],
)
def test_bad_claims_are_refused_with_a_reason(
    props: dict[bytes, bytes | None], reason: str
) -> None:
    with pytest.raises(TxtError) as info:
        parse_txt(props, expect_federation="lab")
    assert info.value.reason == reason


def test_duplicate_keys_are_refused() -> None:
    pairs = [*good().items(), (b"id", B.encode())]
    with pytest.raises(TxtError) as info:
        parse_txt(pairs, expect_federation="lab")
    assert info.value.reason == "duplicate"


def test_we_never_publish_a_record_we_would_refuse() -> None:
    with pytest.raises(TxtError):
        encode_txt(A, "x" * 65, 7470)
    with pytest.raises(TxtError):
        encode_txt(A, "lab", 0)


@settings(max_examples=60)
@given(
    st.dictionaries(
        st.binary(max_size=12),
        st.none() | st.binary(max_size=300),
        max_size=20,
    ),
    st.sampled_from(["lab", "default"]),
)
def test_parse_txt_only_ever_raises_txt_error(
    props: dict[bytes, bytes | None], federation: str
) -> None:
    try:
        claim = parse_txt(props, expect_federation=federation)
    except TxtError:
        return
    assert claim.federation == federation and 1 <= claim.port <= 65535


def test_instance_names_carry_the_peer_id() -> None:
    name = instance_name(A)
    assert name.endswith("." + SERVICE_TYPE)
    assert len(name.split(".")[0]) <= 63  # one DNS label
    assert peer_id_of_instance(name) == A
    assert host_name(A).endswith(".local.")
    for foreign in (
        f"printer.{SERVICE_TYPE}",
        f"p2pfl-{A}._http._tcp.local.",
        f"p2pfl-{A}x.{SERVICE_TYPE}",
        f"p2pfl-.{SERVICE_TYPE}",
    ):
        assert peer_id_of_instance(foreign) is None


# ---- interfaces --------------------------------------------------------------------------

LOCAL = [("127.0.0.1", 8), ("192.168.1.20", 24), ("10.0.0.5", 8)]


def test_interface_rules() -> None:
    assert select_interfaces("0.0.0.0", LOCAL) == ["10.0.0.5", "192.168.1.20"]
    assert select_interfaces("", LOCAL) == ["10.0.0.5", "192.168.1.20"]
    assert select_interfaces("192.168.1.20", LOCAL) == ["192.168.1.20"]
    assert select_interfaces("127.0.0.1", LOCAL) == ["127.0.0.1"]
    assert select_interfaces("localhost", LOCAL) == ["127.0.0.1"]
    assert select_interfaces("::1", LOCAL) == []
    assert select_interfaces("example.org", LOCAL) == []
    assert select_interfaces("0.0.0.0", [("127.0.0.1", 8)]) == []


def test_default_interfaces_on_this_host() -> None:
    assert default_interfaces("127.0.0.1") == ["127.0.0.1"]
    assert "127.0.0.1" not in default_interfaces("0.0.0.0")


@pytest.mark.parametrize(
    "interfaces", [[], ["0.0.0.0"], ["224.0.0.251"], ["::1"], ["eth0"], "127.0.0.1"]
)
async def test_run_mdns_refuses_implicit_or_bad_interfaces(interfaces: list[str]) -> None:
    with pytest.raises((ValueError, TypeError)):
        await run_mdns(
            peer_id=A,
            federation="lab",
            port=7470,
            address="127.0.0.1",
            interfaces=interfaces,
            on_found=lambda i, a: None,
            on_removed=lambda i: None,
        )


def make_tracker(
    interfaces: list[str], found: list[tuple[str, str]], ignored: list[str]
) -> mdns._Tracker:
    return mdns._Tracker(
        B,
        "lab",
        interfaces,
        lambda i, a: found.append((i, a)),
        lambda i: None,
        lambda name, reason: ignored.append(reason),
    )


def test_tracker_checks_name_port_and_addresses() -> None:
    found: list[tuple[str, str]] = []
    ignored: list[str] = []
    t = make_tracker(["127.0.0.1"], found, ignored)
    name = instance_name(A)
    t.accept(name, B, mdns._Resolved(good(), 7470, ["127.0.0.1"]))  # TXT id A, name says B
    t.accept(name, A, mdns._Resolved(good(), 7471, ["127.0.0.1"]))  # SRV port differs
    t.accept(name, A, mdns._Resolved(good(), 7470, ["224.0.0.1", "0.0.0.0"]))
    assert ignored == ["name_mismatch", "port_mismatch", "no_usable_address"]
    assert found == []
    t.accept(name, A, mdns._Resolved(good(), 7470, ["127.0.0.1"]))
    t.accept(name, A, mdns._Resolved(good(), 7470, ["127.0.0.1"]))  # no news: no callback
    assert found == [(A, "127.0.0.1:7470")]


def test_tracker_refuses_loopback_from_a_lan_and_prefers_our_network() -> None:
    found: list[tuple[str, str]] = []
    ignored: list[str] = []
    t = make_tracker(["10.1.2.3"], found, ignored)
    t.networks = [ipaddress.IPv4Network("10.1.2.0/24")]
    assert t.pick_address(["127.0.0.1"]) is None
    assert t.pick_address(["172.16.0.9", "10.1.2.7"]) == "10.1.2.7"
    assert t.pick_address(["172.16.0.9"]) == "172.16.0.9"


# ---- zeroconf on 127.0.0.1 ---------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.found: dict[str, dict[str, str]] = defaultdict(dict)
        self.removed: dict[str, list[str]] = defaultdict(list)
        self.ignored: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def callbacks(
        self, me: str
    ) -> tuple[Callable[[str, str], None], Callable[[str], None], Callable[[str, str], None]]:
        return (
            lambda pid, addr: self.found[me].__setitem__(pid, addr),
            lambda pid: self.removed[me].append(pid),
            lambda name, reason: self.ignored[me].append((name, reason)),
        )


async def wait_until(predicate: Callable[[], bool], timeout: float = 8.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def start_mdns(
    nursery: trio.Nursery, rec: Recorder, peer_id: str, federation: str, port: int
) -> trio.CancelScope:
    """Start one announcer in its own cancel scope (registration takes ~1.6 s, so all
    of a test's announcers are started concurrently and awaited together)."""
    scope = trio.CancelScope()
    found, removed, ignored = rec.callbacks(peer_id)

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await run_mdns(
                peer_id=peer_id,
                federation=federation,
                port=port,
                address="127.0.0.1",
                interfaces=["127.0.0.1"],
                on_found=found,
                on_removed=removed,
                on_ignored=ignored,
                task_status=task_status,
            )

    await nursery.start(run)
    return scope


async def start_all(
    nursery: trio.Nursery, rec: Recorder, specs: list[tuple[str, str, int]]
) -> list[trio.CancelScope]:
    scopes: list[trio.CancelScope | None] = [None] * len(specs)

    async def one(i: int) -> None:
        scopes[i] = await start_mdns(nursery, rec, *specs[i])

    async with trio.open_nursery() as starters:
        for i in range(len(specs)):
            starters.start_soon(one, i)
    return [s for s in scopes if s is not None]


async def test_three_nodes_find_each_other_ignore_another_federation_and_see_goodbyes() -> None:
    fed = "t-" + secrets.token_hex(4)
    ids = [Identity.generate().peer_id for _ in range(4)]
    ports = [41001, 41002, 41003, 41004]
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        specs = [(ids[i], fed, ports[i]) for i in range(3)] + [(ids[3], fed + "-x", ports[3])]
        scopes = await start_all(nursery, rec, specs)
        members = ids[:3]

        def meshed() -> bool:
            return all(len(rec.found[m]) == 2 for m in members)

        def outsider_refused() -> bool:
            return all(any(r == "other_federation" for _, r in rec.ignored[m]) for m in members)

        await wait_until(lambda: meshed() and outsider_refused())
        for i, me in enumerate(members):
            expected = {ids[j]: f"127.0.0.1:{ports[j]}" for j in range(3) if j != i}
            assert rec.found[me] == expected  # right ids and addresses, not ourselves
        assert rec.found[ids[3]] == {}  # the outsider sees nobody of ours either

        # A plain DNS client (one legacy unicast query, no zeroconf) reads our records.
        # UDP on a busy host: ask up to a few times and merge what comes back.
        ours: dict[str | None, probe.Service] = {}
        for _ in range(4):
            seen = await trio.to_thread.run_sync(probe.query, "127.0.0.1", SERVICE_TYPE, 0.7)
            ours.update({s.txt.get("id"): s for s in seen if s.txt.get("fed") == fed})
            if set(ours) == set(members):
                break
        assert set(ours) == set(members)
        for i, m in enumerate(members):
            assert ours[m].name == instance_name(m)
            assert ours[m].port == ports[i] and ours[m].txt["port"] == str(ports[i])
            assert ours[m].addresses == ["127.0.0.1"]
            assert ours[m].txt["v"] == str(PROTOCOL_VERSION)

        scopes[0].cancel()  # clean shutdown: goodbye packets
        await wait_until(lambda: all(rec.removed[m] == [ids[0]] for m in members[1:]))
        nursery.cancel_scope.cancel()


def fake_service(name_id: str, claimed_id: str, federation: str, port: int) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        instance_name(name_id),
        port=port,
        properties={
            "id": claimed_id,
            "fed": federation,
            "v": str(PROTOCOL_VERSION),
            "port": str(port),
        },
        server=host_name(name_id),
        addresses=[socket.inet_aton("127.0.0.1")],
    )


def test_a_squatted_instance_name_stops_announcing_not_the_node() -> None:
    class Conflicting:
        def register_service(self, info: ServiceInfo) -> None:
            raise NonUniqueNameException(info.name)

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.ERROR)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    # Our own handler: the p2pfl logger may not propagate to pytest's once set up.
    handler = Collect()
    mdns.log.addHandler(handler)
    try:
        info = fake_service(A, A, "lab", 7470)
        assert mdns._register(Conflicting(), info) is False  # type: ignore[arg-type]
    finally:
        mdns.log.removeHandler(handler)
    assert any("browsing only" in m for m in handler.messages)


# ---- scenario files: discovery = "mdns" | "bootstrap" ------------------------------------


def scenario_doc(**extra: object) -> dict[str, object]:
    return {"name": "s", "nodes": 3, "rounds": 2, **extra}


def test_scenario_mdns_discovery_maps_to_node_configs(tmp_path: Path) -> None:
    addrs = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    dirs = [tmp_path / f"n{i}" for i in range(3)]
    values = parse_scenario(scenario_doc(discovery="mdns")).node_config_values(addrs, dirs)
    assert all(v["peers"] == () and v["mdns"] is True for v in values)
    assert all(v["mdns_interfaces"] == ("127.0.0.1",) for v in values)
    federations = {v["federation"] for v in values}
    assert len(federations) == 1 and federations != {"default"}  # this run's own
    other = parse_scenario(scenario_doc(discovery="mdns")).node_config_values(
        ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"], dirs
    )
    assert other[0]["federation"] not in federations  # concurrent runs stay apart
    for v in values:
        NodeConfig(**v).validated()


def test_scenario_bootstrap_is_the_default_and_in_memory_runs_keep_it(tmp_path: Path) -> None:
    dirs = [tmp_path / f"n{i}" for i in range(3)]
    boot = parse_scenario(scenario_doc()).node_config_values(
        ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"], dirs
    )
    assert boot[0]["mdns"] is False and len(boot[0]["peers"]) == 2
    mem = parse_scenario(scenario_doc(discovery="mdns")).node_config_values(
        ["mem:n0", "mem:n1", "mem:n2"], dirs
    )
    assert mem[0]["mdns"] is False and mem[0]["peers"] == ("mem:n1", "mem:n2")


@pytest.mark.parametrize(
    "doc",
    [
        scenario_doc(discovery="avahi"),
        scenario_doc(discovery=True),
        scenario_doc(discovery="mdns", topology={"kind": "ring"}),
    ],
)
def test_scenario_discovery_errors_name_the_key(doc: dict[str, object]) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(doc)
    assert info.value.path == "discovery"


# ---- the independent DNS parser used above -----------------------------------------------


def test_probe_parser_reads_names_with_compression_and_refuses_loops() -> None:
    packet = b"\x00" * 12 + b"\x03abc\x05local\x00" + b"\x03www\xc0\x0c"
    assert probe.read_name(packet, 12) == ("abc.local.", 23)
    assert probe.read_name(packet, 23) == ("www.abc.local.", 29)
    with pytest.raises(probe.DnsFormatError):
        probe.read_name(b"\x00" * 12 + b"\xc0\x0c", 12)  # points at itself
    with pytest.raises(probe.DnsFormatError):
        probe.read_name(b"\x05ab", 0)  # runs past the end
    with pytest.raises(probe.DnsFormatError):
        probe.read_name(b"\x3f" + b"a" * 63 + (b"\x3f" + b"a" * 63) * 4 + b"\x00", 0)


@settings(max_examples=60)
@given(st.binary(max_size=200))
def test_probe_parser_only_raises_dns_format_error(packet: bytes) -> None:
    response = b"\x12\x34\x84\x00" + packet
    services: dict[str, probe.Service] = {}
    try:
        probe.merge(services, probe.parse_response(response))
    except probe.DnsFormatError:
        return
    assert all(isinstance(name, str) for name in services)


# ---- real nodes (TLS on 127.0.0.1) that only know each other through mDNS ----------------


def mdns_node(tmp: Path, i: int, federation: str, **overrides: object) -> Node:
    fields: dict[str, object] = {
        "data_dir": tmp / f"n{i}",
        "listen": "127.0.0.1:0",
        "peers": (),
        "mdns": True,
        "mdns_interfaces": ("127.0.0.1",),
        "federation": federation,
        "peer_exchange": False,  # every connection must come from mDNS alone
        "nodes": 3,
        "node_index": i,
        "min_peers": 2,
        "rounds": 2,
        "round_timeout": 20.0,
        **overrides,
    }
    config = NodeConfig(**fields).validated()  # type: ignore[arg-type]
    return Node(config, identity=Identity.generate(), control_socket=False)


async def test_three_nodes_with_no_peers_form_a_mesh_by_mdns_and_finish_two_rounds(
    tmp_path: Path,
) -> None:
    fed = "t-" + secrets.token_hex(4)
    nodes = [mdns_node(tmp_path, i, fed) for i in range(3)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            for node in nodes:
                await node.done.wait()
            statuses = [node.status() for node in nodes]
            nursery.cancel_scope.cancel()
    ids = {node.id for node in nodes}
    found_via: dict[frozenset[str], set[str]] = defaultdict(set)
    for node, status in zip(nodes, statuses, strict=True):
        assert status["round"]["current"] == 2
        assert status["history"][-1]["peers_heard"] == 2
        connected = {p["id"]: p for p in status["peers"] if p["state"] == "connected"}
        assert set(connected) == ids - {node.id}
        for peer, p in connected.items():
            assert p["found_via"] in ("mdns", "inbound")
            found_via[frozenset((node.id, peer))].add(p["found_via"])
    # Each of the 3 links was dialed by someone who learnt the address from mDNS.
    assert len(found_via) == 3 and all("mdns" in v for v in found_via.values())
    assert len({status["model"]["hash"] for status in statuses}) == 1


async def test_a_spoofed_txt_id_never_becomes_a_neighbour(tmp_path: Path) -> None:
    """A record claims id X at the address of a listener whose key is Y: the dial expects
    X, the TLS check sees Y, the node counts a handshake failure and holds off."""
    fed = "t-" + secrets.token_hex(4)
    claimed = Identity.generate().peer_id
    decoy = TcpTransport(Identity.generate(), federation=fed, host="127.0.0.1", port=0)
    node = mdns_node(tmp_path, 0, fed, min_peers=1, rounds=1)
    accepted: list[str] = []

    async def on_inbound(conn: Connection) -> None:
        accepted.append(conn.peer_id)
        await conn.aclose()

    zc = await trio.to_thread.run_sync(
        lambda: Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    )
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                decoy_addr = (await nursery.start(decoy.listen, on_inbound))[0]
                port = int(decoy_addr.rpartition(":")[2])
                fake = fake_service(claimed, claimed, fed, port)

                async def register_fake() -> None:
                    await trio.to_thread.run_sync(zc.register_service, fake)

                nursery.start_soon(register_fake)
                await nursery.start(node.run)
                await wait_until(lambda: node.counters["handshake_failures"] >= 1, 20)
                await trio.sleep(1.0)  # four dial-loop passes: no redial storm
                status = node.status()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(zc.close)
    assert status["counters"]["handshake_failures"] == 1
    assert [p for p in status["peers"] if p["state"] == "connected"] == []
    assert claimed not in {p["id"] for p in status["peers"]}
    assert decoy.identity.peer_id not in {p["id"] for p in status["peers"]}
    assert node.peers.targets[f"127.0.0.1:{port}"].found_via == "mdns"
    # The TLS handshake itself worked (same federation CA): it was the id check that
    # refused, after exactly one dial.
    assert accepted == [node.id]
