"""A real node evaluates and writes checkpoints in a worker thread, in order.

Issue 13: "training and evaluation never run on the event loop" (a large model would
stall heartbeats). Checked structurally, not by timing: every evaluation and every
checkpoint write of a threaded node happens off the trio thread, rows arrive in round
order, `done` waits for the last round's records, and a shutdown with records still
queued writes the newest checkpoint.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.node import learner as learner_module
from p2pfl.storage import load_checkpoint
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport


def _threaded_nodes(tmp: Path, n: int, rounds: int) -> list[Node]:
    network = MemoryNetwork()
    nodes = []
    for i in range(n):
        cfg = NodeConfig(
            data_dir=tmp / f"t{i}",
            listen=f"mem:t{i}",
            peers=tuple(f"mem:t{j}" for j in range(n) if j != i),
            rounds=rounds,
            min_peers=n - 1,
            dataset="synthetic",
            nodes=n,
            node_index=i,
        ).validated()
        ident = Identity.from_seed(bytes([70 + i]) * 32)
        nodes.append(
            Node(
                cfg,
                identity=ident,
                transport=MemoryTransport(network, ident, f"mem:t{i}"),
                train_in_thread=True,  # a real node's setting
                control_socket=False,
            )
        )
    return nodes


async def test_evaluation_and_checkpoints_run_off_the_event_loop_in_order(
    tmp_path: Path, monkeypatch: Any
) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []  # (what, thread id)
    real_save = learner_module.save_checkpoint

    def save(path: Path, ckpt: Any) -> None:
        seen.append(("save", threading.get_ident()))
        real_save(path, ckpt)

    monkeypatch.setattr(learner_module, "save_checkpoint", save)
    nodes = _threaded_nodes(tmp_path, 2, rounds=3)
    for node in nodes:
        real_eval = node.learner.eval_model.evaluate

        def evaluate(x: Any, y: Any, real_eval: Any = real_eval) -> Any:
            seen.append(("evaluate", threading.get_ident()))
            return real_eval(x, y)

        node.learner.eval_model.evaluate = evaluate  # type: ignore[method-assign]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            for node in nodes:
                await node.done.wait()
            # `done` comes after the last round's row and checkpoint, not before.
            for node in nodes:
                assert [row["round"] for row in node.history] == [0, 1, 2]
                assert all("eval_s" in row["timing"] for row in node.history)
            nursery.cancel_scope.cancel()

    assert {w for w, _ in seen} == {"evaluate", "save"}
    assert all(thread != loop_thread for _, thread in seen), "work ran on the event loop"
    for node in nodes:
        ckpt = load_checkpoint(node.data_dir / "checkpoint.msgpack")
        assert ckpt is not None and ckpt.round == 3 and len(ckpt.history) == 3


async def test_shutdown_writes_what_is_still_queued(tmp_path: Path) -> None:
    (node,) = _threaded_nodes(tmp_path, 1, rounds=5)
    # Queue records as a running node does, but with no record loop to take them, as
    # if the node were cancelled while they waited: its shutdown path must still write
    # the newest checkpoint.
    node.learner.running = True  # records queue up, as in a running node
    node._checkpoint()
    row = {"round": 3, "timing": {}, "bytes_sent": 0, "bytes_received": 0, "seconds": 0.1}
    row |= {"peers_heard": 0, "timed_out": False}
    node.learner.record_round(node.machine.params, row, connected=0)
    node.machine.round = 4  # a later snapshot
    node._checkpoint()
    node.learner.finish(4)
    assert not (node.data_dir / "checkpoint.msgpack").exists()
    with trio.CancelScope() as scope:
        scope.cancel()
        await node.learner.record_loop()
    # Everything queued was written, in order: the metrics line, then the checkpoint
    # that includes it, and the run is marked done.
    ckpt = load_checkpoint(node.data_dir / "checkpoint.msgpack")
    assert ckpt is not None and ckpt.round == 4
    assert [r["round"] for r in ckpt.history] == [3]
    lines = (node.data_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"round": 3' in lines[0]
    assert node.done.is_set()
    node.close()
