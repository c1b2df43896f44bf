"""Secure aggregation v2 inside a live in-memory federation (docs/secure-aggregation.md)."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.node import Node
from p2pfl.protocol import Phase
from p2pfl.secure.group_messages import GroupMean
from p2pfl.secure.wire import group_from_envelope
from p2pfl.transport.memory import MemoryNetwork
from p2pfl.wire import codec
from p2pfl.wire.messages import ModelUpdate, SecureEnvelope, StateReply, StateRequest


def _digest(params: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(params).tobytes()).digest()


class Recorder:
    """Wraps nodes' mesh enqueue to see what actually leaves each node."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.models: list[tuple[str, int, bytes]] = []  # (sender, round, digest) in the clear
        self.means: dict[int, set[bytes]] = defaultdict(set)  # round -> group means sent
        self.states: list[StateReply] = []

    def wrap(self, node: Node) -> None:
        original = node.mesh.enqueue

        def enqueue(peer: str, payload: bytes, *, urgent: bool = False) -> bool:
            msg = codec.decode(payload)
            if isinstance(msg, SecureEnvelope):
                self.kinds.append(msg.kind)
                group_msg = group_from_envelope(msg, max_dim=node.model.num_params)
                if isinstance(group_msg, GroupMean):
                    self.means[group_msg.round].add(_digest(group_msg.mean))
            else:
                self.kinds.append(msg.TYPE)
            if isinstance(msg, ModelUpdate):
                self.models.append((msg.sender, msg.round, _digest(msg.params)))
            if isinstance(msg, StateReply):
                self.states.append(msg)
            return original(peer, payload, urgent=urgent)

        node.mesh.enqueue = enqueue  # type: ignore[method-assign]


