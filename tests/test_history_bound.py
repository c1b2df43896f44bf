"""A long-running node keeps a bounded history; metrics.jsonl keeps every round.

The soak benchmark saw every long-lived node grow by ~0.5 KiB a round, and every round
rewrite (and fsync) a checkpoint that grew with the total number of rounds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.node import learner as learner_module
from p2pfl.node.learner import read_metrics
from p2pfl.scenario.processes import node_rows
from p2pfl.storage import load_checkpoint
from p2pfl.transport.memory import MemoryNetwork


async def test_history_in_memory_and_checkpoint_is_bounded_metrics_file_is_not(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(learner_module, "HISTORY_KEPT", 3)
    nodes = make_nodes(tmp_path, 2, MemoryNetwork(), rounds=6)
    await run_until_done(nodes)
    for node in nodes:
        assert [row["round"] for row in node.history] == [3, 4, 5]
        assert len(node.status()["history"]) == 3
        ckpt = load_checkpoint(node.data_dir / "checkpoint.msgpack")
        assert ckpt is not None and [row["round"] for row in ckpt.history] == [3, 4, 5]
        # The durable record has every round, and reports read it.
        rows = node_rows(node.data_dir, node.history)
        assert [row["round"] for row in rows] == [0, 1, 2, 3, 4, 5]
        assert [row["round"] for row in node.all_rows()] == [0, 1, 2, 3, 4, 5]


def test_metrics_file_reader_keeps_the_last_row_of_a_round_and_skips_torn_lines(
    tmp_path: Path,
) -> None:
    """A node killed between its metrics line and its checkpoint records that round
    again after the restart; a crash mid-append leaves a torn last line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"round": 0, "accuracy": 0.1}\n'
        '{"round": 1, "accuracy": 0.2}\n'
        '{"round": 1, "accuracy": 0.3}\n'
        "[1, 2]\n"
        '{"round": "2"}\n'
        '{"round": 2, "accur'
    )
    assert read_metrics(path) == [{"round": 0, "accuracy": 0.1}, {"round": 1, "accuracy": 0.3}]
    assert read_metrics(tmp_path / "missing.jsonl") == []
