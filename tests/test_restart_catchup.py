"""A restarted node catches up without making anyone wait out a round timeout.

Three nodes on a triangle, in one process on the in-memory transport under a mock
clock. Training takes (mock) time and the nodes train at different speeds, so a fast
node spends part of every round *collecting*: it has already sent its model for the
round. Node 2 is killed and restarted on its data dir while node 1 is collecting: its
catch-up then adopts a round whose updates node 1 sent before node 2 was back. Before
the fix node 1 answered node 2's resend request with nothing (node 2 was not among the
round's recipients), node 2 waited a whole `round_timeout` for it, and the other two,
waiting for node 2 in the next round, timed out as well.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from p2pfl.aggregation import mean
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.node.link import closed_cause
from p2pfl.protocol import Aggregated, Phase, RoundMachine, RoundSettings
from p2pfl.transport.base import ConnectionClosed
from p2pfl.transport.faults import FaultPlan, FaultRule, FaultyTransport, dump_fault_plan
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

ROUND_TIMEOUT = 30.0
TRAIN_TIME = (1.0, 0.2, 0.2)  # mock seconds per round, by node index


class SlowNode(Node):
    """A node whose local training takes `train_time` mock seconds."""

    train_time = 0.0

    async def _train(self, round: int, params: np.ndarray) -> None:
        await trio.sleep(self.train_time)
        await super()._train(round, params)


def build(
    tmp: Path,
    i: int,
    network: MemoryNetwork,
    train: tuple[float, ...] = TRAIN_TIME,
    **overrides: object,
) -> SlowNode:
    """Node i of len(train) on a full mesh (50 ms links), training train[i] mock seconds."""
    n = len(train)
    plan = tmp / "latency.json"
    dump_fault_plan(FaultPlan((FaultRule("delay", delay=0.05),)), plan)
    fields: dict[str, object] = {
        "rounds": 10,
        "min_peers": n - 1,
        "heartbeat_interval": 1.0,
        "heartbeat_timeout": 5.0,
        "round_timeout": ROUND_TIMEOUT,
        **overrides,
    }
    cfg = NodeConfig(
        data_dir=tmp / f"n{i}",
        listen=f"mem:n{i}",
        peers=tuple(f"mem:n{j}" for j in range(n) if j != i),
        nodes=n,
        node_index=i,
        seed=100 + i,
        faults=plan,
        **fields,  # type: ignore[arg-type]
    ).validated()
    ident = Identity.from_seed(bytes([i + 1]) * 32)
    node = SlowNode(
        cfg,
        identity=ident,
        transport=MemoryTransport(network, ident, f"mem:n{i}"),
        train_in_thread=False,
        control_socket=False,
    )
    node.train_time = train[i]
    return node


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await trio.sleep(0.01)


async def crash_and_restart(
    tmp_path: Path,
    *,
    crash: int = 2,
    restart: int = 4,
    train: tuple[float, ...] = TRAIN_TIME,
    watch: int = 1,
    **overrides: object,
) -> tuple[list[Node], Node]:
    """Kill the last node while it collects round `crash`; restart it as soon as node
    `watch` has sent its model for round `restart` and collects it."""
    network = MemoryNetwork()
    n = len(train)
    nodes = [build(tmp_path, i, network, train, **overrides) for i in range(n)]
    victim = nodes[-1]
    async with trio.open_nursery() as nursery:
        for node in nodes[:-1]:
            await nursery.start(node.run)
        victim_scope = trio.CancelScope()

        async def run_victim(task_status: trio.TaskStatus[None]) -> None:
            with victim_scope:
                await victim.run(task_status=task_status)

        await nursery.start(run_victim)
        await until(lambda: victim.machine.round == crash and victim.phase is Phase.COLLECTING)
        assert isinstance(victim.transport, FaultyTransport)
        victim.transport.crash()  # SIGKILL: no goodbye; the peers see EOF
        victim_scope.cancel()

        peer = nodes[watch]
        await until(lambda: peer.machine.round == restart and peer.phase is Phase.COLLECTING)
        again = build(tmp_path, n - 1, network, train, **overrides)
        await nursery.start(again.run)
        for node in [*nodes[:-1], again]:
            await node.done.wait()
        nursery.cancel_scope.cancel()
    return nodes[:-1], again


async def test_a_restart_while_peers_collect_costs_nobody_a_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    first, again = await crash_and_restart(tmp_path)
    assert again.counters["catch_ups"] == 1
    for node in [*first, again]:
        assert node.machine.round == 10
        assert node.counters["timeouts"] == 0, [
            (row["round"], row["peers_heard"]) for row in node.history if row["timed_out"]
        ]
        assert not any(row["timed_out"] for row in node.history)
    # After the restart every round hears both peers again.
    assert again.history[-1]["peers_heard"] == 2
    assert all(row["peers_heard"] == 2 for row in first[0].history[-4:])


async def test_a_peer_waiting_for_a_round_the_restarted_node_skipped_stops_waiting(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Five nodes: the restarted node is connected again while node 3 (a slow
    trainer) still trains round 4, so node 3 waits for its round-4 model; but the
    median of the peers it asks is round 5, so it skips round 4 and never sends one.
    Asked for it, it now says where it is (a state reply) and node 3 stops waiting."""
    first, again = await crash_and_restart(
        tmp_path, train=(0.1, 0.3, 0.3, 0.6, 0.3), watch=2, restart=4
    )
    assert again.counters["catch_ups"] == 1
    trained = [row["round"] for row in again.history]
    assert 4 not in trained and 5 in trained  # it skipped round 4
    for node in [*first, again]:
        assert node.machine.round == 10
        assert node.counters["timeouts"] == 0, [
            (row["round"], row["peers_heard"]) for row in node.history if row["timed_out"]
        ]


