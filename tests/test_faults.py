"""The fault-injecting transport wrapper, deterministically, on the in-memory transport."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import run_until_done as run_all

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import STATE_REPLY_EVERY, Node
from p2pfl.scenario.faults import (
    FAULTS_FILE,
    CrashSchedule,
    FaultEvent,
    never_restarted,
    node_fault_plans,
    timeline,
)
from p2pfl.scenario.report import write_report
from p2pfl.scenario.schema import Scenario, ScenarioError, parse_scenario
from p2pfl.storage import load_checkpoint
from p2pfl.transport.base import Connection, ConnectionClosed, ConnectionHandler
from p2pfl.transport.faults import (
    MAX_IN_FLIGHT,
    FaultPlan,
    FaultPlanError,
    FaultRule,
    FaultyTransport,
    LinkFaults,
    dump_fault_plan,
    link_rng,
    load_fault_plan,
    parse_fault_plan,
)
from p2pfl.transport.memory import CHANNEL_CAPACITY, MemoryNetwork, MemoryTransport
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import ModelUpdate, StateReply, StateRequest

# ---- plans ---------------------------------------------------------------------------


def test_plan_file_toml_and_json_round_trip(tmp_path: Path) -> None:
    toml = tmp_path / "plan.toml"
    toml.write_text(
        """
[[rules]]
kind = "delay"
delay = 0.2
jitter = 0.05
from_round = 1
to_round = 4

