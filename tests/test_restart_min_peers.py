"""A restarted node does not wait for neighbours that may be gone for good.

A scenario waits before round 0 for every graph neighbour (`min_peers` = the node's
degree), so round 0 does not train on half a mesh. A node that comes back from a
checkpoint is past round 0: waiting for all its neighbours again stalled it for the
rest of the run when one of them had crashed and never came back.
"""

from __future__ import annotations

from pathlib import Path

from p2pfl.scenario import parse_scenario
from p2pfl.storage import load_checkpoint


def test_a_restarted_node_starts_without_a_neighbour_that_stays_down(tmp_path: Path) -> None:
    from p2pfl.scenario.processes import run_processes

    s = parse_scenario(
        {
            "nodes": 4,
            "rounds": 8,
            "protocol": {"round_timeout": 5.0},
            "faults": [
                {"at_round": 0, "kind": "delay", "delay": 0.2},  # rounds take real time
                {"at_round": 1, "kind": "crash", "nodes": [3]},  # never restarted
                {"at_round": 2, "kind": "crash", "nodes": [1]},
                {"at_round": 4, "kind": "restart", "nodes": [1]},
            ],
        }
    )
    records, _ = run_processes(s, tmp_path, timeout=90)
    assert [e["kind"] for e in records["n1"]["events"]] == ["crash", "restart"]
    for i in (0, 1, 2):
        ckpt = load_checkpoint(tmp_path / "nodes" / f"n{i}" / "checkpoint.msgpack")
        assert ckpt is not None and ckpt.round == 8, f"n{i}"
