"""Ray runner: every scenario node is a real p2pfl node in its own Ray actor process.

`p2pfl scenario run FILE --ray [ADDRESS]` (extra `p2pfl[ray]`). The point is more
machines, not a different federation: each actor runs the ordinary `Node` under trio
(in a thread the actor owns, so the actor stays free to answer `poll()`), listens on
its host's address and talks TCP + mutual TLS to the others exactly as on devices.
Model traffic never goes through Ray; only small things do: where each actor runs,
its node's status (the control socket's answer, read by the actor on its own host),
its metrics rows at the end, start/stop orders, and the log and records of a node on
another machine, copied into `<out>/nodes/n<i>` at the end (no filesystem is shared
between machines; see `_data_dir` and `_collect`), after which a successful run deletes
that node's data dir on its machine (`_remove_remote`; `[ray] keep_remote` keeps it).
The nodes' ports come from `[ray] ports` when set, so a firewall can name them.

What is shared with the process runner (processes.py): the per-node configuration
(`Scenario.node_config_values`), fault plans, the crash/restart schedule
(`CrashSchedule`), how rows are read (`node_rows`), the "done" rule and the report.
What differs, and why:

* a crash is `ray.kill` of the actor, i.e. SIGKILL of the process the node lives in
  (no goodbye, no flush), and a restart is a new actor pinned to the same Ray node
  (`NodeAffinitySchedulingStrategy`), on the same data dir, so it resumes from its
  checkpoint. The data dir must therefore be on that host: see `_data_dir`.
* nothing outlives the run: every actor is `ray.kill`ed in one `finally` (success,
  failure, Ctrl-C, SIGTERM), and the actors are owned by the runner, so Ray itself
  kills them if the runner dies. A Ray started by the runner is shut down too.

Ray is imported only here, and only when a run starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.scenario.faults import CrashDriver, FaultEvent
from p2pfl.scenario.processes import (
    POLL_INTERVAL,
    QUERY_TIMEOUT,
    STOP_GRACE,
    _signals_raise,
)
from p2pfl.scenario.ray_host import NODE_START_TIMEOUT, NodeHost
from p2pfl.scenario.report import RoundProgress
from p2pfl.scenario.schema import RunFailed, Scenario

NAMESPACE = "p2pfl"
ACTOR_PREFIX = "p2pfl-scenario"
START_TIMEOUT = 120.0  # actors waiting for resources, a worker process starting
COLLECT_TIMEOUT = 30.0  # per batch of COLLECT_BATCH nodes
COLLECT_BATCH = 32


@dataclass
class _Node:
    name: str
    index: int
    actor: Any
    node_id: str
    ip: str
    data_dir: Path
    values: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    status: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    incarnation: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the actor's Ray options
    files: dict[str, bytes] = field(default_factory=dict)  # ray_host.COLLECTED_FILES, if remote
    collected: bool = False  # its files reached `<out>/nodes/<name>` (a remote node's)
    extra: dict[str, Any] = field(default_factory=dict)


def run_ray(
    scenario: Scenario,
    out: Path,
    *,
    address: str | None = None,
    progress: RoundProgress | None = None,
    timeout: float | None = None,
    grace: float = STOP_GRACE,
    on_poll: Any = None,
) -> tuple[dict[str, dict[str, Any]], float]:
    """Run the scenario with one Ray actor per node; return (node records, wall seconds).

    `address`: None or "" starts a local Ray (shut down at the end); otherwise it is
    given to `ray.init` ("auto", "HOST:6379", "ray://HOST:10001"). If this process is
    already connected to Ray (a test, a notebook), that Ray is used and left running.
    `on_poll` (tests) is called with the node list after every poll.

    Raises RunFailed (a node died, the deadline passed, the cluster is too small) or
    KeyboardInterrupt (Ctrl-C/SIGTERM); in every case no actor of this run is left.
    """
    import ray

    out.mkdir(parents=True, exist_ok=True)
    deadline_s = timeout if timeout is not None else scenario.deadline_seconds()
    started_ray = False
    nodes: list[_Node] = []
    killed: list[Any] = []  # every actor handle ever created: all are killed at the end
    started = time.monotonic()
    with _signals_raise():
        try:
            if not ray.is_initialized():
                started_ray = True
                _init_ray(ray, scenario, address)
            else:
                _check_fits(ray, scenario)
            run_id = f"{out.name}-{os.getpid()}"
            _place(ray, scenario, out, run_id, nodes, killed)
            chaos = _RayChaos(ray, scenario.faults, nodes, run_id, killed, started, out)
            try:
                _start_all(ray, scenario, nodes)
                _watch(
                    ray, nodes, scenario, started + deadline_s, deadline_s, progress, chaos, on_poll
                )
            except RunFailed as exc:
                with contextlib.suppress(Exception):  # the others' logs tell what went wrong
                    _collect(ray, nodes, out, chaos)
                raise RunFailed(f"{exc}{_kept_note(nodes, out)}") from None
            _stop_all(ray, nodes, chaos, grace)
            _collect(ray, nodes, out, chaos)
            if not scenario.ray.keep_remote:
                _remove_remote(ray, nodes, out, chaos)
        finally:
            for actor in killed:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if started_ray:
                with contextlib.suppress(Exception):
                    ray.shutdown()
    wall = time.monotonic() - started
    return {n.name: _record(n) for n in nodes}, wall


def _init_ray(ray: Any, scenario: Scenario, address: str | None) -> None:
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        _check_fits(ray, scenario)
        return
    # A local Ray is this machine: sized so that every node fits, as the process runner
    # starts every node whatever the core count (Ray would otherwise leave the rest
    # pending for ever).
    need = math.ceil(scenario.nodes * scenario.ray.num_cpus)
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, need),
        include_dashboard=False,
        log_to_driver=False,
    )


def _check_fits(ray: Any, scenario: Scenario) -> None:
    """Refuse before starting anything a scenario the cluster cannot place at once:
    Ray would start some nodes and leave the others pending until the deadline."""
    total = ray.cluster_resources()
    cpus = scenario.nodes * scenario.ray.num_cpus
    if cpus > total.get("CPU", 0.0) + 1e-9:
        raise RunFailed(
            f"{scenario.nodes} nodes x [ray] num_cpus = {scenario.ray.num_cpus:g} need "
            f"{cpus:g} CPUs; the Ray cluster has {total.get('CPU', 0.0):g} "
            "(lower [ray] num_cpus or add machines)"
        )
    if scenario.ray.memory is not None:
        mem = scenario.nodes * scenario.ray.memory
        if mem > total.get("memory", 0.0):
            raise RunFailed(
                f"{scenario.nodes} nodes x [ray] memory = {scenario.ray.memory} bytes need "
                f"{mem} bytes; the Ray cluster offers {int(total.get('memory', 0))}"
            )


def _actor_options(scenario: Scenario, name: str) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "num_cpus": scenario.ray.num_cpus,
        "max_restarts": 0,  # restarts are the scenario's faults, never Ray's own
        "max_concurrency": 1,
    }
    if scenario.ray.memory is not None:
        opts["memory"] = scenario.ray.memory
    return opts


def _place(
    ray: Any, scenario: Scenario, out: Path, run_id: str, nodes: list[_Node], killed: list[Any]
) -> None:
    """Create the actors (spread over the cluster), learn where each one is, and choose
    every node's address and data dir."""
    host_cls = ray.remote(NodeHost)
    actors, options = [], []
    for i in range(scenario.nodes):
        opts = _actor_options(scenario, f"{ACTOR_PREFIX}-{run_id}-n{i}")
        actor = host_cls.options(**opts, scheduling_strategy="SPREAD").remote()
        killed.append(actor)
        actors.append(actor)
        options.append(opts)
    places = _get(ray, [a.where.remote() for a in actors], START_TIMEOUT, "placing the nodes")
    here = _driver_node_id(ray)
    # One machine: loopback, as the process runner does (nothing exposed). Several: each
    # node listens on its host's address, which the others must be able to reach.
    single = len({p["node_id"] for p in places}) == 1 and places[0]["node_id"] == here
    if scenario.discovery == "mdns" and not single:
        raise RunFailed(
            "discovery = 'mdns' runs on 127.0.0.1 only, and these nodes are on several "
            "machines: use discovery = 'bootstrap' on a Ray cluster"
        )
    for i, (actor, place) in enumerate(zip(actors, places, strict=True)):
        nodes.append(
            _Node(
                f"n{i}",
                i,
                actor,
                place["node_id"],
                "127.0.0.1" if single else place["ip"],
                _data_dir(out, run_id, i, place, here),
                pid=place["pid"],
                options=options[i],
            )
        )
    # Ports are chosen per address by one of its actors, all at once: actors choosing
    # their own would each release theirs at once and could be handed the same one.
    # Per address, not per Ray node: two Ray nodes of one machine share its ports, and
    # a `[ray] ports` range is tried lowest first, so they would pick the same ones.
    by_host: dict[str, list[_Node]] = {}
    for n in nodes:
        by_host.setdefault(n.ip, []).append(n)
    groups = list(by_host.values())
    port_range = scenario.ray.ports
    chosen = _get(
        ray,
        [g[0].actor.free_ports.remote(g[0].ip, len(g), port_range) for g in groups],
        START_TIMEOUT,
        "choosing ports",
    )
    for group, got in zip(groups, chosen, strict=True):
        if len(got) < len(group):
            assert port_range is not None  # without a range the kernel always finds one
            low, high = port_range
            raise RunFailed(
                f'host {group[0].ip}: [ray] ports = "{low}-{high}" has {len(got)} free '
                f"ports there, and the {len(group)} nodes Ray placed on that host need "
                f"{len(group)} (widen the range, or free its ports on that host)"
            )
    port_of = {n.index: port for g, ports in zip(groups, chosen, strict=True)
               for n, port in zip(g, ports, strict=True)}  # fmt: skip
    addresses = [f"{n.ip}:{port_of[n.index]}" for n in nodes]
    values = scenario.node_config_values(addresses, [n.data_dir for n in nodes])
    for n, v in zip(nodes, values, strict=True):
        n.values = v


