"""The record queue stays bounded when its worker is slower than the rounds (issue 12).

The soak's long-lived nodes grew about 11 MiB an hour under churn: the records queue
(evaluation + metrics line + fsync'd checkpoint per round, written by one worker thread)
was unbounded, and on a loaded machine the worker fell behind, each queued item holding
a model copy. Now a newer checkpoint supersedes a queued one and only the newest rounds
keep their model for evaluation; every round still gets its metrics line.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from test_records_off_loop import _threaded_nodes

from p2pfl.node.learner import read_metrics
from p2pfl.node.records import Done, Evaluate, RecordQueue, Save
from p2pfl.storage import Checkpoint, load_checkpoint


def _evaluate(round: int) -> Evaluate:
    return Evaluate(np.full(3, round, np.float32), {"round": round}, connected=1)


def _save(round: int) -> Save:
    return Save(Checkpoint(round, np.zeros(3, np.float32), {}, [], b"f" * 32, {}))


def test_a_newer_checkpoint_supersedes_a_queued_one_and_order_is_kept() -> None:
    q = RecordQueue(max_evaluations=8)
    for r in range(5):
        q.put(_evaluate(r))
        q.put(_save(r + 1))
    q.put(Done())
    items = [q.get() for _ in range(len(q))]
    assert q.get() is None
    saves = [i for i in items if isinstance(i, Save)]
    assert [s.checkpoint.round for s in saves] == [5]  # only the newest state is written
    assert q.checkpoints_superseded == 4
    # Every round's metrics line is still there, in order, then the checkpoint, then done.
    rounds = [i.row["round"] for i in items if isinstance(i, Evaluate)]
    assert rounds == [0, 1, 2, 3, 4]
    assert isinstance(items[-2], Save) and isinstance(items[-1], Done)


def test_old_evaluations_are_skipped_but_their_rows_stay() -> None:
    q = RecordQueue(max_evaluations=2)
    for r in range(6):
        q.put(_evaluate(r))
        assert q.held_models() <= 2
    items = [q.get() for _ in range(len(q))]
    assert [i.row["round"] for i in items if isinstance(i, Evaluate)] == list(range(6))
    evaluated = [i.row["round"] for i in items if isinstance(i, Evaluate) and i.params is not None]
    assert evaluated == [4, 5]  # the newest rounds keep their model
    assert q.evaluations_skipped == 4


def test_held_models_are_bounded_however_far_the_worker_falls_behind() -> None:
    q = RecordQueue()
    for r in range(1000):
        q.put(_evaluate(r))
        q.put(_save(r))
    assert q.held_models() <= q.max_evaluations + 1
    assert len(q) == 1001  # 1000 small rows + one checkpoint


def test_max_evaluations_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RecordQueue(max_evaluations=0)


async def test_a_stalled_record_worker_holds_a_bounded_number_of_models(
    tmp_path: Path,
) -> None:
    """Real threaded nodes run 12 rounds while one node's evaluation is stuck; once it
    is released, every round has a metrics line, the skipped ones say so, the newest
    rounds are evaluated and the last checkpoint is the final round's."""
    rounds = 12
    nodes = _threaded_nodes(tmp_path, 2, rounds=rounds)
    slow = nodes[0]
    release = threading.Event()
    real_eval = slow.learner.eval_model.evaluate

    def evaluate(x: Any, y: Any) -> Any:
        release.wait(30)
        return real_eval(x, y)

    slow.learner.eval_model.evaluate = evaluate  # type: ignore[method-assign]
    most_held = 0

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            while slow.machine.round < rounds:
                most_held = max(most_held, slow.learner._records.held_models())
                await trio.sleep(0.01)
            most_held = max(most_held, slow.learner._records.held_models())
            release.set()
            for node in nodes:
                await node.done.wait()
            nursery.cancel_scope.cancel()

    assert most_held <= slow.learner._records.max_evaluations + 1
    status = slow.learner.records_status()
    assert status["evaluations_skipped"] > 0 and status["checkpoints_superseded"] > 0
    rows = read_metrics(slow.data_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(rounds))
    skipped = [r["round"] for r in rows if r.get("eval_skipped")]
    assert skipped and all(r["metrics"] == {} for r in rows if r.get("eval_skipped"))
    assert "accuracy" in rows[-1] and not rows[-1].get("eval_skipped")
    ckpt = load_checkpoint(slow.data_dir / "checkpoint.msgpack")
    assert ckpt is not None and ckpt.round == rounds