async def test_only_group_means_leave_a_node_in_the_clear(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rounds = 6
    nodes = make_nodes(
        tmp_path,
        8,
        MemoryNetwork(),
        rounds=rounds,
        epochs=2,
        secure_aggregation=True,
        group_size=3,
        aggregation="median",
        round_timeout=20.0,
    )
    recorder = Recorder()
    for node in nodes:
        recorder.wrap(node)
    started = trio.current_time()
    await run_until_done(nodes)

    assert {"sa2_id", "sa2_join", "sa2_offer", "sa2_masked", "sa2_reveal", "sa2_mean"} <= set(
        recorder.kinds
    )
    # Every model a node sent in the clear is a group mean its leader announced: no
    # neighbour ever saw one node's update.
    assert recorder.models
    for sender, round, digest in recorder.models:
        assert digest in recorder.means[round], (sender[:8], round)
    for node in nodes:
        secure = node.status()["secure"]
        assert secure["rounds_grouped"] == rounds and secure["rounds_out"] == 0, secure
        assert not any(row["timed_out"] for row in node.history)
        assert node.history[-1]["accuracy"] > 0.88
    # A full mesh of 8 with groups of 3..: two groups of 4 per round, everyone in one.
    assert all(len(recorder.means[r]) == 2 for r in range(rounds))
    # No round waited for a timeout (the secure steps end on messages, not deadlines).
    assert trio.current_time() - started < 20.0
    params = np.stack([n.machine.params for n in nodes])
    assert np.abs(params - params.mean(axis=0)).max() < 0.1


@pytest.mark.parametrize("policy", ["skip", "plain"])
async def test_without_a_group_the_policy_applies_and_rounds_do_not_wait(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    """Three nodes that insist on groups of 4 never get one: with `skip` each withholds
    its update and tells its neighbours (so nobody waits out a timeout), with `plain` it
    sends it in the clear. Either way status says so and the log says it once."""
    rounds = 4
    nodes = make_nodes(
        tmp_path,
        3,
        MemoryNetwork(),
        rounds=rounds,
        secure_aggregation=True,
        group_size=4,
        secure_min_group=4,
        secure_no_group=policy,
        round_timeout=30.0,
    )
    recorder = Recorder()
    for node in nodes:
        recorder.wrap(node)
    started = trio.current_time()
    with caplog.at_level(logging.WARNING, logger="p2pfl.secure"):
        await run_until_done(nodes)

    assert trio.current_time() - started < 30.0  # no round waited out its timeout
    for node in nodes:
        secure = node.status()["secure"]
        assert secure["rounds_out"] == rounds and secure["rounds_grouped"] == 0, secure
        assert secure["out_reasons"] == {"no_group": rounds}
        assert not any(row["timed_out"] for row in node.history)
    warnings = [r for r in caplog.records if "no group for round" in r.getMessage()]
    assert len(warnings) == len(nodes)  # one line per node, not one per round
    if policy == "skip":
        assert "sa2_none" in recorder.kinds and not recorder.models
        assert all(row["peers_heard"] == 0 for n in nodes for row in n.history)
    else:
        assert "sa2_none" not in recorder.kinds
        assert len(recorder.models) == rounds * 3 * 2  # each node, each neighbour, each round
        assert all(row["peers_heard"] == 2 for n in nodes for row in n.history)


async def test_policy_wait_does_not_start_rounds_without_enough_keyed_peers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(
        tmp_path,
        3,
        MemoryNetwork(),
        rounds=2,
        secure_aggregation=True,
        group_size=4,
        secure_min_group=4,  # needs 3 keyed neighbours; each node has 2
        min_peers=1,
    )
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await trio.sleep(60.0)
        for node in nodes:
            assert node.phase is Phase.STARTING
            assert node.status()["secure"]["keyed_peers"] == 2
        nursery.cancel_scope.cancel()


async def test_a_state_reply_in_secure_mode_never_carries_the_nodes_own_model(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that asks for our state (to catch up) gets the mean of the group means we
    received, or nothing: our own model is shaped by our own update."""
    nodes = make_nodes(
        tmp_path, 6, MemoryNetwork(), rounds=3, secure_aggregation=True, group_size=3
    )
    recorder = Recorder()
    recorder.wrap(nodes[0])
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        for node in nodes:
            await node.done.wait()
        asker = nodes[1]
        link = nodes[0].mesh.links[asker.id]
        nodes[0]._on_message(link, StateRequest(asker.id, 0))
        nursery.cancel_scope.cancel()
    [reply] = recorder.states
    own = nodes[0].machine.params
    assert nodes[0].secure is not None
    public = nodes[0].secure.public_params
    assert public is not None and np.array_equal(reply.params, public)
    assert not np.array_equal(reply.params, own)


async def test_status_view_shows_secure_and_compression_sections(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from rich.console import Console

    from p2pfl.control.render import render_status

    nodes = make_nodes(
        tmp_path, 4, MemoryNetwork(), rounds=2, secure_aggregation=True, group_size=3
    )
    await run_until_done(nodes)
    console = Console(width=120, record=True)
    console.print(render_status(nodes[0].status()))
    text = console.export_text()
    assert "secure agg" in text and "in a group 2 rounds, without 0 (policy wait)" in text
    assert "secure WARNING" not in text

    out = make_nodes(
        tmp_path / "o",
        3,
        MemoryNetwork(),
        rounds=2,
        secure_aggregation=True,
        group_size=4,
        secure_min_group=4,
        secure_no_group="skip",
    )
    await run_until_done(out)
    console = Console(width=120, record=True)
    console.print(render_status(out[0].status()))
    text = console.export_text()
    assert "secure WARNING" in text and "no group for the last 2 rounds" in text
    assert "update withheld" in text

    plain = make_nodes(
        tmp_path / "z", 3, MemoryNetwork(), rounds=2, compression=("quantize:8", "zstd:1")
    )
    await run_until_done(plain)
    status = plain[0].status()
    assert status["compression"]["ratio"] > 1.5
    console = Console(width=100, record=True)
    console.print(render_status(status))
    assert "quantize:8 > zstd:1" in console.export_text()


@pytest.mark.parametrize("mates", ["members", "neighbours"])
async def test_on_a_sparse_graph_mates_meet_through_their_leader(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, mates: str
) -> None:
    """A random 4-regular graph of 12 nodes: a leader's choosers are mostly not each
    other's neighbours. With relayed mates (membership proofs, sealed messages through
    the leader) most nodes are in a group every round; restricted to neighbours, few
    are (the triangles of the graph), and the rest abstain; no round waits out its
    timeout either way."""
    from p2pfl.scenario import parse_scenario
    from p2pfl.scenario.inprocess import build_nodes

    rounds = 4
    scenario = parse_scenario(
        {
            "name": "sparse",
            "nodes": 12,
            "rounds": rounds,
            "topology": {"kind": "kregular", "degree": 4},
            "protocol": {"round_timeout": 30.0},
            "secure_aggregation": {
                "enabled": True,
                "group_size": 4,
                "no_group": "skip",
                "mates": mates,
            },
        }
    )
    nodes = build_nodes(scenario, tmp_path)
    recorder = Recorder()
    for node in nodes:
        recorder.wrap(node)
    started = trio.current_time()
    await run_until_done(nodes)
    assert trio.current_time() - started < 30.0
    grouped = sum(n.status()["secure"]["rounds_grouped"] for n in nodes)
    assert not any(row["timed_out"] for n in nodes for row in n.history)
    for _sender, round, digest in recorder.models:  # still only group means in the clear
        assert digest in recorder.means[round]
    if mates == "members":
        assert grouped >= 0.6 * rounds * len(nodes), grouped
        assert "sa2_relayed" in recorder.kinds
        assert np.mean([n.history[-1]["accuracy"] for n in nodes]) > 0.85
    else:
        assert grouped <= 0.5 * rounds * len(nodes), grouped