def _data_dir(out: Path, run_id: str, i: int, place: Mapping[str, Any], here: str | None) -> Path:
    """`<out>/nodes/n<i>` for a node on the runner's machine (as the process runner);
    on another machine, `<its temp dir>/p2pfl-ray/<run>/n<i>`: the output folder need
    not exist there, and a restart lands on the same machine, so it finds it again.
    `_collect` copies its log and records to `<out>/nodes/n<i>` at the end; the dir
    itself (key, checkpoints) stays on that machine, until `_remove_remote` deletes it
    after a successful run (a failed one keeps it for debugging)."""
    if place["node_id"] == here:
        return out / "nodes" / f"n{i}"
    return Path(place["tmp"]) / "p2pfl-ray" / run_id / f"n{i}"


def _driver_node_id(ray: Any) -> str | None:
    try:
        node_id: str = ray.get_runtime_context().get_node_id()
        return node_id
    except Exception:  # a Ray Client driver is on no node of the cluster
        return None


def _start_all(ray: Any, scenario: Scenario, nodes: Sequence[_Node]) -> None:
    if scenario.faults:
        from p2pfl.scenario.faults import fault_plan_nodes, node_fault_plans, plan_path

        ids = _get(
            ray,
            [n.actor.identity.remote(str(n.data_dir)) for n in nodes],
            START_TIMEOUT,
            "creating identities",
        )
        plans = node_fault_plans(scenario.faults, ids)
        _get(
            ray,
            [
                nodes[i].actor.write_plan.remote(plans[i], str(plan_path(nodes[i].data_dir)))
                for i in fault_plan_nodes(scenario.faults, len(nodes))
            ],
            START_TIMEOUT,
            "writing fault plans",
        )
    refs = [n.actor.start.remote(n.values) for n in nodes]
    for n, pid in zip(
        nodes, _get(ray, refs, NODE_START_TIMEOUT + 30, "starting nodes"), strict=True
    ):
        n.pid = pid