[[rules]]
kind = "cut"
peers = ["B", "C"]
on = ["A"]
"""
    )
    plan = load_fault_plan(toml)
    assert plan.rules == (
        FaultRule("delay", delay=0.2, jitter=0.05, from_round=1, to_round=4),
        FaultRule("cut", peers=frozenset({"B", "C"}), on=frozenset({"A"})),
    )
    dump_fault_plan(plan, tmp_path / "plan.json")
    assert load_fault_plan(tmp_path / "plan.json") == plan
    assert plan.for_node("A") == plan
    assert plan.for_node("B").rules == plan.rules[:1]


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"rules": [{"kind": "drop"}, {"kind": "delay"}]}, "rules[1].delay"),
        ({"rules": [{"kind": "explode"}]}, "rules[0].kind"),
        ({"rules": [{"kind": "drop", "probability": 1.5}]}, "rules[0].probability"),
        ({"rules": [{"kind": "cut", "probability": 0.5}]}, "rules[0].probability"),
        ({"rules": [{"kind": "drop", "from_round": 3, "to_round": 3}]}, "rules[0].to_round"),
        ({"rules": [{"kind": "drop", "peers": []}]}, "rules[0].peers"),
        ({"rules": [{"kind": "drop", "peers": "B"}]}, "rules[0].peers"),
        ({"rules": [{"kind": "drop", "delay": 1}]}, "rules[0].delay"),
        ({"rules": [{"kind": "drop", "colour": 1}]}, "rules[0].colour"),
        ({"rules": [{"probability": 1}]}, "rules[0].kind"),
        ({"rules": [{"kind": "corrupt", "flips": 0}]}, "rules[0].flips"),
        ({"rules": [{"kind": "drop", "from_round": 1.5}]}, "rules[0].from_round"),
        ({"rules": {}}, "rules"),
        ({"rule": []}, "rule"),
    ],
)
def test_plan_errors_name_the_field(doc: object, path: str) -> None:
    with pytest.raises(FaultPlanError) as info:
        parse_fault_plan(doc)
    assert info.value.path == path
    assert str(info.value).startswith(path + ": ")


def test_plan_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FaultPlanError, match="does not exist"):
        load_fault_plan(tmp_path / "nope.toml")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": [{"kind": "drop", "probability": -1}]}))
    with pytest.raises(FaultPlanError, match=r"rules\[0\]\.probability: .*bad\.json"):
        load_fault_plan(bad)


# ---- decisions (sans-IO) ---------------------------------------------------------------


def fates(seed: int, rules: list[FaultRule], n: int = 400) -> list[list[bytes]]:
    link = LinkFaults(rules, "B", link_rng(seed, "A", "B", 0))
    return [[e.payload for e in link.on_send(0.0, 0, bytes([i % 256]) * 40)] for i in range(n)]


def test_decisions_replay_exactly_from_the_seed() -> None:
    rules = [
        FaultRule("drop", probability=0.1),
        FaultRule("duplicate", probability=0.1),
        FaultRule("corrupt", probability=0.2, flips=3),
        FaultRule("truncate", probability=0.05),
    ]
    assert fates(7, rules) == fates(7, rules)
    assert fates(7, rules) != fates(8, rules)
    # Connections and directions get independent streams.
    a = link_rng(7, "A", "B", 0).random(4)
    assert not np.array_equal(a, link_rng(7, "A", "B", 1).random(4))
    assert not np.array_equal(a, link_rng(7, "B", "A", 0).random(4))


def test_drop_rate_and_mangling_are_what_the_rules_say() -> None:
    out = fates(1, [FaultRule("drop", probability=0.1)], n=4000)
    lost = sum(1 for o in out if not o) / len(out)
    assert 0.08 < lost < 0.12, lost
    for i, got in enumerate(fates(2, [FaultRule("truncate")])):
        (p,) = got
        assert len(p) < 40 and p == (bytes([i % 256]) * 40)[: len(p)]
    for i, got in enumerate(fates(3, [FaultRule("corrupt", flips=2)])):
        (p,) = got
        diff = np.frombuffer(p, np.uint8) != i % 256
        assert len(p) == 40 and 1 <= diff.sum() <= 2


def test_rules_follow_rounds_and_peers() -> None:
    rule = FaultRule("drop", peers=frozenset({"B"}), from_round=2, to_round=4)
    assert [rule.active(r, "B") for r in range(6)] == [False, False, True, True, False, False]
    assert not rule.active(2, "C")
    link = LinkFaults([FaultRule("cut", from_round=1, to_round=2)], "B", link_rng(0, "A", "B", 0))
    assert [bool(link.on_send(0.0, r, b"x")) for r in range(3)] == [True, False, True]
    assert [link.deliver(r) for r in range(3)] == [True, False, True]
    assert link.stats == {"cut_sent": 1, "cut_received": 1}


# ---- the wrapper over the in-memory transport ------------------------------------------


@dataclass
class Sink:
    """A listening transport that records what it receives, with the (mock) time."""

    got: list[tuple[float, bytes]] = field(default_factory=list)
    conns: list[Connection] = field(default_factory=list)
    reading: bool = True

    async def handle(self, conn: Connection) -> None:
        self.conns.append(conn)
        try:
            while True:
                if not self.reading:
                    await trio.sleep_forever()
                payload = await conn.receive()
                self.got.append((trio.current_time(), payload))
        except ConnectionClosed:
            pass

    @property
    def payloads(self) -> list[bytes]:
        return [p for _, p in self.got]


@dataclass
class Round:
    value: int = 0

    def __call__(self) -> int:
        return self.value


def faulty(
    network: MemoryNetwork, name: str, rules: list[FaultRule], rnd: Callable[[], int], seed: int = 0
) -> FaultyTransport:
    inner = MemoryTransport(network, name, f"mem:{name}")
    return FaultyTransport(
        inner, FaultPlan(tuple(rules)), local_id=name, current_round=rnd, seed=seed
    )


@asynccontextmanager
async def listening(*pairs: tuple[FaultyTransport | MemoryTransport, Sink]) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for transport, sink in pairs:
            await nursery.start(transport.listen, sink.handle)
        yield
        nursery.cancel_scope.cancel()


async def settle() -> None:
    await trio.sleep(60)  # mock time: long enough for every delay in these tests


async def test_drop_follows_the_round_range(autojump_clock: trio.testing.MockClock) -> None:
    net, rnd = MemoryNetwork(), Round()
    a = faulty(net, "A", [FaultRule("drop", from_round=2, to_round=4)], rnd)
    sink = Sink()
    async with listening((a, Sink()), (MemoryTransport(net, "B", "mem:B"), sink)):
        conn = await a.connect("mem:B", "B")
        for r in range(6):
            rnd.value = r
            await conn.send(b"round %d" % r)
        await settle()
    assert sink.payloads == [b"round 0", b"round 1", b"round 4", b"round 5"]
    assert a.counts() == {"dropped": 2}


async def test_delay_pipelines_keeps_order_and_spares_other_links(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, rnd = MemoryNetwork(), Round()
    slow = FaultRule("delay", delay=1.0, jitter=0.5, peers=frozenset({"B"}))
    a = faulty(net, "A", [slow], rnd)
    b, c = Sink(), Sink()
    async with listening(
        (a, Sink()),
        (MemoryTransport(net, "B", "mem:B"), b),
        (MemoryTransport(net, "C", "mem:C"), c),
    ):
        to_b = await a.connect("mem:B", "B")
        to_c = await a.connect("mem:C", "C")
        t0 = trio.current_time()
        for i in range(10):
            await to_b.send(b"%d" % i)  # returns at once: the delay is in flight
        assert trio.current_time() == t0
        await to_c.send(b"fast")
        await settle()
    assert b.payloads == [b"%d" % i for i in range(10)]  # FIFO despite jitter
    arrivals = [t - t0 for t, _ in b.got]
    assert all(0.5 <= t <= 1.5 for t in arrivals), arrivals  # pipelined, not 10 x 1 s
    assert arrivals != sorted(set(arrivals))[:1] * 10  # jitter really varied the delays
    assert c.got[0][0] == t0  # the other link did not wait


async def test_delay_keeps_backpressure_from_a_reader_that_does_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, rnd = MemoryNetwork(), Round()
    a = faulty(net, "A", [FaultRule("delay", delay=0.5)], rnd)
    sink = Sink(reading=False)
    async with listening((a, Sink()), (MemoryTransport(net, "B", "mem:B"), sink)):
        conn = await a.connect("mem:B", "B")
        sent = 0
        with trio.move_on_after(30):
            while True:
                await conn.send(b"x")
                sent += 1
        # The peer's channel, the message in the pump's hands, the in-flight queue.
        assert sent == CHANNEL_CAPACITY + 1 + MAX_IN_FLIGHT


async def test_duplicate_reorder_truncate_corrupt(autojump_clock: trio.testing.MockClock) -> None:
    net, rnd = MemoryNetwork(), Round()
    rules = [
        FaultRule("duplicate", to_round=1),
        FaultRule("reorder", from_round=1, to_round=2),
        FaultRule("truncate", from_round=2, to_round=3),
        FaultRule("corrupt", flips=1, from_round=3, to_round=4),
    ]
    a = faulty(net, "A", rules, rnd)
    sink = Sink()
    async with listening((a, Sink()), (MemoryTransport(net, "B", "mem:B"), sink)):
        conn = await a.connect("mem:B", "B")
        for r, msgs in enumerate([[b"d1", b"d2"], [b"r1", b"r2", b"r3", b"r4"]]):
            rnd.value = r
            for m in msgs:
                await conn.send(m)
        rnd.value = 2
        await conn.send(b"truncated!")
        rnd.value = 3
        await conn.send(b"corrupted!")
        await settle()
    got = sink.payloads
    assert got[:8] == [b"d1", b"d1", b"d2", b"d2", b"r2", b"r1", b"r4", b"r3"]
    assert len(got) == 10
    assert len(got[8]) < 10 and b"truncated!".startswith(got[8])
    assert len(got[9]) == 10 and got[9] != b"corrupted!"
    assert sum(x != y for x, y in zip(got[9], b"corrupted!", strict=True)) == 1
    assert a.counts() == {
        "corrupted": 1,
        "duplicated": 2,
        "reordered": 4,
        "truncated": 1,
    }


async def test_cut_is_a_two_way_partition_that_heals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Only A applies the cut (its part of the schedule): B's traffic dies at A's end.
    net, ra = MemoryNetwork(), Round()
    a = faulty(net, "A", [FaultRule("cut", from_round=1, to_round=3)], ra)
    b = faulty(net, "B", [], Round())
    sa, sb = Sink(), Sink()
    from_b = Sink()
    async with listening((a, sa), (b, sb)), trio.open_nursery() as nursery:
        a_to_b = await a.connect("mem:B", "B")
        nursery.start_soon(from_b.handle, a_to_b)
        await a_to_b.send(b"before")
        await trio.sleep(1)
        ra.value = 1
        await a_to_b.send(b"into the void")  # silently lost, like a black-holed route
        await sb.conns[0].send(b"also lost")
        await trio.sleep(1)
        with pytest.raises(OSError):
            await a.connect("mem:B", "B")  # refused while cut...
        with pytest.raises(OSError):
            await a.connect("mem:B")  # ...even when the id is learnt only on connect
        await b.connect("mem:A")  # A closes it at once
        await trio.sleep(1)
        assert sa.conns == []
        ra.value = 3  # healed
        await a_to_b.send(b"after")
        await sb.conns[0].send(b"back")
        again = await a.connect("mem:B", "B")
        await again.send(b"new link")
        await settle()
        nursery.cancel_scope.cancel()
    assert sb.payloads == [b"before", b"after", b"new link"]
    assert from_b.payloads == [b"back"]
    assert a.counts() == {"cut_dials": 2, "cut_accepts": 1, "cut_sent": 1, "cut_received": 1}
    assert b.counts() == {}


async def test_stall_is_a_slow_consumer_and_resumes(autojump_clock: trio.testing.MockClock) -> None:
    net, rb = MemoryNetwork(), Round()
    a = MemoryTransport(net, "A", "mem:A")
    b = faulty(net, "B", [FaultRule("stall", to_round=1)], rb)
    sink = Sink()
    async with listening((a, Sink()), (b, sink)):
        conn = await a.connect("mem:B", "B")
        sent = 0
        with trio.move_on_after(10):
            for i in range(100):
                await conn.send(b"%d" % i)
                sent += 1
        assert sent == CHANNEL_CAPACITY and sink.got == []  # the sender is blocked
        rb.value = 1
        for i in range(sent, 100):
            await conn.send(b"%d" % i)
        await settle()
    assert sink.payloads == [b"%d" % i for i in range(100)]


async def test_crash_silences_everything(autojump_clock: trio.testing.MockClock) -> None:
    net, rnd = MemoryNetwork(), Round()
    a = faulty(net, "A", [], rnd)
    sa, sb = Sink(), Sink()
    async with listening((a, sa), (MemoryTransport(net, "B", "mem:B"), sb)):
        conn = await a.connect("mem:B", "B")
        await conn.send(b"alive")
        await trio.sleep(1)
        a.crash()
        await conn.send(b"goodbye")
        with pytest.raises(OSError):
            await a.connect("mem:B", "B")
        await conn.aclose()  # the OS closes a killed process's sockets
        await settle()
    assert sb.payloads == [b"alive"]


async def test_closed_connection_raises_and_pump_errors_surface(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, rnd = MemoryNetwork(), Round()
    a = faulty(net, "A", [FaultRule("delay", delay=1.0)], rnd)
    sink = Sink()
    async with listening((a, Sink()), (MemoryTransport(net, "B", "mem:B"), sink)):
        conn = await a.connect("mem:B", "B")
        await conn.send(b"one")
        await trio.sleep(2)
        await sink.conns[0].aclose()  # the peer goes away
        await conn.send(b"two")  # accepted into the delay line...
        await trio.sleep(2)
        with pytest.raises(ConnectionClosed):  # ...and its failure surfaces on the next send
            await conn.send(b"three")
    assert sink.payloads == [b"one"]


# ---- whole nodes under faults (in-memory, mock clock) ------------------------------------


def node_ids(n: int) -> list[str]:
    return [Identity.from_seed(bytes([i + 1]) * 32).peer_id for i in range(n)]


def fault_nodes(
    tmp: Path,
    n: int,
    network: MemoryNetwork,
    plans: dict[int, list[FaultRule]],
    **overrides: object,
) -> list[Node]:
    """n nodes on a full mesh; node i applies `plans[i]` through the `faults` config field."""
    nodes = []
    for i in range(n):
        fields: dict[str, object] = {
            "min_peers": n - 1,
            "heartbeat_interval": 1.0,
            "heartbeat_timeout": 5.0,
            "round_timeout": 4.0,
            **overrides,
        }
        if i in plans:
            plan_file = tmp / f"faults-n{i}.json"
            dump_fault_plan(FaultPlan(tuple(plans[i])), plan_file)
            fields["faults"] = plan_file
        cfg = NodeConfig(
            data_dir=tmp / f"n{i}",
            listen=f"mem:n{i}",
            peers=tuple(f"mem:n{j}" for j in range(n) if j != i),
            nodes=n,
            node_index=i,
            seed=1000 + i,
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


def accuracy(node: Node) -> float:
    return float(node.history[-1]["accuracy"])


def spread(nodes: list[Node]) -> float:
    params = np.stack([n.machine.params for n in nodes])
    return float(np.abs(params - params.mean(axis=0)).max())


ROUNDS = 8


async def test_ten_percent_loss_costs_resends_not_rounds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # 8 nodes, every message on every link dropped with probability 0.1. Lost updates
    # must be recovered by resend requests: before, one node timing out a round alone
    # pushed the others into catch-ups, and most rounds were skipped or timed out.
    n, rounds = 8, 8
    nodes = fault_nodes(
        tmp_path,
        n,
        MemoryNetwork(),
        {i: [FaultRule("drop", probability=0.1)] for i in range(n)},
        rounds=rounds,
        round_timeout=10.0,
    )
    await run_all(nodes)
    assert sum(node.counters["updates_resent"] for node in nodes) > 0  # losses happened
    for node in nodes:
        assert [row["round"] for row in node.history] == list(range(rounds)), node.id
        assert not any(row["timed_out"] for row in node.history), node.history
        assert node.counters["catch_ups"] == 0
    # Every node aggregated every update: the same models up to summation order.
    assert spread(nodes) < 1e-6


async def test_a_peer_that_stalls_reading_is_known_unresponsive_while_connected(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # n2 stops reading from round 1 but keeps sending: alive by heartbeat, yet deaf.
    nodes = fault_nodes(
        tmp_path,
        4,
        MemoryNetwork(),
        {2: [FaultRule("stall", from_round=1)]},
        rounds=0,
        heartbeat_timeout=600.0,
    )
    deaf = nodes[2].id
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep(30)
        for node in (nodes[0], nodes[1], nodes[3]):
            assert node.machine.unresponsive == {deaf}, node.id
            assert node.peers.is_connected(deaf)  # still connected: it keeps talking
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def fault_free_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    nodes = fault_nodes(tmp_path_factory.mktemp("baseline"), 4, MemoryNetwork(), {}, rounds=ROUNDS)
    trio.run(run_all, nodes, clock=trio.testing.MockClock(autojump_threshold=0))
    assert spread(nodes) == 0.0  # a healthy mesh agrees bit for bit
    return float(np.mean([accuracy(n) for n in nodes]))


@pytest.mark.parametrize(
    ("rules", "injected"),
    [
        ([FaultRule("drop", probability=0.1)], "dropped"),
        ([FaultRule("delay", delay=0.2, jitter=0.1)], "delayed"),
        ([FaultRule("duplicate", probability=0.2)], "duplicated"),
        ([FaultRule("reorder", probability=0.3)], "reordered"),
    ],
    ids=["loss-10pct", "delay-200ms-jitter", "duplicates", "reordering"],
)
async def test_lossy_slow_or_shuffled_links_still_converge(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    fault_free_accuracy: float,
    rules: list[FaultRule],
    injected: str,
) -> None:
    nodes = fault_nodes(tmp_path, 4, MemoryNetwork(), dict.fromkeys(range(4), rules), rounds=ROUNDS)
    await run_all(nodes)
    faults = [n.transport.counts() for n in nodes]  # type: ignore[attr-defined]
    assert all(f.get(injected, 0) > 0 for f in faults), faults
    assert all(n.machine.round == ROUNDS for n in nodes)  # trained or caught up
    accs = [accuracy(n) for n in nodes]
    assert min(accs) >= fault_free_accuracy - 0.03, (accs, fault_free_accuracy)
    assert spread(nodes) < 0.05


async def test_partition_heals_to_agreement(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, fault_free_accuracy: float
) -> None:
    """Two halves cut apart for rounds [2, 5) keep learning on their own, then merge.

    Every link has 1 s of latency so that rounds take (mock) time as real ones do:
    otherwise rounds would be instantaneous and outrun the reconnect backoff.
    """
    ids = node_ids(4)
    halves = [{0, 1}, {2, 3}]

    def plan(i: int) -> list[FaultRule]:
        other = frozenset(ids[j] for j in next(h for h in halves if i not in h))
        return [
            FaultRule("cut", peers=other, from_round=2, to_round=5),
            FaultRule("delay", delay=1.0),
        ]

    rounds = 14
    nodes = fault_nodes(tmp_path, 4, MemoryNetwork(), {i: plan(i) for i in range(4)}, rounds=rounds)
    await run_all(nodes)
    for n in nodes:
        heard = [row["peers_heard"] for row in n.history]
        assert len(heard) == rounds
        assert heard[:2] == [3, 3]
        assert all(h <= 1 for h in heard[2:5]), heard  # only its own half
        healed = next(r for r in range(5, rounds) if heard[r] == 3)
        assert healed <= 5 + 3, heard  # reconnected within 3 rounds of the heal
        assert all(h == 3 for h in heard[healed:]), heard
        assert n.transport.counts()["cut_dials"] > 0  # type: ignore[attr-defined]
    # One model again, bit for bit, as good as without the partition.
    assert spread(nodes) == 0.0
    assert accuracy(nodes[0]) >= fault_free_accuracy - 0.03


class Spy:
    """Records what a transport's connections hand to the node (receive side)."""

    def __init__(self, inner: MemoryTransport) -> None:
        self.inner = inner
        self.received: list[tuple[str, bytes]] = []

    @property
    def local_id(self) -> str:
        return self.inner.local_id

    def _wrap(self, conn: Connection) -> Connection:
        spy = self

        class Recording:
            peer_id = conn.peer_id
            remote_address = conn.remote_address
            outbound = conn.outbound

            async def send(self, payload: bytes) -> None:
                await conn.send(payload)

            async def receive(self) -> bytes:
                payload = await conn.receive()
                spy.received.append((conn.peer_id, payload))
                return payload

            async def aclose(self) -> None:
                await conn.aclose()

        return Recording()

    async def listen(
        self,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def accept(conn: Connection) -> None:
            await handler(self._wrap(conn))

        await self.inner.listen(accept, task_status=task_status)

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        return self._wrap(await self.inner.connect(address, expected_peer_id))


CODEC_REASONS = ("malformed", "bad_version", "unknown_type", "bad_field", "bad_tensor")


async def test_corrupt_and_truncated_frames_are_counted_and_never_crash(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Node 2 garbles a third of everything it sends (a broken peer, not a lossy
    network: TLS would catch those). The others count every undecodable message
    exactly once and keep learning."""
    garble = [FaultRule("truncate", probability=0.15), FaultRule("corrupt", probability=0.2)]
    nodes = fault_nodes(tmp_path, 3, MemoryNetwork(), {2: garble}, rounds=ROUNDS)
    spies = []
    for n in nodes[:2]:
        spy = Spy(n.transport)  # type: ignore[arg-type]
        n.transport = spy
        spies.append(spy)
    await run_all(nodes)
    injected = nodes[2].transport.counts()  # type: ignore[attr-defined]
    assert injected["truncated"] > 3 and injected["corrupted"] > 3, injected
    total = 0
    for n, spy in zip(nodes[:2], spies, strict=True):
        undecodable = 0
        for _peer, payload in spy.received:
            try:
                codec.decode(payload, limits=n.limits)
            except WireError:
                undecodable += 1
        assert sum(n.frames_rejected[r] for r in CODEC_REASONS) == undecodable
        total += undecodable
        assert n.machine.round == ROUNDS  # trained every round, or caught up
        assert np.isfinite(n.machine.params).all()
    assert total >= injected["truncated"] // 2  # most garbage reached a node and was counted


async def test_a_peer_that_never_reads_cannot_grow_our_memory(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A slow consumer asks for our model over and over and never reads the replies:
    the per-link queue stays under its bound and the excess is dropped and counted."""
    network = MemoryNetwork()
    nodes = fault_nodes(
        tmp_path, 2, network, {}, rounds=2, model="mlp", hidden=64, heartbeat_timeout=1000.0
    )
    node = nodes[0]
    reply = len(codec.encode(StateReply(node.id, 0, node.machine.params, 1)))
    limit = max(8 * 1024 * 1024, 3 * 4 * node.machine.params.size)  # see Mesh.enqueue
    requests = 2 * limit // reply
    slow = MemoryTransport(network, Identity.from_seed(b"s" * 32), "mem:slow")
    peak = 0
    async with trio.open_nursery() as nursery:
        for n in nodes:
            await nursery.start(n.run)
        conn = await slow.connect("mem:n0", node.id)
        ask = codec.encode(StateRequest(slow.local_id, 0))
        # A burst buys one reply, not 100: state replies are rate-limited per peer.
        for _ in range(100):
            await conn.send(ask)
        await trio.sleep(0.01)
        assert node.counters["state_requests_throttled"] == 99
        # Paced at the allowed rate, the replies pile up in a queue nobody reads.
        for i in range(requests - 100):
            await trio.sleep(STATE_REPLY_EVERY)
            await conn.send(ask)  # never a receive()
            if i % 16 == 0:
                peak = max(peak, node.mesh.links[slow.local_id].queued_bytes)
        await trio.sleep(1)
        link = node.mesh.links[slow.local_id]  # still connected
        peak = max(peak, link.queued_bytes)
        assert node.peers.peers[slow.local_id].messages_in == requests
        for n in nodes:
            await n.done.wait()  # and the federation carried on meanwhile
        nursery.cancel_scope.cancel()
    assert limit - reply < peak <= limit
    queued_or_sent = peak // reply + CHANNEL_CAPACITY + 1
    answered = requests - node.counters["state_requests_throttled"]
    assert node.counters["send_queue_full"] >= answered - queued_or_sent - 2


async def test_a_peer_that_hangs_up_at_once_is_redialed_with_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """E.g. a peer whose allow list refuses us after the handshake, or one side of an
    asymmetric cut. Each redial costs both sides a TLS handshake."""
    network = MemoryNetwork()
    node = fault_nodes(tmp_path, 2, network, {}, rounds=2)[0]
    refuser = MemoryTransport(network, Identity.from_seed(bytes([2]) * 32), "mem:n1")
    accepted = 0
    async with trio.open_nursery() as nursery:

        async def hang_up(conn: Connection) -> None:
            nonlocal accepted
            accepted += 1
            if accepted > 200:  # a hot loop never lets the mock clock advance: stop it
                nursery.cancel_scope.cancel()
            await conn.aclose()

        await nursery.start(refuser.listen, hang_up)
        await nursery.start(node.run)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    # Exponential backoff from 0.5 s (x2, capped at 30 s) allows ~8 dials a minute.
    assert accepted <= 12, accepted


# ---- scenario [[faults]] -----------------------------------------------------------------


def scenario_with(faults: list[dict[str, object]], nodes: int = 4, rounds: int = 10) -> Scenario:
    return parse_scenario({"nodes": nodes, "rounds": rounds, "faults": faults})


def test_scenario_faults_parse_into_events_plans_and_a_timeline() -> None:
    s = scenario_with(
        [
            {"at_round": 5, "kind": "restart", "nodes": [3]},
            {"at_round": 3, "kind": "crash", "nodes": [3]},
            {"at_round": 2, "kind": "partition", "nodes": [0, 1]},
            {"at_round": 5, "kind": "heal"},
            {"at_round": 0, "kind": "loss", "probability": 0.1},
            {"at_round": 1, "kind": "delay", "delay": 0.2, "jitter": 0.05, "until_round": 4},
            {"at_round": 0, "kind": "corrupt", "nodes": [2], "flips": 2},
        ]
    )
    assert s.faults[1] == FaultEvent(3, "crash", (3,))
    ids = ["A", "B", "C", "D"]
    plans = node_fault_plans(s.faults, ids)
    cut = FaultRule("cut", peers=frozenset({"C", "D"}), from_round=2, to_round=5)
    assert cut in plans[0].rules and cut in plans[1].rules
    assert FaultRule("cut", peers=frozenset({"A", "B"}), from_round=2, to_round=5) in plans[3].rules
    assert FaultRule("drop", probability=0.1) in plans[2].rules
    assert FaultRule("delay", delay=0.2, jitter=0.05, from_round=1, to_round=4) in plans[0].rules
    assert [r.kind for r in plans[2].rules].count("corrupt") == 1
    assert [r.kind for r in plans[0].rules].count("corrupt") == 0
    values = s.node_config_values(
        [f"mem:n{i}" for i in range(4)], [Path(f"d{i}") for i in range(4)]
    )
    assert [v.get("faults") for v in values] == [Path(f"d{i}") / FAULTS_FILE for i in range(4)]
    rows = timeline(s.faults)
    assert [(r["round"], r["kind"]) for r in rows][:3] == [
        (0, "loss"),
        (0, "corrupt"),
        (1, "delay"),
    ]
    assert {"round": 2, "kind": "partition", "label": "partition n0,n1 | rest", "nodes": [0, 1],
            "until_round": 5} in rows  # fmt: skip


def test_scenario_without_network_faults_passes_no_plan() -> None:
    s = scenario_with([{"at_round": 3, "kind": "crash", "nodes": [1]}])
    values = s.node_config_values(
        [f"mem:n{i}" for i in range(4)], [Path(f"d{i}") for i in range(4)]
    )
    assert all("faults" not in v for v in values)
    assert never_restarted(s.faults) == {1}


@pytest.mark.parametrize(
    ("faults", "expected"),
    [
        ([{"kind": "crash", "nodes": [1]}], "faults[0].at_round: is required"),
        ([{"at_round": 1, "kind": "meteor"}], "faults[0].kind: unknown value 'meteor'"),
        ([{"at_round": 10, "kind": "crash", "nodes": [1]}], "faults[0].at_round: must be in 0..9"),
        ([{"at_round": 1, "kind": "crash"}], "faults[0].nodes: is required"),
        ([{"at_round": 1, "kind": "crash", "nodes": [4]}], "faults[0].nodes: 4 is not a node"),
        (
            [{"at_round": 1, "kind": "crash", "nodes": [1, 1]}],
            "faults[0].nodes: lists a node twice",
        ),
        (
            [{"at_round": 1, "kind": "crash", "nodes": [1], "delay": 1}],
            "faults[0].delay: unknown key",
        ),
        ([{"at_round": 1, "kind": "restart", "nodes": [1]}], "faults[0].nodes: node 1 is not down"),
        (
            [
                {"at_round": 3, "kind": "crash", "nodes": [1]},
                {"at_round": 3, "kind": "restart", "nodes": [1]},
            ],
            "faults[1].at_round: must be after the crash",
        ),
        (
            [{"at_round": 1, "kind": "crash", "nodes": [0, 1, 2, 3]}],
            "faults[0].nodes: would crash every",
        ),
        ([{"at_round": 1, "kind": "heal"}], "faults[0].kind: nothing to heal"),
        (
            [{"at_round": 1, "kind": "partition", "nodes": [0, 1, 2, 3]}],
            "faults[0].nodes: one side",
        ),
        ([{"at_round": 1, "kind": "loss"}], "faults[0].probability: is required"),
        (
            [{"at_round": 1, "kind": "loss", "probability": 2}],
            "faults[0].probability: must be a fraction",
        ),
        ([{"at_round": 1, "kind": "delay"}], "faults[0].delay: is required"),
        ([{"at_round": 1, "kind": "delay", "delay": "1s"}], "faults[0].delay: expected a number"),
        (
            [{"at_round": 4, "kind": "stall", "until_round": 4}],
            "faults[0].until_round: must be in 5..10",
        ),
        ([{"at_round": 1, "kind": "corrupt", "flips": 0}], "faults[0].flips: must be >= 1"),
        ({"at_round": 1}, "faults: expected an array of tables"),
        (["crash"], "faults[0]: expected a table"),
    ],
)
def test_scenario_fault_errors_name_the_field(faults: object, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"nodes": 4, "rounds": 10, "faults": faults})
    assert str(info.value).startswith(expected), str(info.value)


def test_crash_schedule_waits_for_the_victims_round_then_the_restart_round() -> None:
    s = scenario_with(
        [
            {"at_round": 3, "kind": "crash", "nodes": [2]},
            {"at_round": 5, "kind": "restart", "nodes": [2]},
        ]
    )
    sched = CrashSchedule.of(s.faults)
    assert sched.due({0: 9, 1: 9, 2: None, 3: 9}, set()) == []  # victim never reported
    assert sched.due({0: 4, 1: 4, 2: 2, 3: 4}, set()) == []
    assert sched.due({0: 4, 1: 4, 2: 3, 3: 4}, set()) == [s.faults[0]]
    assert sched.due({0: 4, 1: 4, 3: 4}, {2}) == []
    assert sched.due({0: 5, 1: 4, 3: 4}, {2}) == [s.faults[1]]
    assert sched.pending == []
    # Both at once when the runner polls late: crash first, then restart.
    late = CrashSchedule.of(s.faults)
    assert late.due({0: 6, 1: 6, 2: 6, 3: 6}, set()) == list(s.faults)


def test_report_has_a_fault_timeline_and_marks_the_plot(tmp_path: Path) -> None:
    s = scenario_with(
        [
            {"at_round": 2, "kind": "crash", "nodes": [1]},
            {"at_round": 4, "kind": "restart", "nodes": [1]},
            {"at_round": 1, "kind": "partition", "nodes": [0, 1], "until_round": 3},
        ],
        rounds=6,
    )
    rows = [{"round": r, "accuracy": 0.5 + r / 20} for r in range(6)]
    events = [
        {"kind": "crash", "at_round": 2, "round": 3, "phase": "collecting", "t": 1.5},
        {"kind": "restart", "at_round": 4, "round": 4, "t": 2.5},
    ]
    records = {
        f"n{i}": {"rounds": rows[:3] if i == 1 else rows, **({"events": events} if i == 1 else {})}
        for i in range(4)
    }
    metrics = write_report(tmp_path, s, records, wall_seconds=3.0, mode="processes", console=None)
    assert [(f["round"], f["kind"]) for f in metrics["faults"]] == [
        (1, "partition"),
        (2, "crash"),
        (4, "restart"),
    ]
    assert metrics["faults"][1]["injected"] == [{"node": 1, "round": 3, "t": 1.5}]
    assert metrics["faults"][0]["until_round"] == 3
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    plain = write_report(
        tmp_path, scenario_with([]), records, wall_seconds=1, mode="x", console=None
    )
    assert "faults" not in plain


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow, the point here
async def test_a_peer_sending_huge_finite_models_cannot_crash_a_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """What a peer garbling float bytes does (corrupt kind, seen in the process runs):
    values like 1e30 are finite, so they reach the aggregation."""
    network = MemoryNetwork()
    nodes = fault_nodes(tmp_path, 3, network, {}, rounds=4, model="mlp", hidden=16)[:2]
    evil = MemoryTransport(network, Identity.from_seed(bytes([3]) * 32), "mem:n2")
    huge = np.full(nodes[0].machine.params.size, 1e30, dtype=np.float32)

    async def never_read(conn: Connection) -> None:
        await trio.sleep_forever()

    crashed: list[BaseException] = []

    async def guarded(node: Node, task_status: trio.TaskStatus[None]) -> None:
        try:
            await node.run(task_status=task_status)
        except Exception as exc:  # the point is to record it
            crashed.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(evil.listen, never_read)
        for n in nodes:
            await nursery.start(guarded, n)
        conns = [await evil.connect(f"mem:n{i}", n.id) for i, n in enumerate(nodes)]
        sent: set[tuple[int, int]] = set()
        while not crashed and not all(n.done.is_set() for n in nodes):
            for i, (n, conn) in enumerate(zip(nodes, conns, strict=True)):
                if (i, n.machine.round) not in sent:
                    sent.add((i, n.machine.round))
                    update = ModelUpdate(evil.local_id, n.machine.round, huge, 100)
                    await conn.send(codec.encode(update))
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert crashed == []
    for n in nodes:
        assert np.isfinite(n.machine.params).all()


def test_process_runner_kills_and_restarts_a_real_node(tmp_path: Path) -> None:
    """SIGKILL at the reported round, same command on the same data dir later; the
    node resumes from its checkpoint and the run completes with every node done."""
    from p2pfl.scenario.processes import run_processes

    s = parse_scenario(
        {
            "nodes": 3,
            "rounds": 8,
            "protocol": {"round_timeout": 10.0},
            "faults": [
                {"at_round": 0, "kind": "delay", "delay": 0.3},  # rounds take real time
                {"at_round": 2, "kind": "crash", "nodes": [2]},
                {"at_round": 4, "kind": "restart", "nodes": [2]},
            ],
        }
    )
    records, _ = run_processes(s, tmp_path, timeout=120)
    events = records["n2"]["events"]
    assert [e["kind"] for e in events] == ["crash", "restart"]
    assert events[0]["round"] >= 2 and events[1]["round"] >= 4
    log = (tmp_path / "nodes" / "n2" / "node.log").read_text()
    resumed = re.search(r"resuming from checkpoint at round (\d+)", log)
    # Checkpoints are written off the event loop, after the round's evaluation: a
    # SIGKILL right after the node reports round r can lose the checkpoint of round r
    # still queued for the disk, so the node resumes from an earlier written one, never
    # from scratch and never from a round it had not reached.
    assert resumed is not None and 1 <= int(resumed.group(1)) <= events[0]["round"]
    for i in range(3):
        ckpt = load_checkpoint(tmp_path / "nodes" / f"n{i}" / "checkpoint.msgpack")
        assert ckpt is not None and ckpt.round == 8
    assert (tmp_path / "nodes" / "n0" / "faults.json").exists()


async def test_closed_connections_leave_their_counts_but_not_their_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A node under churn used to keep every connection's fault state (a generator,
    counters, held payloads) for as long as it ran."""
    net, rnd = MemoryNetwork(), Round()
    a = faulty(net, "A", [FaultRule("drop")], rnd)
    async with listening((a, Sink()), (MemoryTransport(net, "B", "mem:B"), Sink())):
        for _ in range(5):
            conn = await a.connect("mem:B", "B")
            await conn.send(b"lost")
            await conn.aclose()
            await conn.aclose()  # twice: counted once
        open_conn = await a.connect("mem:B", "B")
        await open_conn.send(b"lost too")
        assert len(a.links) == 1  # only the open connection's state is kept
        assert a.counts() == {"dropped": 6}
