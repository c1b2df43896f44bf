"""A node that owns its process hands freed heap pages back to the OS now and then."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import trio
from test_node_inmemory import make_nodes
from test_rounds_deferred import threaded_nodes

from p2pfl.node import heap
from p2pfl.transport.memory import MemoryNetwork


async def test_a_process_node_trims_its_heap_periodically_a_simulated_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(heap, "TRIM_EVERY", 0.05)
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append("trim") or True)
    for nodes, expected_min in (
        # Simulated nodes share a process (the test's, or a scenario's): not theirs to trim.
        (make_nodes(tmp_path / "sim", 2, MemoryNetwork(), rounds=0), 0),
        # Two nodes that own their loop, about ten periods each.
        (threaded_nodes(tmp_path / "real", 2, rounds=0), 4),
    ):
        calls.clear()
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            # Wait for the calls rather than a fixed time (a loaded machine is slow);
            # the simulated nodes get as long as the real ones needed, or 0.5 s.
            with trio.move_on_after(10 if expected_min else 0.5):
                while len(calls) < max(expected_min, 1):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert len(calls) >= expected_min if expected_min else calls == []


class _Cycle:
    """Garbage that only the cyclic collector frees, like a closed `trio.SSLStream`
    (its handshake `_Once` holds the stream's own bound method)."""

    def __init__(self) -> None:
        self.me = self


async def test_a_process_node_collects_cyclic_garbage_that_python_would_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node's steady state frees about as many objects as it makes, so Python's own
    # collections are rare; disabled here, the node's periodic collection must do it.
    monkeypatch.setattr(heap, "TRIM_EVERY", 0.05)
    monkeypatch.setattr(heap, "trim_heap", lambda: True)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        garbage = _Cycle()
        gone = weakref.ref(garbage)
        del garbage
        assert gone() is not None  # refcounting alone does not free a cycle
        async with trio.open_nursery() as nursery:
            for node in threaded_nodes(tmp_path, 2, rounds=0):
                await nursery.start(node.run)
            with trio.move_on_after(10):
                while gone() is not None:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert gone() is None
    finally:
        if was_enabled:
            gc.enable()