def _get(ray: Any, refs: Sequence[Any], timeout: float, what: str) -> list[Any]:
    """ray.get with a deadline and a RunFailed that says what was being done."""
    try:
        result: list[Any] = ray.get(list(refs), timeout=timeout)
        return result
    except ray.exceptions.GetTimeoutError:
        raise RunFailed(
            f"Ray did not answer within {timeout:.0f} s while {what} (is the cluster "
            "out of resources? `ray status` shows pending actors)"
        ) from None
    except ray.exceptions.RayError as exc:
        raise RunFailed(f"{what} failed: {exc}") from None


def _is_done(status: Mapping[str, Any] | None, rounds: int) -> bool:
    """The process runner's rule: phase done, or past the last round with its row."""
    if status is None:
        return False
    phase = status.get("round", {}).get("phase")
    current = status.get("round", {}).get("current", 0)
    history = status.get("history") or []
    return phase == "done" or (
        isinstance(current, int) and current >= rounds and len(history) >= rounds
    )


def _watch(
    ray: Any,
    nodes: list[_Node],
    scenario: Scenario,
    deadline: float,
    deadline_s: float,
    progress: RoundProgress | None,
    chaos: _RayChaos,
    on_poll: Any,
) -> None:
    """Poll every actor until every node is done; raise RunFailed on an unplanned death
    or the deadline. An actor whose last poll has not answered is not asked again (its
    queue would only grow); a node that is slow to answer is simply not news yet."""
    pending: dict[int, tuple[Any, Any]] = {}  # index -> (actor, ref)
    while True:
        for n in nodes:
            if n.index not in pending and not chaos.killed(n.index):
                pending[n.index] = (n.actor, n.actor.poll.remote())
        refs = [ref for _, ref in pending.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=QUERY_TIMEOUT)
        done_refs = set(ready)
        for i, (actor, ref) in list(pending.items()):
            if ref not in done_refs:
                continue
            del pending[i]
            n = nodes[i]
            if actor is not n.actor or chaos.killed(i):
                continue  # an answer from an actor the chaos has since replaced
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise RunFailed(f"node {n.name}'s Ray actor died: {exc}") from None
            if not answer["alive"]:
                raise RunFailed(
                    f"node {n.name} stopped early ({answer.get('error')}); last lines of "
                    f"{n.data_dir}/node.log on {n.ip}:\n{answer.get('log_tail', '')}"
                )
            if answer["status"] is not None:
                n.status = answer["status"]
        completed, latest = [], []
        for n in nodes:
            history = (n.status or {}).get("history") or []
            completed.append(len(history))
            if history and isinstance(history[-1], dict) and scenario.role(n.index) == "honest":
                latest.append(history[-1])
        if progress is not None:
            progress.update(min(completed), latest)
        if on_poll is not None:
            on_poll(nodes)
        chaos.step()
        if all(_is_done(n.status, scenario.rounds) or chaos.excused(n.index) for n in nodes):
            return
        if time.monotonic() > deadline:
            done = {n.name: c for n, c in zip(nodes, completed, strict=True)}
            raise RunFailed.overdue(deadline_s, done, scenario.rounds, "each node's node.log")
        time.sleep(POLL_INTERVAL)


