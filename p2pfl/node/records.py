"""The queue of a node's records (evaluations, metrics lines, checkpoints), kept bounded.

A real node writes its records in a worker thread, in order, one per round. When that
worker is slower than the rounds (many nodes on few cores, a slow disk, a large model),
an unbounded queue grows for as long as the node runs, each item holding a copy of the
model: the soak saw RSS climb about 11 MiB an hour. So the queue coalesces instead of
growing (sans-IO; the learner drives it):

- a checkpoint supersedes any older one still queued: only the newest state matters
  for a restart, and it is what would be written next anyway;
- at most `max_evaluations` queued rounds keep their model for evaluation; an older one
  is still written as a metrics line (round, peers, bytes, timing) but without metrics
  and with `"eval_skipped": true`, so no round disappears from `metrics.jsonl` and the
  newest rounds (the ones people look at) are still evaluated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfl.storage import Checkpoint

MAX_EVALUATIONS = 4


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Evaluate an aggregate (unless `params` is None: skipped) and write its metrics line."""

    params: np.ndarray | None
    row: dict[str, Any]
    connected: int


@dataclass(frozen=True, slots=True)
class Save:
    """Write a checkpoint snapshot (its history is taken when it is written)."""

    checkpoint: Checkpoint


@dataclass(frozen=True, slots=True)
class Done:
    """The last round's records are written: the run is done."""


RecordItem = Evaluate | Save | Done


class RecordQueue:
    """FIFO of records that drops superseded checkpoints and skips old evaluations."""

    def __init__(self, max_evaluations: int = MAX_EVALUATIONS) -> None:
        if max_evaluations < 1:
            raise ValueError("max_evaluations must be >= 1")
        self.max_evaluations = max_evaluations
        self._items: deque[RecordItem] = deque()
        self.checkpoints_superseded = 0
        self.evaluations_skipped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: RecordItem) -> None:
        if isinstance(item, Save):
            kept = [i for i in self._items if not isinstance(i, Save)]
            self.checkpoints_superseded += len(self._items) - len(kept)
            self._items = deque(kept)
        self._items.append(item)
        if isinstance(item, Evaluate) and item.params is not None:
            self._skip_old_evaluations()

    def get(self) -> RecordItem | None:
        """The oldest record, or None when the queue is empty."""
        return self._items.popleft() if self._items else None

    def held_models(self) -> int:
        """Model copies the queue keeps alive (at most `max_evaluations` + 1)."""
        return sum(
            1
            for i in self._items
            if isinstance(i, Save) or (isinstance(i, Evaluate) and i.params is not None)
        )

    def _skip_old_evaluations(self) -> None:
        pending = [
            n for n, i in enumerate(self._items) if isinstance(i, Evaluate) and i.params is not None
        ]
        for n in pending[: max(0, len(pending) - self.max_evaluations)]:
            old = self._items[n]
            assert isinstance(old, Evaluate)
            self._items[n] = Evaluate(None, old.row, old.connected)
            self.evaluations_skipped += 1
