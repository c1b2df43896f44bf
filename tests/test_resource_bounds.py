"""Memory and time bounds against ADMITTED peers (docs/security.md, "Resource bounds").

In an open federation anyone who reaches the port completes mutual TLS with a valid
identity, so every bound here is exercised by real peers with real identities.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from p2pfl.compression import UpdateEncoder, parse_pipeline
from p2pfl.config import ConfigError, NodeConfig, coerce
from p2pfl.identity import Identity
from p2pfl.membership import PeerTable
from p2pfl.node import Node
from p2pfl.secure.group_messages import (
    MAX_GROUP,
    GroupMean,
    GroupOffer,
    MaskedVector,
    MaskList,
    Unmasking,
)
from p2pfl.secure.messages import MAX_PARTICIPANTS
from p2pfl.secure.shamir import SHARE_LEN
from p2pfl.secure.wire import group_from_envelope, to_envelope
from p2pfl.transport import tcp
from p2pfl.transport.base import Connection, HandshakeError, TransportLimits
from p2pfl.transport.budget import TRIM_ABOVE, ReceiveBudget, give_back_memory
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from p2pfl.transport.tcp import ACCEPT, BUSY, TcpConnection, TcpTransport, parse_address
from p2pfl.transport.tls import make_ssl_context
from p2pfl.wire import codec
from p2pfl.wire.address import MAX_ADDR_LEN
from p2pfl.wire.codec import MAX_LISTEN, MAX_PEERS
from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import FRAME_HEADROOM, Part, frame_header, frame_limit_for
from p2pfl.wire.messages import (
    CompressedModelUpdate,
    Hello,
    ModelUpdate,
    PeerList,
    StateReply,
)

NODE = Identity.from_seed(b"\x10" * 32)
PEERS = [Identity.from_seed(bytes([0x20 + i]) * 32) for i in range(4)]
MiB = 1024 * 1024


async def raw_peer(
    identity: Identity, address: str, *, expect: bytes = ACCEPT
) -> trio.SSLStream[trio.SocketStream]:
    """An admitted peer that writes raw bytes: a valid identity, TLS, nothing else."""
    host, port = parse_address(address)
    stream = await trio.open_tcp_stream(host, port)
    ssl_stream = trio.SSLStream(
        stream, make_ssl_context(identity, "default", None, server=False), server_side=False
    )
    await ssl_stream.do_handshake()
    assert await ssl_stream.receive_some(1) == expect
    return ssl_stream


async def send_partial_frame(
    stream: trio.SSLStream[trio.SocketStream], announced: int, sent: int
) -> bool:
    """Announce a frame of `announced` bytes and send `sent` of them; False if cut off."""
    chunk = b"\x00" * (256 * 1024)
    try:
        await stream.send_all(frame_header(announced))
        left = sent
        while left > 0:
            await stream.send_all(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def closed_by_node(stream: trio.SSLStream[trio.SocketStream]) -> bool:
    """Read until the node hangs up (it also sends us hellos and pings meanwhile)."""
    try:
        while await stream.receive_some(64 * 1024):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return True


def tls_node(tmp_path: Path, **fields: object) -> Node:
    config = NodeConfig(
        data_dir=tmp_path / "node",
        listen="127.0.0.1:0",
        mdns=False,
        min_peers=1,
        rounds=0,
        **fields,  # type: ignore[arg-type]
    ).validated()
    return Node(config, identity=NODE, train_in_thread=False, control_socket=False)


async def until(condition: object) -> None:
    """Poll a condition (callable) until true; the caller bounds it with fail_after."""
    assert callable(condition)
    while not condition():
        await trio.sleep(0.01)


# --- the reproduction: four admitted peers each announce a 250 MiB frame ------------------


async def test_four_peers_announcing_huge_frames_are_cut_off_for_a_small_model(
    tmp_path: Path,
) -> None:
    """Issue 12, reproduction 4, with the default configuration. The node's model is
    2.6 KB, so a 250 MiB announcement can only be an attack: refused at the header,
    before a byte of it is buffered (it used to be buffered up to 256 MiB per link)."""
    node = tls_node(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        (address,) = node.listen_addresses
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            peers = [await raw_peer(p, address) for p in PEERS]
            async with trio.open_nursery() as senders:
                for stream in peers:
                    senders.start_soon(send_partial_frame, stream, 250 * MiB, 4 * MiB)
                    senders.start_soon(closed_by_node, stream)
        assert node.frames_rejected["oversize"] == len(PEERS)
        for stream in peers:
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def test_four_peers_holding_partial_frames_stay_within_the_receive_budget(
    tmp_path: Path,
) -> None:
    """The same attack when the operator allows big frames: four peers each announce a
    1 MiB frame and send 600 KiB of it. The budget (2 MiB) admits two of those frames;
    the other two wait, unread, in TCP. Nothing is held after the peers close."""
    node = tls_node(tmp_path, max_frame_size=MiB, receive_budget=2 * MiB, heartbeat_timeout=60.0)
    transport = node.transport
    assert isinstance(transport, TcpTransport)
    budget = transport.budget
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        (address,) = node.listen_addresses
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            peers = [await raw_peer(p, address) for p in PEERS]
            async with trio.open_nursery() as senders:
                for stream in peers:
                    senders.start_soon(send_partial_frame, stream, MiB, 600 * 1024)
                # Two frames are admitted and all of their 600 KiB read; the other two
                # wait for the budget, their bytes unread (in the kernel, or unsent).
                await until(
                    lambda: (
                        budget.used == 2 * MiB
                        and budget.waiting == 2
                        and transport.buffered() == 2 * 600 * 1024 + 4 * len(PEERS)  # + headers
                    )
                )
                senders.cancel_scope.cancel()
            assert budget.peak <= budget.capacity == 2 * MiB
            for stream in peers:
                await trio.aclose_forcefully(stream)
            await until(lambda: transport.stats()["connections"] == 0)
        assert budget.used == 0 and budget.waiting == 0
        assert transport.buffered() == 0
        assert budget.peak <= 2 * MiB
        nursery.cancel_scope.cancel()


# --- the receive budget itself -------------------------------------------------------------


async def test_budget_grants_in_order_and_never_exceeds_its_capacity() -> None:
    budget = ReceiveBudget(100)
    got: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.reserve(size)
        got.append(name)

    await budget.reserve(80)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "big", 60)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 10)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.waiting == 2
        budget.release(30)  # 50 used: "small" would fit, but "big" asked first
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.used == 50
        budget.release(50)
    assert sorted(got) == ["big", "small"]
    assert budget.used == 70 and budget.peak == 80 and budget.waits == 2
    with pytest.raises(ValueError):
        budget.release(71)
    with pytest.raises(ValueError):
        budget.try_reserve(101)  # can never fit


async def test_a_cancelled_wait_leaves_nothing_reserved_and_unblocks_the_queue() -> None:
    budget = ReceiveBudget(100)
    await budget.reserve(50)
    got: list[int] = []

    async def take(size: int) -> None:
        await budget.reserve(size)
        got.append(size)

    async with trio.open_nursery() as nursery:
        head = trio.CancelScope()
        nursery.start_soon(_in_scope, head, budget, 60)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, 40)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.waiting == 2  # 40 fits, but waits behind 60
        head.cancel()
    assert got == [40] and budget.used == 90 and budget.waiting == 0


async def _in_scope(scope: trio.CancelScope, budget: ReceiveBudget, size: int) -> None:
    with scope:
        await budget.reserve(size)


# --- per-frame and budget-wait deadlines (mock clock, real TLS on loopback) ---------------


class Recorder:
    """Listener handler: keeps every payload and the error that ended each connection."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.errors: list[WireError] = []
        self.conns: list[TcpConnection] = []

    async def __call__(self, conn: Connection) -> None:
        assert isinstance(conn, TcpConnection)
        self.conns.append(conn)  # kept alive on purpose: it must not pin its buffers
        try:
            while True:
                self.payloads.append(await conn.receive())
        except WireError as exc:
            self.errors.append(exc)
            raise