def _stop_all(ray: Any, nodes: Sequence[_Node], chaos: _RayChaos, grace: float) -> None:
    """Stop every running node cleanly, in parallel, and collect its rows through Ray."""
    live = [n for n in nodes if not chaos.killed(n.index)]
    refs = [n.actor.stop.remote(grace) for n in live]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=grace + QUERY_TIMEOUT + 5)
    for n, ref in zip(live, refs, strict=True):
        if ref not in ready:
            continue  # killed in the finally; its rows are the last ones polled
        with contextlib.suppress(ray.exceptions.RayError):
            doc = ray.get(ref)
            n.rows = doc["rows"]
            n.status = doc["status"] or n.status
            n.peak_rss_bytes = doc["peak_rss_bytes"]


def _collect(ray: Any, nodes: Sequence[_Node], out: Path, chaos: _RayChaos) -> None:
    """Copy the logs and records of the nodes on other machines into `<out>/nodes/n<i>`
    through Ray (no shared filesystem), so the output folder has every node's, as with
    processes. Best effort: a node that does not answer within COLLECT_TIMEOUT (dead,
    crashed for good before it could be asked) keeps its files on its host only. Asked
    COLLECT_BATCH at a time, so the runner never holds more than that many nodes' files."""
    remote = _remote(nodes, out)
    for n in remote:
        if n.files:  # fetched before a crash for good
            _write_files(out, n)
            n.files = {}
    ask = [n for n in remote if n.index not in chaos.down]
    for start in range(0, len(ask), COLLECT_BATCH):
        batch = ask[start : start + COLLECT_BATCH]
        refs = [n.actor.files.remote() for n in batch]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=COLLECT_TIMEOUT)[0])
        for n, ref in zip(batch, refs, strict=True):
            if ref in ready:
                with contextlib.suppress(ray.exceptions.RayError):
                    n.files = ray.get(ref)
                    _write_files(out, n)
            n.files = {}


