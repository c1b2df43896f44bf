"""The supervision boundary: per-peer and per-message failures never end the daemon."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.node import Node
from p2pfl.supervision import Supervisor
from p2pfl.transport.memory import MemoryNetwork


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_guard_contains_and_counts_by_place_and_type(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    sup = Supervisor(logging.getLogger("test.sup"), clock, log_every=10.0)
    with caplog.at_level(logging.WARNING, logger="test.sup"):
        for _ in range(3):
            with sup.guard("message:peers", "peerA" * 7):
                raise ValueError("bad address 'nonsense'")
        clock.now = 11.0
        with sup.guard("message:peers"):
            raise ValueError("again")
        with sup.guard("dial"):
            raise KeyError("x")
    assert sup.contained == {"message:peers:ValueError": 4, "dial:KeyError": 1}
    assert sup.total == 5
    # One line per kind per interval: 3 failures at t=0 log once, t=11 logs again.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "bad address 'nonsense'" in lines[0] and "keeps running" in lines[0]


def test_guard_contains_errors_inside_groups_but_lets_cancellation_through() -> None:
    sup = Supervisor(logging.getLogger("test.sup"), _Clock())
    with sup.guard("connection"):
        raise ExceptionGroup("many", [ValueError("a"), ExceptionGroup("inner", [OSError()])])
    assert sup.contained == {"connection:ValueError": 1, "connection:OSError": 1}

    with pytest.raises(KeyboardInterrupt), sup.guard("x"):
        raise KeyboardInterrupt
    # A group of a contained error and a non-Exception keeps the latter only.
    with pytest.raises(BaseExceptionGroup) as info, sup.guard("y"):
        raise BaseExceptionGroup("mixed", [ValueError("v"), KeyboardInterrupt()])
    assert [type(e) for e in info.value.exceptions] == [KeyboardInterrupt]
    assert sup.contained["y:ValueError"] == 1


async def test_guard_does_not_swallow_trio_cancellation() -> None:
    sup = Supervisor(logging.getLogger("test.sup"), trio.current_time)
    reached_after = False
    with trio.CancelScope() as scope:
        scope.cancel()
        with sup.guard("x"):
            await trio.sleep(1)
        reached_after = True  # pragma: no cover - cancellation must skip this
    assert not reached_after
    assert sup.total == 0


async def test_a_failing_message_handler_drops_the_message_not_the_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A bug reachable by a peer's message (here: the round machine raising on an
    update) costs that message; the node goes on and finishes its rounds."""
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=3, round_timeout=5.0)
    victim = nodes[0]
    real = victim.machine.receive_update
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom from a peer's update")
        return real(*args, **kwargs)

    victim.machine.receive_update = flaky  # type: ignore[method-assign]
    await run_until_done(nodes)
    assert all(len(n.history) == 3 for n in nodes)
    contained = victim.status()["counters"]["contained_errors"]
    assert contained == {"message:model:RuntimeError": 1}


async def test_a_dial_that_raises_is_contained_and_backed_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Reproduction 1 of issue 12 at the dial: a peer-supplied address that the
    transport cannot parse raised ValueError out of the node's nursery."""
    nodes = make_nodes(tmp_path, 2, MemoryNetwork(), rounds=3, round_timeout=5.0)
    victim = nodes[0]
    inner_connect = victim.transport.connect

    async def connect(address: str, expected: str | None = None) -> Any:
        if address == "127.0.0.1:99999":
            raise ValueError(f"bad address {address!r}: port must be a number in 0..65535")
        return await inner_connect(address, expected)

    victim.transport.connect = connect  # type: ignore[method-assign]
    victim.peers.add_address("127.0.0.1:99999", peer_id=None, found_via="peer-exchange")
    await run_until_done(nodes)
    assert all(len(n.history) == 3 for n in nodes)
    contained = victim.supervisor.contained
    assert contained["dial:ValueError"] >= 1
    # Backed off like any failed dial, not retried in a tight loop.
    assert contained["dial:ValueError"] <= 5, contained


async def test_training_that_raises_keeps_the_round_going(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A model whose fit() raises must not stall the federation: the node sends the
    model it started from (as after divergence) and the round completes."""
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=3, round_timeout=5.0)
    victim: Node = nodes[1]
    real_fit = victim.model.fit
    calls = {"n": 0}

    def fit(*args: Any, **kwargs: Any) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("user model failed")
        return real_fit(*args, **kwargs)

    victim.model.fit = fit  # type: ignore[method-assign]
    await run_until_done(nodes)
    assert all(len(n.history) == 3 for n in nodes)
    assert not any(row["timed_out"] for n in nodes for row in n.history)
    assert victim.supervisor.contained == {"training:FloatingPointError": 1}
    assert all(np.isfinite(n.machine.params).all() for n in nodes)


def test_fatal_local_conditions_pass_through_the_guard_unwrapped() -> None:
    """A full disk met while handling a peer's message must end the node (exit code 6),
    not be contained as if the peer had caused it."""
    from p2pfl.fatal import DiskFull

    sup = Supervisor(logging.getLogger("test.sup"), _Clock())
    with pytest.raises(DiskFull), sup.guard("message:model"):
        raise DiskFull("no space left writing checkpoint.msgpack")
    with pytest.raises(ExceptionGroup) as info, sup.guard("connection"):
        raise ExceptionGroup("both", [DiskFull("full"), ValueError("peer garbage")])
    assert [type(e) for e in info.value.exceptions] == [DiskFull]
    assert sup.contained == {"connection:ValueError": 1}