HANG = 1000.0  # mock seconds: a test whose bound is gone fails instead of hanging
SLOW = TransportLimits(
    max_frame_size=64 * 1024, receive_budget=64 * 1024, frame_timeout=5.0, frame_min_rate=1024
)


async def test_a_frame_that_stalls_after_its_header_is_cut_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dropped: list[int] = []
    monkeypatch.setattr(tcp, "give_back_memory", dropped.append)
    server = TcpTransport(NODE, limits=SLOW)
    got = Recorder()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, got)
        stream = await raw_peer(PEERS[0], address)
        start = trio.current_time()
        with caplog.at_level(logging.WARNING, logger="p2pfl.transport"):
            await stream.send_all(frame_header(10_000) + b"x" * 1000)
            with trio.fail_after(HANG):
                await closed_by_node(stream)
        # 5 s floor + 10 000 bytes at 1 KiB/s; mock time, so exact
        assert trio.current_time() - start == pytest.approx(SLOW.frame_deadline(10_000), abs=0.1)
        assert [e.reason for e in got.errors] == ["frame_deadline"]
        assert any("frame_deadline" in r.getMessage() for r in caplog.records)
        assert server.budget.used == 0 and server.buffered() == 0
        assert [(c.buffered, c.reserved) for c in got.conns] == [(0, 0)]
        assert 4 + 1000 in dropped  # what was dropped is offered back to the OS
        nursery.cancel_scope.cancel()