def _write_files(out: Path, n: _Node) -> None:
    here = out / "nodes" / n.name
    here.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in n.files.items():
        (here / name).write_bytes(data)
    n.collected = True


def _remote(nodes: Sequence[_Node], out: Path) -> list[_Node]:
    """The nodes whose data dir is on another machine (never one in the output folder,
    which is where every node on the runner's own machine keeps it)."""
    return [n for n in nodes if not n.data_dir.is_relative_to(out)]


def _remove_remote(ray: Any, nodes: Sequence[_Node], out: Path, chaos: _RayChaos) -> None:
    """After a successful run, delete the data dirs (key, checkpoints, full log) the
    nodes left on other machines, and their run folders: nobody else would, and their
    log and records are in `<out>/nodes/n<i>` by now. Only the dirs whose files were
    copied; each machine deletes its own, asked through a live actor there (a node
    crashed for good has none: a neighbour on its machine does it). Best effort: what
    cannot be deleted stays where `metrics.json` says (`host`, `data_dir`)."""
    by_machine: dict[str, list[_Node]] = {}
    for n in _remote(nodes, out):
        if n.collected:
            by_machine.setdefault(n.node_id, []).append(n)
    live = {n.node_id: n.actor for n in nodes if not chaos.killed(n.index)}
    refs = [
        live[node_id].remove_dirs.remote([str(n.data_dir) for n in group])
        for node_id, group in by_machine.items()
        if node_id in live
    ]
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=COLLECT_TIMEOUT)


def _kept_note(nodes: Sequence[_Node], out: Path) -> str:
    """Where a failed run left the data dirs of its nodes on other machines (kept for
    debugging: key, checkpoints, the full log), one line per machine."""
    where: dict[tuple[str, Path], list[str]] = {}
    for n in _remote(nodes, out):
        where.setdefault((n.ip, n.data_dir.parent), []).append(n.name)
    lines = [
        f"\n  on {ip}: {run_dir}/ ({', '.join(names)})" for (ip, run_dir), names in where.items()
    ]
    return (
        "\nthe data dirs of the nodes on other machines are kept there:" + "".join(lines)
        if lines
        else ""
    )


