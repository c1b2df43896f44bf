"""Secure aggregation inside a live in-memory federation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.transport.memory import MemoryNetwork
from p2pfl.wire import codec
from p2pfl.wire.messages import ModelUpdate, SecureEnvelope


class Recorder:
    """Wraps a node's mesh enqueue to see what actually leaves it."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def wrap(self, node: object) -> None:
        original = node.mesh.enqueue  # type: ignore[attr-defined]

        def enqueue(peer: str, payload: bytes, *, urgent: bool = False) -> None:
            msg = codec.decode(payload)
            self.kinds.append(msg.kind if isinstance(msg, SecureEnvelope) else msg.TYPE)
            original(peer, payload, urgent=urgent)

        node.mesh.enqueue = enqueue  # type: ignore[attr-defined]


async def test_secure_federation_learns_without_plain_updates(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(
        tmp_path,
        8,
        MemoryNetwork(),
        rounds=6,
        epochs=2,
        secure_aggregation=True,
        group_size=3,
        aggregation="median",
        round_timeout=20.0,
    )
    recorder = Recorder()
    for node in nodes:
        recorder.wrap(node)
    await run_until_done(nodes)

    assert ModelUpdate.TYPE not in recorder.kinds  # no neighbour ever saw a plain update
    assert {"sa_key", "sa_announce", "sa_masked", "sa_unmask", "sa_reveal"} <= set(recorder.kinds)
    for node in nodes:
        status = node.status()
        secure = status["secure"]
        # 7 neighbours in groups of 3 (leftovers merged): 2 groups per round, all completed.
        assert secure["groups_formed"] == 2 * 6, secure
        assert secure["groups_completed"] == 2 * 6
        assert secure["groups_dropped"] == 0
        # Groups are announced as training starts; whether a mask could be computed
        # ahead depends on when each announcement lands, but every answer is counted.
        answers = secure["masked_ahead"] + secure["masked_on_demand"]
        assert answers == 6 * 7, secure  # one answer per neighbour's round
        assert all(row["peers_heard"] == 2 for row in node.history)  # two group means
        assert node.history[-1]["accuracy"] > 0.88
    params = np.stack([n.machine.params for n in nodes])
    assert np.abs(params - params.mean(axis=0)).max() < 0.1


async def test_status_view_shows_secure_and_compression_sections(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from rich.console import Console

    from p2pfl.control.render import render_status

    nodes = make_nodes(
        tmp_path, 4, MemoryNetwork(), rounds=2, secure_aggregation=True, group_size=3
    )
    await run_until_done(nodes)
    console = Console(width=100, record=True)
    console.print(render_status(nodes[0].status()))
    text = console.export_text()
    assert "secure agg" in text and "groups 2/2 completed" in text
    assert "masks computed ahead" in text

    plain = make_nodes(
        tmp_path / "z", 3, MemoryNetwork(), rounds=2, compression=("quantize:8", "zstd:1")
    )
    await run_until_done(plain)
    status = plain[0].status()
    assert status["compression"]["ratio"] > 1.5
    console = Console(width=100, record=True)
    console.print(render_status(status))
    assert "quantize:8 > zstd:1" in console.export_text()
