"""Deferred aggregation: the round machine hands the rule's work out (a real node runs
it in a worker thread) and finishes the round when the result comes back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import trio
from test_node_inmemory import make_nodes
from test_rounds import PEERS, collecting, full, kinds, only

from p2pfl.aggregation import mean
from p2pfl.node.daemon import Node
from p2pfl.protocol import Aggregate, Aggregated, Phase, Rejected, Train
from p2pfl.transport.memory import MemoryNetwork


def test_deferred_round_ends_only_with_the_result_and_matches_inline() -> None:
    inline = collecting(own=2.0)
    deferred = collecting(own=2.0, defer_aggregation=True)
    for m in (inline, deferred):
        m.receive_update(1.0, "a", 0, full(4.0), 1)
        m.receive_update(1.0, "b", 0, full(6.0), 2)
    expected = only(inline.receive_update(1.0, "c", 0, full(8.0), 1), Aggregated)

    acts = deferred.receive_update(1.0, "c", 0, full(8.0), 1)
    assert kinds(acts) == [Aggregate]
    job = only(acts, Aggregate)
    assert deferred.phase is Phase.AGGREGATING and deferred.round == 0
    # Nothing else ends the round meanwhile: no timeout, no second aggregation.
    assert deferred.next_wakeup is None
    assert deferred.tick(1e9) == []
    late = deferred.receive_update(2.0, "a", 0, full(99.0), 1)
    assert Aggregate not in kinds(late) and only(late, Rejected).reason == "duplicate"
    assert deferred.phase is Phase.AGGREGATING

    acts = deferred.aggregated(3.0, 0, job.run(mean))
    got = only(acts, Aggregated)
    assert kinds(acts) == [Aggregated, Train]
    np.testing.assert_array_equal(got.params, expected.params)
    assert got.senders == expected.senders == ("a", "b", "c")
    assert deferred.round == 1 and deferred.phase is Phase.TRAINING


def test_a_result_for_another_round_or_phase_is_ignored() -> None:
    m = collecting(own=1.0, defer_aggregation=True)
    assert m.aggregated(1.0, 0, full(5.0)) == []  # nothing was asked for
    for p in PEERS:
        acts = m.receive_update(1.0, p, 0, full(3.0), 1)
    job = only(acts, Aggregate)
    assert m.aggregated(2.0, 1, job.run(mean)) == []
    assert m.phase is Phase.AGGREGATING
    assert kinds(m.aggregated(2.0, 0, job.run(mean))) == [Aggregated, Train]
    assert m.aggregated(2.0, 0, job.run(mean)) == []  # once only


def test_a_non_finite_result_keeps_our_own_model() -> None:
    m = collecting(own=1.5, defer_aggregation=True)
    for p in PEERS:
        acts = m.receive_update(1.0, p, 0, full(3.0), 1)
    only(acts, Aggregate)
    acts = m.aggregated(2.0, 0, full(np.inf))
    assert only(acts, Rejected).reason == "non_finite_aggregate"
    np.testing.assert_array_equal(only(acts, Aggregated).params, full(1.5))


def threaded_nodes(tmp_path: Path, n: int, **overrides: Any) -> list[Node]:
    """Nodes as a real process runs them: training, records, decoding, encoding and the
    rule in worker threads (real time, no mock clock: threads do not follow one)."""
    plain = make_nodes(tmp_path, n, MemoryNetwork(), **overrides)
    for node in plain:
        node.close()
    network = MemoryNetwork()
    built = []
    for i, node in enumerate(plain):
        built.append(
            Node(
                node.config,
                identity=node.identity,
                transport=type(node.transport)(network, node.identity, f"mem:n{i}"),
                train_in_thread=True,
                control_socket=False,
            )
        )
    return built


async def run_all(nodes: list[Node]) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            for node in nodes:
                await node.done.wait()
            nursery.cancel_scope.cancel()


async def test_threaded_nodes_aggregate_and_encode_off_the_loop(tmp_path: Path) -> None:
    nodes = threaded_nodes(tmp_path, 3, rounds=3)
    assert all(n.machine.settings.defer_aggregation and n.mesh.offload for n in nodes)
    await run_all(nodes)
    for node in nodes:
        assert [row["round"] for row in node.history] == [0, 1, 2]
        for row in node.history:
            assert row["peers_heard"] == 2
            assert {"aggregate_s", "encode_s", "train_s"} <= set(row["timing"])
        assert node.status()["event_loop"]["task_steps"] > 0
    # Every node aggregated the same inputs in the same order: the same model.
    hashes = {node.status()["model"]["hash"] for node in nodes}
    assert len(hashes) == 1


async def test_a_rule_that_fails_in_its_thread_keeps_our_model_and_the_round_ends(
    tmp_path: Path,
) -> None:
    nodes = threaded_nodes(tmp_path, 3, rounds=2)

    def broken(x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
        raise RuntimeError("a bug in a custom rule")

    nodes[0].machine.rule = broken
    await run_all(nodes)
    assert [row["round"] for row in nodes[0].history] == [0, 1]
    assert sum(nodes[0].supervisor.contained.values()) == 2
    assert all(not n.supervisor.contained for n in nodes[1:])
