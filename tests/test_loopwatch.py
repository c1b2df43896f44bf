"""The event-loop watch names the task that kept the loop from everyone else."""

from __future__ import annotations

import logging

import pytest
import trio

from p2pfl.node.loopwatch import LoopWatch


class StepClock:
    """Real time is not asserted in tests: this clock moves only when a task says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_long_task_step_is_counted_named_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = StepClock()
    watch = LoopWatch(slow_s=0.1, warn_s=1.0, clock=clock)

    async def hog() -> None:
        clock.now += 1.5  # one step "computes" for 1.5 s without yielding

    async def polite() -> None:
        for _ in range(3):
            clock.now += 0.01
            await trio.sleep(0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(polite)
            nursery.start_soon(hog, name="decode-update")

    with caplog.at_level(logging.WARNING, logger="p2pfl.node.loopwatch"):
        trio.run(main, instruments=[watch])
    status = watch.status()
    assert status["max_step_ms"] == 1500.0
    assert status["steps_over_100ms"] == 1
    assert status["recent_stalls"] == [{"ms": 1500.0, "task": "decode-update"}]
    assert status["task_steps"] > 4
    assert any("blocked 1.50 s by task decode-update" in r.getMessage() for r in caplog.records)


def test_short_steps_are_not_stalls() -> None:
    clock = StepClock()
    watch = LoopWatch(clock=clock)

    async def main() -> None:
        for _ in range(5):
            clock.now += 0.05
            await trio.sleep(0)

    trio.run(main, instruments=[watch])
    assert watch.status()["steps_over_100ms"] == 0
    assert watch.status()["recent_stalls"] == []
    assert watch.status()["max_step_ms"] == 50.0


def test_added_from_inside_a_running_task_it_does_not_time_the_step_it_missed() -> None:
    """A node adds the watch from its own task: that step's start was never seen."""
    clock = StepClock()
    clock.now = 10_000.0
    watch = LoopWatch(clock=clock)

    async def main() -> None:
        trio.lowlevel.add_instrument(watch)
        await trio.sleep(0)
        clock.now += 0.01
        await trio.sleep(0)
        trio.lowlevel.remove_instrument(watch)

    trio.run(main)
    assert watch.status()["steps_over_100ms"] == 0
    assert watch.status()["max_step_ms"] < 100