@pytest.mark.parametrize("compression", [("delta", "quantize:8")])
async def test_a_restart_with_compression_costs_nobody_a_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, compression: tuple[str, ...]
) -> None:
    first, again = await crash_and_restart(tmp_path, compression=compression)
    for node in [*first, again]:
        assert node.machine.round == 10
        assert node.counters["timeouts"] == 0
    assert again.history[-1]["peers_heard"] == 2


async def test_surviving_peers_log_a_lost_peer_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfl.node")
    _, again = await crash_and_restart(tmp_path)
    victim = again.id[:12]
    lines = [r.getMessage() for r in caplog.records if "lost peer" in r.getMessage()]
    # Two survivors, one line each, naming the victim and the cause.
    assert len(lines) == 2, lines
    assert all(victim in m and "EOF" in m for m in lines), lines


def _closed(inner: BaseException | None) -> ConnectionClosed:
    """A ConnectionClosed as the TCP transport raises it, wrapping `inner` (None: EOF)."""
    try:
        if inner is None:
            raise ConnectionClosed("the peer closed the connection")
        try:
            try:
                raise inner
            except Exception as exc:
                raise trio.BrokenResourceError("stream broken") from exc
        except trio.BrokenResourceError as exc:
            raise ConnectionClosed("connection lost") from exc
    except ConnectionClosed as closed:
        return closed


def test_the_lost_peer_line_names_the_cause() -> None:
    assert closed_cause(_closed(None)) == "EOF"
    # A SIGKILLed peer's kernel closes its TLS socket without close_notify.
    assert closed_cause(_closed(ssl.SSLEOFError(8, "EOF in violation of protocol"))) == "EOF"
    assert closed_cause(_closed(ConnectionResetError())) == (
        "connection reset (ConnectionResetError)"
    )


def test_a_neighbour_past_our_round_without_a_model_for_us_is_not_waited_for() -> None:
    """The sans-IO half of the skipped-round case: a state reply from a neighbour we
    wait for, in a later round, means its model for ours will never come."""
    zeros = np.zeros(4, dtype=np.float32)
    m = RoundMachine(params=zeros, rule=mean, settings=RoundSettings(nudge_fraction=0.2))
    m.start(0.0, ["a", "b", "c"])
    m.trained(0.0, 0, zeros + 1, 1, ["a", "b", "c"])
    m.receive_update(0.1, "a", 0, zeros + 2, 1)
    # A reply for our own round says nothing about round 0's model: keep waiting.
    assert m.receive_state(0.2, "b", 0, zeros) == []
    assert m.phase is Phase.COLLECTING and m.expected_this_round == 3
    assert m.receive_state(0.3, "b", 1, zeros) == []  # b skipped round 0
    assert m.expected_this_round == 2
    acts = m.receive_update(0.4, "c", 0, zeros + 2, 1)
    agg = next(a for a in acts if isinstance(a, Aggregated))
    assert agg.round == 0 and not agg.timed_out and agg.senders == ("a", "c")
