"""Real-process runner: one `p2pfl node` process per scenario node, on 127.0.0.1.

The runner is deliberately plain synchronous code (subprocess + a polling loop over the
nodes' control sockets): it owns child processes, and the one property that matters
most is that it never leaves one behind. Every node runs in its own session/process
group; every exit path (success, node crash, deadline, Ctrl-C, SIGTERM, any bug) goes
through one `finally` that SIGTERMs every group, waits a grace period, then SIGKILLs
what is left. Liveness checks use `waitid(WNOWAIT)` so a dead leader is not reaped
before its group is killed (its pid, hence the group id, cannot be reused meanwhile).

Only SIGKILL of the runner itself can orphan nodes (no prctl tricks); `pids.json` in
the output folder lists them for that case.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from p2pfl.config import to_flags
from p2pfl.node.learner import METRICS_FILE, read_metrics
from p2pfl.scenario.faults import (
    CLOSE_WATCH_ROUNDS,
    CrashDriver,
    FaultEvent,
    write_fault_plans,
)
from p2pfl.scenario.report import RoundProgress
from p2pfl.scenario.schema import RunFailed, Scenario

POLL_INTERVAL = 0.2
CLOSE_POLL = 0.01  # between queries of a crash's victims in its last rounds
FAR_POLL = 0.05  # between queries of the next crash's victims before that
STOP_GRACE = 10.0
QUERY_TIMEOUT = 2.0
LOG_TAIL_LINES = 25


@dataclass
class NodeProcess:
    name: str
    data_dir: Path
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    status: dict[str, Any] | None = None
    peak_rss_bytes: int | None = None
    exit_code: int | None = None
    killed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"


class _Terminated(BaseException):
    """SIGTERM/SIGHUP to the runner: unwind exactly like Ctrl-C does."""


def node_argv(values: Mapping[str, Any]) -> list[str]:
    """`python -m p2pfl node` flags for NodeConfig field values (dash-case, `--peer` repeated)."""
    return [sys.executable, "-m", "p2pfl", "node", *to_flags(values)]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open while choosing them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_processes(
    scenario: Scenario,
    out: Path,
    *,
    progress: RoundProgress | None = None,
    timeout: float | None = None,
    grace: float = STOP_GRACE,
) -> tuple[dict[str, dict[str, Any]], float]:
    """Run the scenario as real processes; return (node records for the report, wall seconds).

    Raises RunFailed when a node dies or the deadline passes, KeyboardInterrupt on
    Ctrl-C/SIGTERM; in every case all node processes are gone when this returns.
    """
    out.mkdir(parents=True, exist_ok=True)
    n = scenario.nodes
    addresses = [f"127.0.0.1:{port}" for port in free_ports(n)]
    dirs = [out / "nodes" / f"n{i}" for i in range(n)]
    values = scenario.node_config_values(addresses, dirs)
    if scenario.faults:
        _prepare_fault_plans(scenario.faults, dirs)
    deadline_s = timeout if timeout is not None else scenario.deadline_seconds()
    procs: list[NodeProcess] = []
    started = time.monotonic()
    with _signals_raise():
        try:
            _spawn_all(procs, values, dirs, out)
            chaos = _Chaos(scenario.faults, procs, out, started)
            _watch(procs, scenario, started + deadline_s, deadline_s, progress, chaos)
            for p in procs:
                p.peak_rss_bytes = _peak_rss(p.proc.pid)
        finally:
            _stop_all(procs, grace)
            _write_pids(out, procs)
    wall = time.monotonic() - started
    return {p.name: _record(p) for p in procs}, wall


def _spawn_all(
    procs: list[NodeProcess], values: Sequence[Mapping[str, Any]], dirs: Sequence[Path], out: Path
) -> None:
    """Start every node with Ctrl-C/SIGTERM deferred: a signal landing between fork and
    `procs.append` would otherwise leave a node nobody knows about."""
    pending: list[int] = []
    with _signal_handlers(lambda signum, frame: pending.append(signum)):
        for i, vals in enumerate(values):
            procs.append(_spawn(f"n{i}", dirs[i], node_argv(vals)))
            _write_pids(out, procs)
            if pending:
                break
    if pending:
        raise KeyboardInterrupt


def _spawn(name: str, data_dir: Path, argv: list[str]) -> NodeProcess:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (data_dir / "command.txt").write_text(" ".join(argv) + "\n")
    log = (data_dir / "node.log").open("ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: our Ctrl-C is not theirs
            env=env,
        )
    except BaseException:
        log.close()
        raise
    return NodeProcess(name, data_dir, argv, proc, log)


def _write_pids(out: Path, procs: Sequence[NodeProcess]) -> None:
    doc = {
        "runner": os.getpid(),
        "nodes": {p.name: p.proc.pid for p in procs},
        "exit_codes": {p.name: p.exit_code for p in procs if p.exit_code is not None},
    }
    tmp = out / ".pids.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "pids.json")


def _exited(pid: int) -> bool:
    """Has the child exited? Does not reap it (WNOWAIT), keeping its pid/pgid reserved."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # already reaped
    return info is not None


