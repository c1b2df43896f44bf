"""The in-process simulator at scale (issue 17): direct in-memory links, checkpoints
every k rounds, appends without fsync, and a dial loop that sleeps instead of polling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import run_until_done

import p2pfl.datadir
import p2pfl.node.learner
import p2pfl.transport.memory
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.datadir import DataDir
from p2pfl.identity import Identity
from p2pfl.membership import PeerTable
from p2pfl.node import Node
from p2pfl.node.link import Link
from p2pfl.scenario.schema import ScenarioError, parse_scenario
from p2pfl.storage import Checkpoint
from p2pfl.transport.base import ConnectionClosed
from p2pfl.transport.memory import DirectConnection, MemoryNetwork, MemoryTransport


def direct_pair(limit: int = 1 << 20) -> tuple[DirectConnection, DirectConnection]:
    a = DirectConnection("b", "mem:b", outbound=True, max_frame_size=limit)
    b = DirectConnection("a", "mem:a", outbound=False, max_frame_size=limit)
    DirectConnection.pair(a, b)
    return a, b


# ---- direct links ----------------------------------------------------------------------


async def test_a_direct_link_writes_at_once_under_the_unread_byte_budget() -> None:
    ours, theirs = direct_pair()
    link = Link(ours, "b", "test")
    assert link.offer(b"x" * 60, limit=100)
    assert not link.offer(b"y" * 60, limit=100)  # the peer has not read the first yet
    assert link.offer(b"z" * 40, limit=100)
    assert (link.enqueued, link.written, ours.unread_bytes) == (2, 2, 100)
    assert await theirs.receive() == b"x" * 60  # read: room again
    assert link.offer(b"w" * 60, limit=100, urgent=True)
    assert (link.enqueued, link.written) == (2, 2)  # heartbeats are not counted
    assert [await theirs.receive() for _ in range(2)] == [b"z" * 40, b"w" * 60]
    assert ours.unread_bytes == 0
    assert not link.update_in_flight(0)
    # Bytes written before the mesh's writer gave its counter are reported then.
    counted: list[int] = []
    await link.pump(counted.append)
    assert counted == [60 + 4 + 40 + 4 + 60 + 4]
    link.offer(b"v", limit=100)
    assert counted[-1] == 1 + 4


async def test_a_direct_link_to_a_closed_peer_ends_with_its_cause() -> None:
    ours, theirs = direct_pair()
    link = Link(ours, "b", "test")
    await theirs.aclose()
    assert link.offer(b"lost", limit=100)  # accepted like a queued message, then lost
    assert link.written == 0
    assert link.scope.cancel_called and link.close_reason == "EOF"


async def test_direct_connection_order_eof_and_frame_limit() -> None:
    """In order, over-limit payloads as WireError, then EOF once everything was read."""
    ours, theirs = direct_pair(limit=4)
    ours.send_nowait(b"1")
    await ours.send(b"22")
    ours.send_nowait(b"55555")
    await ours.aclose()
    with pytest.raises(ConnectionClosed):
        ours.send_nowait(b"x")  # our end is closed
    assert [await theirs.receive(), await theirs.receive()] == [b"1", b"22"]
    with pytest.raises(p2pfl.transport.memory.WireError, match="limit is 4"):
        await theirs.receive()
    with pytest.raises(ConnectionClosed):
        await theirs.receive()  # everything sent was read: EOF
    with pytest.raises(ConnectionClosed):
        await theirs.send(b"to a closed peer")


# ---- the same federation on both in-memory networks ------------------------------------


def ring_nodes(tmp: Path, n: int, network: MemoryNetwork, **fields: object) -> list[Node]:
    nodes = []
    for i in range(n):
        neighbours = ((i - 1) % n, (i + 1) % n)
        cfg = NodeConfig(
            data_dir=tmp / f"n{i}",
            listen=f"mem:n{i}",
            peers=tuple(f"mem:n{j}" for j in neighbours),
            peer_exchange=False,
            min_peers=2,
            nodes=n,
            node_index=i,
            heartbeat_interval=1.0,
            heartbeat_timeout=5.0,
            seed=i,
            **fields,  # type: ignore[arg-type]
        ).validated()
        ident = Identity.from_seed(bytes([i + 1]) * 32)
        nodes.append(
            Node(
                cfg,
                identity=ident,
                transport=MemoryTransport(network, ident, f"mem:n{i}"),
                train_in_thread=False,
                control_socket=False,
            )
        )
    return nodes


def final_models(tmp: Path, *, direct: bool, **fields: object) -> list[np.ndarray]:
    nodes = ring_nodes(tmp, 6, MemoryNetwork(direct=direct), rounds=4, **fields)
    trio.run(run_until_done, nodes, clock=trio.testing.MockClock(autojump_threshold=0))
    assert all(len(n.history) == 4 and not any(r["timed_out"] for r in n.history) for n in nodes)
    return [n.machine.params.copy() for n in nodes]


@pytest.mark.parametrize("fields", [{}, {"compression": ("delta", "topk:0.25")}])
def test_direct_links_give_the_same_models_as_channels(
    tmp_path: Path, fields: dict[str, object]
) -> None:
    """Under a mock clock a run is deterministic; the direct network changes only how
    payloads move, not what the nodes decide, so the final models are bit-identical."""
    old = final_models(tmp_path / "channels", direct=False, **fields)
    new = final_models(tmp_path / "direct", direct=True, **fields)
    assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
    assert not all(np.array_equal(old[0], m) for m in old[1:])  # a ring: not yet in consensus


# ---- checkpoints every k rounds, appends without fsync ---------------------------------


@pytest.mark.parametrize(("every", "saved"), [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [])])
def test_checkpoint_every_k_rounds_and_after_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int, saved: list[int]
) -> None:
    written: dict[str, list[int]] = {}
    real = p2pfl.node.learner.save_checkpoint

    def record(path: Path, ckpt: Checkpoint) -> None:
        written.setdefault(path.parent.name, []).append(ckpt.round)
        real(path, ckpt)

    monkeypatch.setattr(p2pfl.node.learner, "save_checkpoint", record)
    nodes = ring_nodes(tmp_path, 3, MemoryNetwork(direct=True), rounds=5, checkpoint_every=every)
    trio.run(run_until_done, nodes, clock=trio.testing.MockClock(autojump_threshold=0))
    assert {name: rounds for name, rounds in written.items()} == (
        {f"n{i}": saved for i in range(3)} if saved else {}
    )
    assert (tmp_path / "n0" / "checkpoint.msgpack").exists() == bool(saved)


def test_checkpoint_every_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint_every"):
        NodeConfig(data_dir=tmp_path, checkpoint_every=-1).validated()


def test_scenario_checkpoints_default_by_mode() -> None:
    doc = {"name": "s", "nodes": 3}
    default = parse_scenario(doc)
    dirs = [Path(f"/tmp/n{i}") for i in range(3)]
    mem = default.node_config_values([f"mem:n{i}" for i in range(3)], dirs)
    tcp = default.node_config_values([f"127.0.0.1:{7000 + i}" for i in range(3)], dirs)
    assert [v["checkpoint_every"] for v in mem] == [0, 0, 0]
    assert [v["checkpoint_every"] for v in tcp] == [1, 1, 1]
    chosen = parse_scenario({**doc, "checkpoint_every": 3})
    mem = chosen.node_config_values([f"mem:n{i}" for i in range(3)], dirs)
    assert [v["checkpoint_every"] for v in mem] == [3, 3, 3]
    with pytest.raises(ScenarioError, match="checkpoint_every"):
        parse_scenario({**doc, "checkpoint_every": -1})


def test_a_non_durable_data_dir_appends_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(p2pfl.datadir.os, "fsync", synced.append)
    with DataDir.open(tmp_path / "d") as d:
        d.append("metrics.jsonl", "{}")
        assert len(synced) == 1
        d.durable = False
        d.append("metrics.jsonl", "{}")
        assert len(synced) == 1
        assert (d.path / "metrics.jsonl").read_text() == "{}\n{}\n"


# ---- the dial loop's wake-up -----------------------------------------------------------


def test_next_dial_at_is_the_earliest_backoff_not_yet_due() -> None:
    table = PeerTable("me", max_peers=2)
    assert table.next_dial_at(0.0) == math.inf  # nothing to dial
    for address in ("a", "b", "c"):
        table.add_address(address, peer_id=None, found_via="bootstrap")
    assert table.next_dial_at(0.0) == math.inf  # all due now: the loop dials them
    for address in ("a", "b"):
        table.dial_started(address)
    delay = table.dial_failed("a", 10.0)
    assert table.next_dial_at(10.0) == pytest.approx(10.0 + delay)  # "b" is being dialed
    table.dial_succeeded("b", "peer-b")
    table.connected("peer-b", now=10.0, found_via="bootstrap")
    table.connected("peer-x", now=10.0, found_via="inbound")
    assert table.next_dial_at(10.0) == math.inf  # max_peers reached: no dial is due


def test_a_failure_in_the_inbox_ends_only_that_link(tmp_path: Path) -> None:
    """A bug while handling one direct link's payload is contained like a reader's: that
    link ends (and is redialed), the node and its other links go on."""
    nodes = ring_nodes(tmp_path, 3, MemoryNetwork(direct=True), rounds=2)
    mesh = nodes[0].mesh
    real = mesh.intake.take
    failed: list[str] = []

    async def take_once_failing(link: Link, item: bytes | Exception) -> bool:
        if not failed:
            failed.append(link.peer_id)
            raise RuntimeError("bug")
        return await real(link, item)

    mesh.intake.take = take_once_failing  # type: ignore[method-assign]
    trio.run(run_until_done, nodes, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(failed) == 1
    assert nodes[0].supervisor.contained["connection:RuntimeError"] == 1
    assert all(len(n.history) == 2 for n in nodes)
    assert mesh.peers.peers[failed[0]].connects == 2  # that link ended and was redialed
