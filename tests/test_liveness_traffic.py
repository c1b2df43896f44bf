"""Liveness rides on traffic: pings only where nothing else says a peer is alive.

A node pings a peer on a link quiet both ways (the Pong then speaks for the peer), a
peer that stays quiet while we keep sending to it (after ASK_AFTER intervals), and any
link without a ping for RTT_SAMPLE_EVERY beats (the RTT, and whether the peer still
reads). Failure detection is unchanged: a peer silent for heartbeat_timeout is lost,
one that keeps sending is not, one that stops answering pings is unresponsive.

Each test runs one real node against scripted peers on the in-memory transport, under
trio's mock clock: the peers count the node's pings and answer them (or not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio
import trio.testing

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.node.mesh import RTT_SAMPLE_EVERY, Metronome
from p2pfl.transport.base import Connection
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from p2pfl.wire import codec
from p2pfl.wire.messages import ModelUpdate, Ping, Pong

INTERVAL = 1.0
TIMEOUT = 6.0


@dataclass
class ScriptedPeer:
    """A peer that counts the node's pings, answers them after `pong_delay` while
    `answer` holds, and sends a model update every `send_every` seconds while `talk`
    holds. Nothing else: no hello, no pings of its own."""

    network: MemoryNetwork
    seed: int
    answer: bool = True
    pong_delay: float = 0.0
    send_every: float | None = None
    talk: bool = True
    params: np.ndarray | None = None
    pings: list[float] = field(default_factory=list)
    last_sent: float | None = None  # anything: an update or a Pong
    closed_at: float | None = None

    def __post_init__(self) -> None:
        self.identity = Identity.from_seed(bytes([0x40 + self.seed]) * 32)
        self.address = f"mem:peer{self.seed}"

    @property
    def id(self) -> str:
        return self.identity.peer_id

    async def serve(
        self, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        transport = MemoryTransport(self.network, self.identity, self.address)
        await transport.listen(self._handle, task_status=task_status)

    async def _handle(self, conn: Connection) -> None:
        async with trio.open_nursery() as nursery:
            if self.send_every is not None:
                nursery.start_soon(self._talk, conn)
            try:
                while True:
                    msg = codec.decode(await conn.receive())
                    if isinstance(msg, Ping):
                        self.pings.append(trio.current_time())
                        if self.answer:
                            nursery.start_soon(self._pong, conn, msg)
            except Exception:
                self.closed_at = trio.current_time()
                nursery.cancel_scope.cancel()

    async def _pong(self, conn: Connection, ping: Ping) -> None:
        await trio.sleep(self.pong_delay)
        if self.answer:
            await conn.send(codec.encode(Pong(self.id, 0, ping.nonce, ping.sent_at)))
            self.last_sent = trio.current_time()

    async def _talk(self, conn: Connection) -> None:
        assert self.send_every is not None and self.params is not None
        update = codec.encode(ModelUpdate(self.id, 0, self.params, 10))
        while True:
            await trio.sleep(self.send_every)
            if self.talk:
                await conn.send(update)
                self.last_sent = trio.current_time()

    def pings_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.pings)


def make_node(tmp_path: Path, network: MemoryNetwork, peers: list[ScriptedPeer]) -> Node:
    config = NodeConfig(
        data_dir=tmp_path / "node",
        listen="mem:node",
        peers=tuple(p.address for p in peers),
        mdns=False,
        min_peers=1,
        rounds=0,
        heartbeat_interval=INTERVAL,
        heartbeat_timeout=TIMEOUT,
    ).validated()
    identity = Identity.from_seed(bytes([0x3F]) * 32)
    transport = MemoryTransport(network, identity, "mem:node")
    node = Node(
        config, identity=identity, transport=transport, train_in_thread=False, control_socket=False
    )
    for peer in peers:
        peer.params = np.zeros_like(node.machine.params)
    return node


async def keep_sending(node: Node, peer: ScriptedPeer, every: float) -> None:
    """Our side of a busy link: the node sends the peer a message every `every` s."""
    while True:
        await trio.sleep(every)
        node.mesh.enqueue(peer.id, node.mesh.peer_list_payload())


async def test_pings_go_where_nothing_else_proves_liveness(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Over 20 heartbeats: an idle link is pinged every beat and its RTT measured; a
    link the node keeps sending on, to a peer that only answers pings, about every
    other beat (the old rule pinged it every beat, like the idle one); a link busy
    both ways only for the RTT sample every RTT_SAMPLE_EVERY beats."""
    network = MemoryNetwork()
    idle = ScriptedPeer(network, 0, pong_delay=0.05)
    ours_busy = ScriptedPeer(network, 1)
    both_busy = ScriptedPeer(network, 2, send_every=0.25)
    peers = [idle, ours_busy, both_busy]
    node = make_node(tmp_path, network, peers)
    async with trio.open_nursery() as nursery:
        for peer in peers:
            await nursery.start(peer.serve)
        await nursery.start(node.run)
        nursery.start_soon(keep_sending, node, ours_busy, 0.25)
        nursery.start_soon(keep_sending, node, both_busy, 0.25)
        await trio.sleep(5.0)  # connected, past the first beats
        start = trio.current_time()
        await trio.sleep(20 * INTERVAL)
        end = trio.current_time()
        counts = [p.pings_between(start, end) for p in peers]
        rtt = node.peers.peers[idle.id].rtt
        busy_rtt = node.peers.peers[both_busy.id].rtt
        nursery.cancel_scope.cancel()
    n_idle, n_ours, n_both = counts
    # Every beat but those right after the node's own messages to it (its model, an
    # update request: the peer heard from it, and is asked a beat later).
    assert n_idle >= 16, counts
    assert rtt is not None and abs(rtt - 0.05) < 1e-6  # measured on the idle link
    assert n_ours <= 12, counts  # about every other beat, was every beat
    assert n_ours < 0.7 * n_idle, counts
    assert 20 // RTT_SAMPLE_EVERY - 1 <= n_both <= 20 // RTT_SAMPLE_EVERY + 1, counts
    assert busy_rtt is not None  # sampled there too
    assert node.mesh.pings_sent >= sum(counts)
    assert node.counters["heartbeat_failures"] == 0
    assert node.machine.unresponsive == frozenset()