def _exit_status(p: NodeProcess) -> int | None:
    try:
        info = os.waitid(os.P_PID, p.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return p.proc.returncode
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _query(p: NodeProcess) -> dict[str, Any] | None:
    from p2pfl.control.client import ControlError, query

    try:
        return query(p.data_dir / "control.sock", timeout=QUERY_TIMEOUT)
    except ControlError:
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict) and "round" in row:
                rows.append(row)
    return rows


def node_rows(data_dir: Path, history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows from metrics.jsonl (authoritative: every round, survives the node; a node
    keeps only its last rows in memory) or else the history it showed."""
    rows = read_metrics(data_dir / METRICS_FILE)
    return rows if len(rows) >= len(history) else [dict(r) for r in history]


def _node_rows(p: NodeProcess) -> list[dict[str, Any]]:
    return node_rows(p.data_dir, (p.status or {}).get("history") or [])


def _is_done(p: NodeProcess, rounds: int) -> bool:
    if p.status is None:
        return False
    phase = p.status.get("round", {}).get("phase")
    current = p.status.get("round", {}).get("current", 0)
    history = p.status.get("history") or []
    # Past the last round counts only once its row is recorded (it is evaluated off the
    # event loop, after the round machine has moved on).
    return phase == "done" or (
        isinstance(current, int) and current >= rounds and len(history) >= rounds
    )


def _watch(
    procs: Sequence[NodeProcess],
    scenario: Scenario,
    deadline: float,
    deadline_s: float,
    progress: RoundProgress | None,
    chaos: _Chaos | None = None,
) -> None:
    """Poll until every node is done; raise RunFailed on an early death or the deadline."""
    while True:
        for i, p in enumerate(procs):
            if _exited(p.proc.pid) and not (chaos is not None and chaos.killed(i)):
                code = _exit_status(p)
                raise RunFailed(
                    f"node {p.name} exited early (exit code {code}); "
                    f"last lines of {p.log_path}:\n{_log_tail(p.log_path)}"
                )
        completed = []
        latest = []  # honest nodes' last rows: the bar shows their mean primary metric
        for i, p in enumerate(procs):
            status = _query(p)
            if status is not None:
                p.status = status
            if chaos is not None:
                chaos.watch()  # a sweep lasts rounds: keep an imminent crash's victims close
            history = (p.status or {}).get("history") or []
            completed.append(len(history))
            if history and isinstance(history[-1], dict) and scenario.role(i) == "honest":
                latest.append(history[-1])
        if progress is not None:
            progress.update(min(completed), latest)
        if chaos is not None:
            chaos.step()
        if all(
            _is_done(p, scenario.rounds) or (chaos is not None and chaos.excused(i))
            for i, p in enumerate(procs)
        ):
            return
        if time.monotonic() > deadline:
            done = {p.name: c for p, c in zip(procs, completed, strict=True)}
            logs = f"{procs[0].data_dir.parent}/n*/node.log"
            raise RunFailed.overdue(deadline_s, done, scenario.rounds, logs)
        if chaos is not None:
            chaos.wait(POLL_INTERVAL)
        else:
            time.sleep(POLL_INTERVAL)


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"  (cannot read log: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join("  | " + line for line in tail) if tail else "  (log is empty)"


def _peak_rss(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, from /proc; None where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_all(procs: Sequence[NodeProcess], grace: float) -> None:
    """SIGTERM every node's group, wait up to `grace`, SIGKILL the rest, reap all.

    A second Ctrl-C (or SIGTERM) during the wait skips straight to SIGKILL instead of
    interrupting the cleanup half-way.
    """
    hurry = False

    def _escalate(signum: int, frame: FrameType | None) -> None:
        nonlocal hurry
        hurry = True

    with _signal_handlers(_escalate):
        for p in procs:
            if not _exited(p.proc.pid):
                _killpg(p.proc.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while not hurry and time.monotonic() < end:
            if all(_exited(p.proc.pid) for p in procs):
                break
            time.sleep(0.05)
        for p in procs:
            if not _exited(p.proc.pid):
                p.killed = True
            # Also reaches anything the node left in its group; the leader is not reaped
            # yet, so the group id still belongs to us.
            _killpg(p.proc.pid, signal.SIGKILL)
        for p in procs:
            p.exit_code = p.proc.wait()
            p.log.close()


def _record(p: NodeProcess) -> dict[str, Any]:
    node = (p.status or {}).get("node", {})
    rec: dict[str, Any] = {
        "peer_id": node.get("id"),
        "pid": p.proc.pid,
        "exit_code": p.exit_code,
        "rounds": _node_rows(p),
    }
    if p.killed:
        rec["killed"] = True
    secure = (p.status or {}).get("secure")
    if secure:
        rec["secure"] = secure  # counters as of the last status read
    if p.peak_rss_bytes is not None:
        rec["peak_rss_bytes"] = p.peak_rss_bytes
    rec.update(p.extra)  # e.g. "events": crashes and restarts the runner injected
    return rec


# ---- fault injection: per-node plans, crash (SIGKILL) and restart ----------------------


def _prepare_fault_plans(events: Sequence[FaultEvent], dirs: Sequence[Path]) -> None:
    """Create each node's identity now (the node loads it) so that the fault plans can
    name peers by id, then write the plans the `faults` config values point at."""
    from p2pfl.identity import Identity

    ids = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        ids.append(Identity.load_or_create(d).peer_id)
    write_fault_plans(events, dirs, ids)


class _Chaos(CrashDriver):
    """Carries out `crash` (SIGKILL of the node's process group: no goodbye, no flush)
    and `restart` (the same command on the same data dir) when the control sockets
    report the rounds the schedule names. A killed node is left unreaped until it is
    restarted or the run ends, so its pid (the group id) cannot be reused meanwhile."""

    def __init__(
        self, events: Sequence[FaultEvent], procs: list[NodeProcess], out: Path, started: float
    ) -> None:
        super().__init__(events)
        self.procs = procs
        self.out = out
        self.started = started

    def reported_rounds(self) -> dict[int, int | None]:
        return {i: _current_round(p) for i, p in enumerate(self.procs) if i not in self.down}

    def wait(
        self,
        seconds: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Pause `seconds` until the next sweep, but meanwhile keep querying the victims
        of the next crash (every FAR_POLL, every CLOSE_POLL in its last rounds) and kill
        them as soon as they report its round.

        Only those few nodes are polled: a full sweep is what made crashes late.
        """
        end = clock() + seconds
        while self.active and self.schedule.watch_closely({}, ahead=None):
            near = self.watch()
            if not near:
                self.watch(ahead=None)
            left = end - clock()
            if left <= 0:
                return
            sleep(min(CLOSE_POLL if near else FAR_POLL, left))
        left = end - clock()
        if left > 0:
            sleep(left)

    def watch(self, ahead: int | None = CLOSE_WATCH_ROUNDS) -> bool:
        """Query the victims of the next crash once if it is at most `ahead` rounds
        away (None: however far) and fire what is due; False when nothing was queried."""
        if not self.active:
            return False
        rounds = {i: _current_round(p) for i, p in enumerate(self.procs) if i not in self.down}
        victims = self.schedule.watch_closely(rounds, ahead)
        if not victims:
            return False
        for i in victims:
            status = _query(self.procs[i])
            if status is not None:
                self.procs[i].status = status
        self.step()
        return True

    def _note(self, p: NodeProcess, event: dict[str, Any]) -> None:
        event["t"] = round(time.monotonic() - self.started, 3)
        p.extra.setdefault("events", []).append(event)

    def _crash(self, i: int, ev: FaultEvent) -> None:
        p = self.procs[i]
        status = (p.status or {}).get("round", {})
        _killpg(p.proc.pid, signal.SIGKILL)
        self.down.add(i)
        self._note(
            p,
            {
                "kind": "crash",
                "at_round": ev.at_round,
                "round": status.get("current"),
                "phase": status.get("phase"),
            },
        )

    def _restart(self, i: int, ev: FaultEvent, federation_round: int) -> None:
        old = self.procs[i]
        old.exit_code = old.proc.wait()  # reap: the old group is dead and forgotten now
        old.log.close()
        new = _spawn(old.name, old.data_dir, old.argv)
        new.extra = old.extra
        self.procs[i] = new
        self.down.discard(i)
        self._note(new, {"kind": "restart", "at_round": ev.at_round, "round": federation_round})
        _write_pids(self.out, self.procs)


def _current_round(p: NodeProcess) -> int | None:
    value = (p.status or {}).get("round", {}).get("current")
    return value if isinstance(value, int) else None


@contextlib.contextmanager
def _signal_handlers(handler: Any) -> Iterator[None]:
    """Install `handler` for SIGINT/SIGTERM/SIGHUP (main thread only; no-op elsewhere)."""
    saved: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                saved[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                break
        yield
    finally:
        for signum, old in saved.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP raise like Ctrl-C does, so `finally` blocks run and nodes are stopped."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(signum)

    try:
        with _signal_handlers(_raise):
            yield
    except _Terminated:
        raise KeyboardInterrupt from None
