"""In-process runner: every scenario node is a `Node` in one trio run on a MemoryNetwork.

Same scenario, same per-node configuration (`Scenario.node_config_values`), same report
as the process runner; only the transport differs. This is how 50-100 nodes fit on a
laptop: no TLS, no sockets, one interpreter. Nodes train inline (no worker threads) and
serve no control socket; the runner reads `node.history` and `node.done` directly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.logs import NODE_NAME, TextFormatter
from p2pfl.scenario.processes import node_rows
from p2pfl.scenario.report import RoundProgress
from p2pfl.scenario.schema import RunFailed, Scenario, node_identity_seed

if TYPE_CHECKING:
    from p2pfl.node import Node

POLL_INTERVAL = 0.2


def run_in_process(
    scenario: Scenario,
    out: Path,
    *,
    progress: RoundProgress | None = None,
    timeout: float | None = None,
) -> tuple[dict[str, dict[str, Any]], float]:
    """Run the scenario in this process; return (node records, wall seconds).

    Node logs go to `<out>/nodes.log` rather than the terminal (a hundred nodes would
    drown the progress bar).
    """
    out.mkdir(parents=True, exist_ok=True)
    deadline = timeout if timeout is not None else scenario.deadline_seconds()
    started = time.monotonic()
    with _log_to(out / "nodes.log"):
        try:
            records = trio.run(_run, scenario, out, progress, deadline)
        except BaseExceptionGroup as group:
            leaf = _first_meaningful(group)
            if leaf is group:
                raise
            raise leaf from leaf.__cause__
    return records, time.monotonic() - started


def _first_meaningful(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Ctrl-C first, then the first RunFailed; otherwise the group itself."""
    for kind in (KeyboardInterrupt, RunFailed):
        match, _ = group.split(kind)
        if match is not None:
            leaf: BaseException = match
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
    return group


def build_nodes(scenario: Scenario, out: Path) -> list[Node]:
    """The scenario's nodes on one fresh MemoryNetwork (addresses `mem:n<i>`)."""
    from p2pfl.identity import Identity
    from p2pfl.node import Node
    from p2pfl.scenario.faults import in_process_problem, write_fault_plans
    from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

    problem = in_process_problem(scenario.faults)
    if problem is not None:
        raise RunFailed(problem)
    # Direct connections: no channel and no writer task per link (docs/scenarios.md, "Scale").
    network = MemoryNetwork(direct=True)
    addresses = [f"mem:n{i}" for i in range(scenario.nodes)]
    dirs = [out / "nodes" / f"n{i}" for i in range(scenario.nodes)]
    if scenario.faults:
        ids = [
            Identity.from_seed(node_identity_seed(scenario.seed, i)).peer_id
            for i in range(scenario.nodes)
        ]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_fault_plans(scenario.faults, dirs, ids)
    nodes = []
    for i, values in enumerate(scenario.node_config_values(addresses, dirs)):
        config = NodeConfig(**values).validated()
        ident = Identity.from_seed(node_identity_seed(scenario.seed, i))
        transport = MemoryTransport(network, ident, addresses[i])
        try:
            node = Node(
                config,
                identity=ident,
                transport=transport,
                train_in_thread=False,
                control_socket=False,
            )
        except ConfigError as exc:  # a bad data file or plugin: one line, like `p2pfl node`
            raise RunFailed(f"node n{i}: {exc}") from None
        node.datadir.durable = False  # one process: no node crashes alone (no fsyncs)
        nodes.append(node)
    return nodes


async def _run(
    scenario: Scenario, out: Path, progress: RoundProgress | None, deadline: float
) -> dict[str, dict[str, Any]]:
    nodes = build_nodes(scenario, out)
    records: dict[str, dict[str, Any]] = {}
    async with trio.open_nursery() as nursery:
        for i, node in enumerate(nodes):
            # One at a time, each listening before the next dials: a node finds its
            # lower neighbours listening and its higher ones not yet, so each pair gets one
            # connection, not two of which one is retired (2000 at 1000 nodes).
            await nursery.start(_guard, f"n{i}", node)
        with trio.move_on_after(deadline) as scope:
            await _watch(nodes, progress)
        records = {f"n{i}": _record(node) for i, node in enumerate(nodes)}
        nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        behind = ", ".join(
            f"{name}={len(rec['rounds'])}"
            for name, rec in records.items()
            if len(rec["rounds"]) < scenario.rounds
        )
        raise RunFailed(
            f"timed out after {deadline:.0f} s with nodes still running "
            f"(rounds completed: {behind}); see {out}/nodes.log"
        )
    return records


async def _guard(
    name: str, node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one node; name it if it crashes, and treat an early return as a failure."""
    NODE_NAME.set(name)  # its log lines say which node (this task's context only)
    try:
        await node.run(task_status=task_status)
    except Exception as exc:
        raise RunFailed(f"node {name} crashed: {type(exc).__name__}: {exc}") from exc
    if not node.done.is_set():
        raise RunFailed(f"node {name} stopped before finishing its rounds")


async def _watch(nodes: Sequence[Node], progress: RoundProgress | None) -> None:
    while not all(node.done.is_set() for node in nodes):
        if progress is not None:
            _feed(nodes, progress)
        await trio.sleep(POLL_INTERVAL)
    if progress is not None:
        _feed(nodes, progress)


def _feed(nodes: Sequence[Node], progress: RoundProgress) -> None:
    # Rows recorded, by round number: a node keeps only its last rows in memory.
    completed = [node.history[-1]["round"] + 1 if node.history else 0 for node in nodes]
    latest = [n.history[-1] for n in nodes if n.history and n.role == "honest"]
    progress.update(min(completed), latest)


def _record(node: Node) -> dict[str, Any]:
    rec: dict[str, Any] = {"peer_id": node.id, "rounds": node_rows(node.data_dir, node.history)}
    if node.secure is not None:
        rec["secure"] = node.secure.status()
    return rec


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    logger = logging.getLogger("p2pfl")
    handler = logging.FileHandler(path)
    handler.setFormatter(TextFormatter())  # the node's own text format (p2pfl.logs)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
