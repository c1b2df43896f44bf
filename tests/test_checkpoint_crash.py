"""Crashes: a node killed mid-round resumes from its checkpoint; a checkpoint write
interrupted at any point leaves the previous checkpoint loadable."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import CHECKPOINT_FILE, Node
from p2pfl.protocol import Phase
from p2pfl.storage import Checkpoint, atomic_write, load_checkpoint, save_checkpoint
from p2pfl.transport.faults import FaultPlan, FaultRule, FaultyTransport, dump_fault_plan
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

# ---- a node killed mid-round ----------------------------------------------------------


def build(tmp: Path, i: int, n: int, network: MemoryNetwork, **overrides: object) -> Node:
    """Node i of n on a full mesh; every link has 0.5 s latency so rounds take mock time."""
    plan = tmp / "latency.json"
    dump_fault_plan(FaultPlan((FaultRule("delay", delay=0.5),)), plan)
    cfg = NodeConfig(
        data_dir=tmp / f"n{i}",
        listen=f"mem:n{i}",
        peers=tuple(f"mem:n{j}" for j in range(n) if j != i),
        nodes=n,
        node_index=i,
        min_peers=n - 1,
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
        round_timeout=4.0,
        seed=100 + i,
        faults=plan,
        **overrides,  # type: ignore[arg-type]
    ).validated()
    ident = Identity.from_seed(bytes([i + 1]) * 32)
    return Node(
        cfg,
        identity=ident,
        transport=MemoryTransport(network, ident, f"mem:n{i}"),
        train_in_thread=False,
        control_socket=False,
    )


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await trio.sleep(0.05)


async def crash_and_restart(tmp_path: Path) -> tuple[list[Node], Node, np.ndarray, list[object]]:
    """3 nodes; node 2 is killed mid-round 3 and restarted once the others reach round 5.

    Returns (the first nodes, the restarted node, its model at the crash, its history).
    """
    network = MemoryNetwork()
    nodes = [build(tmp_path, i, 3, network, rounds=ROUNDS) for i in range(3)]
    victim = nodes[2]
    async with trio.open_nursery() as nursery:
        for node in nodes[:2]:
            await nursery.start(node.run)
        victim_scope = trio.CancelScope()

        async def run_victim(task_status: trio.TaskStatus[None]) -> None:
            with victim_scope:
                await victim.run(task_status=task_status)

        await nursery.start(run_victim)

        # Kill it while it waits for its neighbours' round-3 models: no goodbye, the
        # "OS" closes its connections (the peers see EOF, as after SIGKILL).
        await until(lambda: victim.machine.round == CRASH and victim.phase is Phase.COLLECTING)
        at_crash = victim.machine.params.copy()
        history: list[object] = list(victim.history)
        assert isinstance(victim.transport, FaultyTransport)
        victim.transport.crash()
        victim_scope.cancel()

        ckpt = load_checkpoint(tmp_path / "n2" / CHECKPOINT_FILE)
        assert ckpt is not None and ckpt.round == CRASH
        np.testing.assert_array_equal(ckpt.params, at_crash)

        # The others carry on without it; restart it two rounds later.
        await until(lambda: nodes[0].machine.round >= CRASH + 2)
        assert nodes[0].counters["timeouts"] == 0  # they noticed the EOF, not a timeout
        again = build(tmp_path, 2, 3, network, rounds=ROUNDS)
        assert again.machine.round == CRASH  # resumed at the checkpointed round...
        np.testing.assert_array_equal(again.machine.params, at_crash)  # ...same model
        assert again.history == history
        await nursery.start(again.run)
        for node in [*nodes[:2], again]:
            await node.done.wait()
        nursery.cancel_scope.cancel()
    return nodes[:2], again, at_crash, history


ROUNDS, CRASH = 10, 3


async def test_killed_mid_round_resumes_at_checkpoint_and_catches_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    first, again, _, _ = await crash_and_restart(tmp_path)
    assert again.counters["catch_ups"] >= 1
    done = [row["round"] for row in again.history]
    assert done[:CRASH] == list(range(CRASH))
    assert done == sorted(set(done)) and done[-1] == ROUNDS - 1
    finals = np.stack([first[0].machine.params, first[1].machine.params, again.machine.params])
    assert np.array_equal(finals[0], finals[1]) and np.array_equal(finals[0], finals[2])
    assert again.history[-1]["peers_heard"] == 2
    assert again.history[-1]["accuracy"] >= 0.9


async def test_a_restarted_node_rejoins_without_costing_anyone_a_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    first, again, _, _ = await crash_and_restart(tmp_path)
    assert again.counters["timeouts"] == 0
    assert all(n.counters["timeouts"] == 0 for n in first)


# ---- interrupted checkpoint writes ----------------------------------------------------


def ckpt(round: int) -> Checkpoint:
    rng = np.random.default_rng(round)
    return Checkpoint(
        round,
        rng.standard_normal(1000).astype(np.float32),
        {"m": rng.standard_normal(10).astype(np.float32)},
        [{"round": r, "accuracy": 0.5} for r in range(round)],
        "softmax",
    )


class Killed(BaseException):
    """The process dies here (BaseException: nothing may catch and carry on)."""


def same(a: Checkpoint | None, b: Checkpoint) -> bool:
    return (
        a is not None
        and a.round == b.round
        and np.array_equal(a.params, b.params)
        and a.optimizer.keys() == b.optimizer.keys()
        and all(np.array_equal(a.optimizer[k], b.optimizer[k]) for k in b.optimizer)
        and a.history == b.history
    )


@pytest.mark.parametrize(
    "where",
    ["open", "first-write", "mid-write", "fsync", "close", "replace", "dir-open", "dir-fsync"],
)
def test_write_killed_at_any_step_leaves_a_loadable_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = tmp_path / CHECKPOINT_FILE
    old, new = ckpt(4), ckpt(5)
    save_checkpoint(path, old)

    real = {name: getattr(os, name) for name in ("open", "write", "fsync", "close", "replace")}
    calls: dict[str, int] = {}

    def step(name: str) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls[name] = calls.get(name, 0) + 1
            n = calls[name]
            kill = {
                "open": name == "open" and n == 1,
                "first-write": name == "write" and n == 1,
                "mid-write": name == "write" and n == 2,
                "fsync": name == "fsync" and n == 1,
                "close": name == "close" and n == 1,
                "replace": name == "replace",
                "dir-open": name == "open" and n == 2,
                "dir-fsync": name == "fsync" and n == 2,
            }[where]
            if kill:
                raise Killed(where)
            if name == "write" and n == 1:  # a short write: the loop must continue it
                fd, data = args
                return real["write"](fd, memoryview(data)[: len(data) // 2])  # type: ignore[arg-type]
            return real[name](*args, **kwargs)

        return wrapper

    for name in real:
        monkeypatch.setattr(os, name, step(name))
    with pytest.raises(Killed):
        save_checkpoint(path, new)
    monkeypatch.undo()

    got = load_checkpoint(path)
    renamed = where in ("dir-open", "dir-fsync")  # killed after the atomic rename
    assert same(got, new if renamed else old), where
    # The next write succeeds over whatever temporary file the kill left behind.
    save_checkpoint(path, ckpt(6))
    assert same(load_checkpoint(path), ckpt(6))


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from p2pfl.storage import Checkpoint, save_checkpoint
    path = Path(sys.argv[1])
    params = np.arange(200_000, dtype=np.float32)
    r = 0
    while True:
        r += 1
        save_checkpoint(path, Checkpoint(r, params + r, {}, [], "softmax"))
        print(r, flush=True)
    """
)


def test_sigkill_of_a_process_writing_checkpoints_in_a_loop(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        for _ in range(5 + 7 * attempt):  # let it get well into its loop
            proc.stdout.readline()
        time.sleep(0.003 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        got = load_checkpoint(path)
        assert got is not None and got.round >= 5
        np.testing.assert_array_equal(got.params, np.arange(200_000, dtype=np.float32) + got.round)


def test_atomic_write_never_exposes_a_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever reads the path during a write sees the old bytes or the new, never a mix."""
    path = tmp_path / "f"
    atomic_write(path, b"old" * 1000)
    seen: list[bytes] = []
    real_write = os.write

    def spying_write(fd: int, data: object) -> int:
        seen.append(path.read_bytes())
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", spying_write)
    atomic_write(path, b"new" * 1000)
    assert seen and all(s == b"old" * 1000 for s in seen)
    assert path.read_bytes() == b"new" * 1000


async def test_a_restarted_node_catches_up_from_several_peers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfl.node")
    await crash_and_restart(tmp_path)
    caught = [r.getMessage() for r in caplog.records if "caught up from" in r.getMessage()]
    assert caught
    assert all("median of 1 peers" not in m for m in caught), caught
