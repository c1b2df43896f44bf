"""How long the event loop was kept from running other tasks, and by which task.

Every heartbeat, status reply and frame of a node shares one trio thread; a task step
that computes for a second (decoding a large update, aggregating) delays all of them.
This instrument times each task step so `p2pfl status` can show the loop's worst stall
and a log line can name the task behind a long one, instead of leaving an operator to
guess why pings were late.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

SLOW_STEP_S = 0.1  # a step this long counts as a stall
WARN_STEP_S = 1.0  # a step this long gets a log line
KEPT = 8  # the slowest recent stalls shown in status


class LoopWatch(trio.abc.Instrument):
    """Times task steps on the trio thread (two clock reads per step)."""

    def __init__(
        self,
        *,
        slow_s: float = SLOW_STEP_S,
        warn_s: float = WARN_STEP_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.clock = clock
        self.slow_s = slow_s
        self.warn_s = warn_s
        self.steps = 0
        self.slow_steps = 0
        self.max_step_s = 0.0
        self.recent: deque[tuple[float, str]] = deque(maxlen=KEPT)
        # None outside a timed step: the step that adds us never saw before_task_step.
        self._started: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = self.clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        took = self.clock() - self._started
        self._started = None
        self.steps += 1
        if took > self.max_step_s:
            self.max_step_s = took
        if took >= self.slow_s:
            self.slow_steps += 1
            self.recent.append((took, task.name))
            if took >= self.warn_s:
                log.warning("event loop blocked %.2f s by task %s", took, task.name)

    def status(self) -> dict[str, Any]:
        return {
            "task_steps": self.steps,
            "max_step_ms": round(self.max_step_s * 1e3, 1),
            f"steps_over_{int(self.slow_s * 1e3)}ms": self.slow_steps,
            "recent_stalls": [
                {"ms": round(took * 1e3, 1), "task": name} for took, name in self.recent
            ],
        }