def test_memory_of_large_dropped_frames_is_given_back_to_the_os() -> None:
    assert give_back_memory(TRIM_ABOVE - 1) is False  # small: not worth a heap walk
    expected = hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim")
    assert give_back_memory(TRIM_ABOVE) is expected  # glibc: malloc_trim(0)


async def test_a_partial_header_is_on_the_clock_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = TcpTransport(NODE, limits=SLOW)
    got = Recorder()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, got)
        stream = await raw_peer(PEERS[0], address)
        await stream.send_all(frame_header(10)[:2])
        with trio.fail_after(HANG):
            await closed_by_node(stream)
        assert [e.reason for e in got.errors] == ["frame_deadline"]
        nursery.cancel_scope.cancel()


async def test_a_slow_frame_within_its_deadline_is_received(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = TcpTransport(NODE, limits=SLOW)
    got = Recorder()
    payload = bytes(range(256)) * 40  # 10 240 bytes: deadline 5 + 10 s
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, got)
        stream = await raw_peer(PEERS[0], address)
        await stream.send_all(frame_header(len(payload)) + payload[:5000])
        await trio.sleep(12.0)  # slow, but inside the deadline
        await stream.send_all(payload[5000:])
        await trio.testing.wait_all_tasks_blocked()
        assert got.payloads == [payload] and got.errors == []
        assert server.budget.used == 0
        await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def test_frames_wait_for_the_budget_in_turn_and_the_wait_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The budget holds one 64 KiB frame and four peers each announce one and stall. A
    frame holds the budget until its deadline D (69 s here); the next in line gets it
    then. A frame that waits longer than `budget_wait()` (2 D) is refused instead."""
    server = TcpTransport(NODE, limits=SLOW)
    deadline = SLOW.frame_deadline(64 * 1024)
    assert SLOW.budget_wait() == 2 * deadline
    got = Recorder()
    # Peers 1 and 2 at t=0 and 1 s; 3 and 4 at D/2 and D/2 + 1 s. Expected: 1 is cut at D,
    # 2 (granted at D) at 2 D, 3 is granted at 2 D (it waited 1.5 D) and cut at 3 D, and 4,
    # still waiting at D/2 + 1 + 2 D, is refused.
    starts = [0.0, 1.0, deadline / 2, deadline / 2 + 1]
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, got)
        t0 = trio.current_time()
        peers = []
        with trio.fail_after(HANG):
            async with trio.open_nursery() as readers:
                for identity, start in zip(PEERS, starts, strict=True):
                    await trio.sleep_until(t0 + start)
                    stream = await raw_peer(identity, address)
                    await stream.send_all(frame_header(64 * 1024) + b"x" * 1024)
                    readers.start_soon(closed_by_node, stream)
                    peers.append(stream)
                await trio.testing.wait_all_tasks_blocked()
                assert server.budget.used == 64 * 1024 and server.budget.waiting == 3
        reasons = [e.reason for e in got.errors]
        assert reasons == ["frame_deadline", "frame_deadline", "receive_budget", "frame_deadline"]
        assert trio.current_time() - t0 == pytest.approx(3 * deadline, abs=1.0)
        assert server.budget.peak == 64 * 1024
        assert server.budget.used == 0 and server.budget.waiting == 0
        assert server.buffered() == 0
        assert all(c.buffered == 0 and c.reserved == 0 for c in got.conns)
        nursery.cancel_scope.cancel()


# --- inbound connections capped --------------------------------------------------------------


async def test_inbound_links_beyond_max_inbound_are_closed_after_the_handshake(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = tls_node(tmp_path, max_inbound=2, heartbeat_timeout=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        (address,) = node.listen_addresses
        with trio.fail_after(30), caplog.at_level(logging.WARNING, logger="p2pfl.transport"):
            first = await raw_peer(PEERS[0], address)
            await raw_peer(PEERS[1], address)
            third = await raw_peer(PEERS[2], address, expect=BUSY)  # told why, then closed
            assert await closed_by_node(third)
            assert node.status()["counters"]["inbound_refused"] == 1
            assert any("max_inbound" in r.getMessage() for r in caplog.records)
            # A dialing node gets a HandshakeError that says why.
            with pytest.raises(HandshakeError, match="max_inbound"):
                await TcpTransport(PEERS[3]).connect(address)
            assert node.status()["counters"]["inbound_refused"] == 2
            await trio.aclose_forcefully(first)  # a slot frees up
            transport = node.transport
            assert isinstance(transport, TcpTransport)
            await until(lambda: transport.inbound == 1)
            await raw_peer(PEERS[3], address)
        nursery.cancel_scope.cancel()


async def test_memory_transport_caps_inbound_links_alike() -> None:
    net = MemoryNetwork()
    server = MemoryTransport(net, "server", "mem:s", limits=TransportLimits(max_inbound=1))

    async def hold(conn: Connection) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(server.listen, hold)
        first = await MemoryTransport(net, "a", "mem:a").connect("mem:s")
        with pytest.raises(HandshakeError, match="max_inbound"):
            await MemoryTransport(net, "b", "mem:b").connect("mem:s")
        assert server.events["inbound_refused"] == 1
        await first.aclose()
        nursery.cancel_scope.cancel()


# --- the default frame limit follows the model -------------------------------------------


def _fits(message: object, limit: int) -> int:
    size = len(codec.encode(message))  # type: ignore[arg-type]
    assert size <= limit, f"{type(message).__name__} of {size} bytes > limit {limit}"
    return size


@pytest.mark.parametrize("num_params", [1, 650, 100_000])
def test_the_largest_legitimate_messages_fit_the_derived_frame_limit(num_params: int) -> None:
    limit = frame_limit_for(num_params)
    assert limit == 8 * num_params + FRAME_HEADROOM
    rng = np.random.default_rng(0)
    params = rng.normal(size=num_params).astype(np.float32)
    pid = PEERS[0].peer_id
    _fits(ModelUpdate(pid, 2**31 - 1, params, 2**31 - 1), limit)
    _fits(StateReply(pid, 2**31 - 1, params, 2**31 - 1), limit)
    masked = rng.integers(0, 2**32, size=num_params, dtype=np.uint32)
    session, top = b"s" * 16, MAX_PARTICIPANTS - 1
    _fits(to_envelope(MaskedVector(pid, 2**31 - 1, session, top, masked)), limit)
    ids = [f"{i:032d}".translate(str.maketrans("0123456789", "abcdefghij")) for i in range(1024)]
    group = tuple(ids[:MAX_GROUP])
    _fits(to_envelope(GroupMean(pid, 2**31 - 1, session, top, group, params)), limit)
    # A vector one longer than the model is refused before any secure code sees it.
    too_long = to_envelope(MaskedVector(pid, 0, session, 0, np.append(masked, np.uint32(0))))
    with pytest.raises(WireError, match="element limit"):
        group_from_envelope(too_long, max_dim=num_params)
    for pipeline in (("delta", "topk:1.0"), ("delta", "topk:1.0", "zstd:1"), ("delta", "topk:0.5")):
        encoder = UpdateEncoder(parse_pipeline(pipeline), keyframe_every=0)
        encoder.encode(params, 1)
        blob = encoder.encode(params + rng.normal(size=num_params).astype(np.float32), 2)
        _fits(CompressedModelUpdate(pid, 2, blob, 2**31 - 1), limit)
    # The largest messages with no vector: inside the headroom. The biggest is an offer
    # listing MAX_PARTICIPANTS choosers; one more cannot even be built.
    choosers = tuple(ids[:MAX_PARTICIPANTS])
    offer = GroupOffer(pid, 2**31 - 1, session, choosers, MAX_GROUP, MAX_GROUP, 1e6, num_params)
    assert _fits(to_envelope(offer), FRAME_HEADROOM) > 30_000
    with pytest.raises(ValueError, match="choosers"):
        GroupOffer(pid, 0, session, (*choosers, "z" * 32), 3, 3, 1.0, num_params)
    setup = (b"k" * 32, b"s" * 64, b"i" * 32, b"p" * 64)
    _fits(
        to_envelope(MaskList(pid, 2**31 - 1, session, top, group, (setup,) * MAX_GROUP)),
        FRAME_HEADROOM,
    )
    share = b"x" * SHARE_LEN
    seeds = tuple((p, share) for p in ids[:MAX_GROUP])
    keys = tuple((p, share) for p in ids[MAX_GROUP : 2 * MAX_GROUP])
    _fits(
        to_envelope(Unmasking(pid, 2**31 - 1, session, top, b"z" * 32, seeds, keys)), FRAME_HEADROOM
    )
    host = ".".join(["a" * 63] * 3 + ["b" * (MAX_ADDR_LEN - 6 - 3 * 64)])  # longest allowed
    peers = tuple((ids[i], f"{host}:65535") for i in range(MAX_PEERS))
    _fits(PeerList(pid, 2**31 - 1, peers), FRAME_HEADROOM)
    listen = tuple(f"{host}:{i}" for i in range(1, MAX_LISTEN + 1))
    _fits(Hello(pid, 2**31 - 1, "f" * 64, listen, "v" * 100), FRAME_HEADROOM)


async def test_node_sizes_its_frame_limit_to_its_model_unless_overridden(tmp_path: Path) -> None:
    node = tls_node(tmp_path)
    transport = node.transport
    assert isinstance(transport, TcpTransport)
    expected = frame_limit_for(node.model.num_params)
    assert expected < 600 * 1024  # a 2.6 KB model: ~520 KiB, not 256 MiB
    assert transport.max_frame_size == expected == node.limits.max_bin_len
    assert transport.budget.capacity == 16 * MiB  # "auto": >= 2 frames, at least 16 MiB
    assert transport.limits.max_inbound == 2 * node.config.max_peers
    node.close()
    big = tls_node(tmp_path, max_frame_size=300 * MiB, receive_budget=300 * MiB)
    assert big.transport.max_frame_size == 300 * MiB  # type: ignore[attr-defined]
    assert big.limits.max_bin_len == 300 * MiB
    big.close()


def test_limits_come_from_config_fields_toml_and_flags() -> None:
    values = coerce(
        {
            "max_frame_size": "auto",
            "receive_budget": 4 * MiB,
            "max-inbound": "12",  # from the command line, as text
            "handshake_timeout": 3,
            "frame_timeout": 2.5,
            "frame_min_rate": 2048,
        }
    )
    config = NodeConfig(**values).validated()
    limits = TransportLimits.from_config(config, num_params=1000)
    assert limits == TransportLimits(
        max_frame_size=8000 + FRAME_HEADROOM,
        receive_budget=4 * MiB,
        max_inbound=12,
        handshake_timeout=3.0,
        frame_timeout=2.5,
        frame_min_rate=2048.0,
    )
    assert limits.frame_deadline(4096) == 2.5 + 2.0
    with pytest.raises(ConfigError, match="max_frame_size"):
        NodeConfig(max_frame_size=100).validated()
    with pytest.raises(ConfigError, match="receive_budget"):
        NodeConfig(max_frame_size=2 * MiB, receive_budget=MiB).validated()
    with pytest.raises(ConfigError, match="max_inbound"):
        coerce({"max_inbound": "lots"})
    with pytest.raises(ConfigError, match="receive_budget"):  # auto frame > explicit budget
        TransportLimits.from_config(NodeConfig(receive_budget=2048), num_params=1000)


# --- peer exchange: addresses per message and dial targets in total -----------------------


def _fake_id(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(32))


async def test_peer_exchange_takes_64_addresses_a_message_and_256_targets_in_all(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNetwork()
    config = NodeConfig(
        data_dir=tmp_path / "node", listen="mem:node", mdns=False, rounds=0, max_peers=64
    ).validated()
    node = Node(
        config,
        identity=NODE,
        transport=MemoryTransport(net, NODE, "mem:node"),
        train_in_thread=False,
        control_socket=False,
    )
    rng = random.Random(0)
    peer = "exchanger"
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        conn = await MemoryTransport(net, peer, "mem:peer").connect("mem:node")
        for batch in range(5):
            entries = tuple(
                (_fake_id(rng), f"10.{batch}.{i // 256}.{i % 256}:7000") for i in range(200)
            )
            await conn.send(codec.encode(PeerList(peer, 0, entries)))
            await trio.testing.wait_all_tasks_blocked()
            learnt = [t for t in node.peers.targets.values() if t.found_via == "peer-exchange"]
            assert len(learnt) == min(64 * (batch + 1), 4 * config.max_peers)
        assert len(node.peers.targets) == 4 * config.max_peers
        await conn.aclose()
        nursery.cancel_scope.cancel()


def test_a_full_target_table_makes_room_by_forgetting_failed_learnt_addresses() -> None:
    table = PeerTable("me", max_peers=1)  # 4 targets
    table.add_address("boot:1", peer_id=None, found_via="bootstrap")
    for i in range(3):
        assert table.add_address(f"junk{i}:1", peer_id=f"j{i}", found_via="peer-exchange")
    assert len(table.targets) == table.max_targets == 4
    assert not table.add_address("real:1", peer_id="r", found_via="peer-exchange")
    for address in ("boot:1", "junk1:1", "junk2:1"):  # unreachable, junk1 twice
        table.dial_started(address)
        table.dial_failed(address, now=0.0)
    table.dial_started("junk1:1")
    table.dial_failed("junk1:1", now=1.0)
    table.dial_started("junk2:1")  # being dialed: stays
    assert table.add_address("real:1", peer_id="r", found_via="peer-exchange")
    assert "junk1:1" not in table.targets and len(table.targets) == 4
    # Left: bootstrap (failed, kept), junk0 (never failed), junk2 (dialing), real.
    assert not table.add_address("more:1", peer_id="m", found_via="peer-exchange")


async def test_a_message_in_parts_is_budgeted_whole_and_cut_at_its_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Parts each within their size must not buy a peer unlimited time: the message's
    deadline runs from its first header, and its whole length is reserved up front."""
    server = TcpTransport(NODE, limits=SLOW)
    got = Recorder()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, got)
        stream = await raw_peer(PEERS[0], address)
        start = trio.current_time()
        await stream.send_all(frame_header(1000, Part.FIRST, 20_000) + b"x" * 1000)
        await trio.sleep(1.0)
        assert [c.reserved for c in got.conns] == [20_000]  # the whole message
        assert server.budget.used == 20_000
        # More parts, each small and prompt, then nothing: cut at the message's deadline.
        for _ in range(5):
            await stream.send_all(frame_header(1000, Part.MORE) + b"x" * 1000)
            await trio.sleep(1.0)
        with trio.fail_after(HANG):
            await closed_by_node(stream)
        assert trio.current_time() - start == pytest.approx(SLOW.frame_deadline(20_000), abs=0.1)
        assert [e.reason for e in got.errors] == ["frame_deadline"]
        assert "20000-byte message" in got.errors[0].detail
        assert server.budget.used == 0 and server.buffered() == 0
        nursery.cancel_scope.cancel()


async def test_a_whole_message_between_parts_is_delivered_and_a_bad_part_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = TcpTransport(NODE, limits=SLOW)
    got = Recorder()
    ping = b"a whole message"
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, got)
        stream = await raw_peer(PEERS[0], address)
        await stream.send_all(frame_header(3, Part.FIRST, 6) + b"abc")
        await stream.send_all(frame_header(len(ping)) + ping)
        await stream.send_all(frame_header(3, Part.LAST) + b"def")
        await stream.send_all(frame_header(3, Part.MORE) + b"ghi")  # no first part
        with trio.fail_after(HANG):
            await closed_by_node(stream)
        assert got.payloads == [ping, b"abcdef"]
        assert [e.reason for e in got.errors] == ["bad_part"]
        assert server.budget.used == 0 and server.buffered() == 0
        nursery.cancel_scope.cancel()