def _record(n: _Node) -> dict[str, Any]:
    node = (n.status or {}).get("node", {})
    rows = n.rows or [dict(r) for r in (n.status or {}).get("history") or []]
    rec: dict[str, Any] = {
        "peer_id": node.get("id"),
        "pid": n.pid,
        "host": n.ip,
        "listen": n.values.get("listen"),
        "ray_node_id": n.node_id,
        "data_dir": str(n.data_dir),
        "rounds": rows,
    }
    secure = (n.status or {}).get("secure")
    if secure:
        rec["secure"] = secure
    if n.peak_rss_bytes is not None:
        rec["peak_rss_bytes"] = n.peak_rss_bytes
    rec.update(n.extra)
    return rec


class _RayChaos(CrashDriver):
    """`crash` = `ray.kill` of the node's actor (SIGKILL of its process: no goodbye, no
    flush); `restart` = a new actor pinned to the same Ray node, started with the same
    values (address, data dir), so the node resumes from its checkpoint. The schedule
    is the process runner's (`CrashSchedule`), fed with the rounds the actors report."""

    def __init__(
        self,
        ray: Any,
        events: Sequence[FaultEvent],
        nodes: list[_Node],
        run_id: str,
        killed: list[Any],
        started: float,
        out: Path,
    ) -> None:
        super().__init__(events)
        self.ray = ray
        self.nodes = nodes
        self.run_id = run_id
        self.all_actors = killed
        self.started = started
        self.out = out

    def reported_rounds(self) -> dict[int, int | None]:
        return {n.index: _current_round(n) for n in self.nodes if n.index not in self.down}

    def _note(self, n: _Node, event: dict[str, Any]) -> None:
        event["t"] = round(time.monotonic() - self.started, 3)
        n.extra.setdefault("events", []).append(event)

    def _crash(self, i: int, ev: FaultEvent) -> None:
        n = self.nodes[i]
        status = (n.status or {}).get("round", {})
        if i in self.forever:
            # Its rows (and its log, from another machine) stay on its host; fetch them
            # now, the report and the output folder need them later.
            with contextlib.suppress(Exception):
                n.rows = self.ray.get(n.actor.rows.remote(), timeout=QUERY_TIMEOUT)
            if not n.data_dir.is_relative_to(self.out):
                with contextlib.suppress(Exception):
                    n.files = self.ray.get(n.actor.files.remote(), timeout=QUERY_TIMEOUT)
        self.ray.kill(n.actor, no_restart=True)
        self.down.add(i)
        self._note(
            n,
            {
                "kind": "crash",
                "at_round": ev.at_round,
                "round": status.get("current"),
                "phase": status.get("phase"),
                "pid": n.pid,
            },
        )

    def _restart(self, i: int, ev: FaultEvent, federation_round: int) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        n = self.nodes[i]
        n.incarnation += 1
        name = f"{ACTOR_PREFIX}-{self.run_id}-n{i}-r{n.incarnation}"
        opts = {**n.options, "name": name}
        strategy = NodeAffinitySchedulingStrategy(node_id=n.node_id, soft=False)
        actor = self.ray.remote(NodeHost).options(**opts, scheduling_strategy=strategy).remote()
        self.all_actors.append(actor)
        n.actor = actor
        n.pid = _get(self.ray, [actor.start.remote(n.values)], NODE_START_TIMEOUT + 30, "restart")[
            0
        ]
        self.down.discard(i)
        event = {"kind": "restart", "at_round": ev.at_round, "round": federation_round}
        self._note(n, {**event, "pid": n.pid})


def _current_round(n: _Node) -> int | None:
    value = (n.status or {}).get("round", {}).get("current")
    return value if isinstance(value, int) else None