async def test_a_peer_that_sends_updates_but_never_pongs_is_alive_but_unresponsive(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Its updates keep it alive for 5x the heartbeat timeout; its missing Pongs still
    show it does not read (the RTT sample pings every link, however busy)."""
    network = MemoryNetwork()
    deaf = ScriptedPeer(network, 0, answer=False, send_every=0.5)
    node = make_node(tmp_path, network, [deaf])
    async with trio.open_nursery() as nursery:
        await nursery.start(deaf.serve)
        await nursery.start(node.run)
        await trio.sleep(5 * TIMEOUT)
        assert node.peers.is_connected(deaf.id)
        assert node.counters["heartbeat_failures"] == 0
        assert deaf.closed_at is None
        assert len(deaf.pings) >= 5 * TIMEOUT / INTERVAL / RTT_SAMPLE_EVERY - 1
        assert node.machine.unresponsive == {deaf.id}
        nursery.cancel_scope.cancel()


async def test_a_peer_silent_for_the_heartbeat_timeout_is_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that sent updates and answered pings, then goes silent (connection still
    open, nothing on it): lost once nothing came for heartbeat_timeout, at the first
    heartbeat after that."""
    network = MemoryNetwork()
    quitter = ScriptedPeer(network, 0, send_every=0.5)
    node = make_node(tmp_path, network, [quitter])
    async with trio.open_nursery() as nursery:
        await nursery.start(quitter.serve)
        await nursery.start(node.run)
        await trio.sleep(10.0)
        assert node.peers.is_connected(quitter.id)
        quitter.talk = quitter.answer = False
        with trio.fail_after(3 * TIMEOUT):
            while quitter.closed_at is None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert quitter.last_sent is not None
    silent_for = quitter.closed_at - quitter.last_sent
    assert TIMEOUT < silent_for <= TIMEOUT + INTERVAL + 0.1, silent_for
    assert node.counters["heartbeat_failures"] == 1
    assert not node.peers.is_connected(quitter.id)


async def test_the_metronome_wakes_heartbeats_together_never_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One task wakes every heartbeat of a run: each at its deadline or up to its slack
    sooner, together with those due in that window; a sleeper cancelled while it waits
    costs the others nothing."""
    metronome = Metronome.current()
    assert Metronome.current() is metronome  # one per trio run
    start = trio.current_time()
    woke: dict[int, float] = {}

    async def beat(i: int, deadline: float) -> None:
        await metronome.sleep_until(deadline, slack=0.02)
        woke[i] = trio.current_time()

    deadlines = {i: start + 1.0 + i * 0.001 for i in range(100)}  # 100 within 0.1 s
    async with trio.open_nursery() as nursery:
        for i, deadline in deadlines.items():
            nursery.start_soon(beat, i, deadline)
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await metronome.sleep_until(start + 1.05)
        nursery.start_soon(beat, 100, start + 0.5)  # an earlier one arriving later
        deadlines[100] = start + 0.5
    assert woke.keys() == deadlines.keys()
    for i, deadline in deadlines.items():
        assert deadline - 0.02 <= woke[i] <= deadline, (i, woke[i] - deadline)
    assert len(set(woke.values())) <= 100 * 0.001 / 0.02 + 2  # a handful of wake-ups
