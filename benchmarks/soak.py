"""Soak: 8 real node processes for 10 minutes under churn, loss, garbage and a partition.

Run: python benchmarks/soak.py [--minutes 10] [--quick] [--baseline before|concurrent|skip]

What it does. Eight `p2pfl node` processes on 127.0.0.1 (distinct ports, data dirs in a
temp dir, `--peer` bootstrap, mDNS off) run unbounded rounds (`rounds = 0`) for a fixed
wall-clock time, while this script, their supervisor:
- every ~30 s (seeded jitter) SIGKILLs one node's process group and starts the same
  command on the same data dir a few seconds later (two "anchor" nodes are never killed,
  so some processes live the whole run and their memory says something);
- has every node drop 5% and corrupt 1% (one byte, inside a well-formed frame) of what
  it sends, from a fault plan file per node (`--faults`);
- cuts the federation 4 | 4 once for a span of rounds and heals it. Plan rules count
  the node's own rounds, so the partition's rounds are chosen from the round rate of
  the fault-free run (or of a 20 s calibration run), aiming at about 35-45% of the run.

The aggregation rule is trimmed mean (f = 1) in both runs: byte flips that stay finite
(1e30) are indistinguishable from a model, and with the plain mean one such frame
ruins every model (docs/reliability.md); the soak is about staying up, not about that.

Then the same federation runs fault-free for the same time (before the soak by default,
or concurrently) and the final mean accuracies are compared.

Report (a rich table; JSON in benchmarks/results/soak.json):
- unexpected exits: a node process that exited without the soak having killed it (must
  be 0); such a node is restarted like a killed one, so the run goes on;
- RSS (VmRSS) per node: of its first process once it completed 3 rounds, and of the
  process running at the end; for processes that lived the whole run, the growth
  (must be flat: at most 10% + 8 MiB);
- the spread of rounds at the end (every node within 2 of the median);
- final mean accuracy against the fault-free run (within 1 point);
- rounds that ended on a timeout, and those that waited out a full `round_timeout`.

No node outlives the script: each runs in its own process group, and every exit path
(end, error, Ctrl-C, SIGTERM) goes through one `finally` that stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from p2pfl.control.client import ControlError, query
from p2pfl.scenario.processes import (
    NodeProcess,
    _exit_status,
    _exited,
    _killpg,
    _prepare_fault_plans,
    _signals_raise,
    _spawn,
    _stop_all,
    free_ports,
    node_argv,
)
from p2pfl.scenario.schema import Scenario, parse_scenario

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
POLL = 1.0  # seconds between liveness checks and RSS samples
STATUS_EVERY = 3.0  # seconds between control-socket reads (a status carries the last 100 rows)
PROGRESS_EVERY = 30.0  # seconds between progress lines
WARMUP_ROUNDS = 3  # a process's RSS "at start" is taken once it has done this many rounds
RSS_FLAT_RATIO = 1.10
RSS_FLAT_SLACK = 8 * 2**20
SPREAD_LIMIT = 2
ACCURACY_POINTS = 0.01
FULL_TIMEOUT_FRACTION = 0.95  # a round this long waited out round_timeout
SOAK_SLOWDOWN = 0.45  # soak round rate / fault-free rate (measured 0.4-0.5), to place the cut
# Worth a look in a node log. Rejected frames are expected here (1% are corrupted).
LOG_PATTERNS = ("Traceback", " ERROR ", "CRITICAL", "internal error", "contained an error", "exit")

console = Console(width=150)


def scenario_for(args: argparse.Namespace, faults: list[dict[str, Any]]) -> Scenario:
    """The federation of both runs: the base scenario of docs/reliability.md (digits,
    Dirichlet 0.5, MLP 64, 4 epochs), trimmed mean, rounds unbounded (set per node)."""
    doc: dict[str, Any] = {
        "name": "soak",
        "nodes": args.nodes,
        "rounds": 10**6,  # placeholder so fault rounds validate; nodes get rounds = 0
        "seed": args.seed,
        "topology": {"kind": "full"},
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "mlp", "hidden": 64},
        "training": {"epochs": 4, "lr": 0.05, "batch_size": 32},
        "protocol": {"quorum": 1.0, "round_timeout": args.round_timeout},
        "aggregation": {"rule": "trimmed_mean", "f": 1},
        "compression": {"pipeline": args.compression} if args.compression else {},
        "faults": faults,
    }
    return parse_scenario(doc)


def soak_faults(
    args: argparse.Namespace, partition: tuple[int, int] | None, *, faulty: bool
) -> list[dict[str, Any]]:
    """Link latency in both runs (a property of the network, not a fault: it also keeps
    8 processes from saturating 2 cores with 8+ rounds a second); loss, corruption and
    the partition only in the soak."""
    faults: list[dict[str, Any]] = []
    if args.latency > 0:
        faults.append(
            {"at_round": 0, "kind": "delay", "delay": args.latency, "jitter": args.latency / 5}
        )
    if not faulty:
        return faults
    if args.loss > 0:
        faults.append({"at_round": 0, "kind": "loss", "probability": args.loss})
    if args.corrupt > 0:
        faults.append({"at_round": 0, "kind": "corrupt", "probability": args.corrupt})
    if partition is not None:
        side = list(range(args.nodes // 2))
        faults.append({"at_round": partition[0], "kind": "partition", "nodes": side})
        faults.append({"at_round": partition[1], "kind": "heal"})
    return faults


# ---- one node: its successive processes ------------------------------------------------


@dataclass
class Life:
    """One OS process of a node, from start to its kill, crash or the end of the run."""

    pid: int
    started: float  # seconds into the run
    first_round: int | None = None
    rss_start: int | None = None  # VmRSS once it did WARMUP_ROUNDS rounds
    rss_start_t: float | None = None
    rss_last: int | None = None
    rss_max: int = 0
    # (seconds into the run, VmRSS, round, Python's allocated blocks) about every 30 s
    samples: list[tuple[float, int, int | None, int | None]] = field(default_factory=list)
    rss_start_round: int | None = None
    ended: float | None = None
    end: str = "running"  # running | killed | exited (unexpected) | stopped
    exit_code: int | None = None


@dataclass
class Node:
    index: int
    proc: NodeProcess
    lives: list[Life] = field(default_factory=list)
    status: dict[str, Any] | None = None
    killed_by_us: bool = False
    down_until: float | None = None  # restart due at (seconds into the run)

    @property
    def name(self) -> str:
        return self.proc.name

    @property
    def life(self) -> Life:
        return self.lives[-1]


def vm_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_status(nd: Node) -> dict[str, Any] | None:
    try:
        return query(nd.proc.data_dir / "control.sock", timeout=3.0)
    except ControlError:
        return None


def current_round(status: dict[str, Any] | None) -> int | None:
    value = (status or {}).get("round", {}).get("current")
    return value if isinstance(value, int) else None


class Run:
    """One federation run: start, watch (and with churn, kill and restart), stop."""

    def __init__(
        self,
        label: str,
        scenario: Scenario,
        workdir: Path,
        minutes: float,
        *,
        churn_every: float | None,
        anchors: Sequence[int],
        seed: int,
        partition: tuple[int, int] | None = None,
    ) -> None:
        self.label = label
        self.scenario = scenario
        self.workdir = workdir
        self.duration = minutes * 60.0
        self.churn_every = churn_every
        self.anchors = set(anchors)
        self.rng = random.Random(seed)
        self.partition = partition
        self.nodes: list[Node] = []
        self.graveyard: list[NodeProcess] = []  # killed processes not yet reaped
        self.events: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.next_kill: float | None = None
        self.warm_at: float | None = None
        self.partition_seen: dict[str, float] = {}
        self.final_status: dict[str, dict[str, Any] | None] = {}
        self.ended = 0.0

    # -- lifecycle --

    def start(self) -> None:
        n = self.scenario.nodes
        addresses = [f"127.0.0.1:{port}" for port in free_ports(n)]
        dirs = [self.workdir / f"n{i}" for i in range(n)]
        values = self.scenario.node_config_values(addresses, dirs)
        for v in values:
            v["rounds"] = 0  # unbounded: the soak stops them
            # The scenario waits for every neighbour before round 1 (min_peers = degree).
            # A restarted node whose plan still cuts it off from the other half (plans
            # count the node's own rounds) would then never start: half will do.
            v["min_peers"] = max(1, self.scenario.nodes // 2 - 1)
        if self.scenario.faults:
            _prepare_fault_plans(self.scenario.faults, dirs)
        self.t0 = time.monotonic()
        for i, vals in enumerate(values):
            proc = _spawn(f"n{i}", dirs[i], node_argv(vals))
            node = Node(i, proc)
            node.lives.append(Life(proc.proc.pid, self.now()))
            self.nodes.append(node)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> None:
        """SIGTERM every live group, SIGKILL after a grace period, reap everything."""
        live = [nd.proc for nd in self.nodes if nd.down_until is None]
        _stop_all(live, grace=10.0)
        for nd in self.nodes:
            if nd.down_until is None and nd.life.end == "running":
                nd.life.end = "stopped"
                nd.life.ended = self.now()
                nd.life.exit_code = nd.proc.exit_code
        for p in self.graveyard:
            with contextlib.suppress(ChildProcessError):
                p.exit_code = p.proc.wait()
            with contextlib.suppress(OSError):
                p.log.close()
        self.graveyard.clear()

    # -- the loop --

    def watch(self, progress: Any = None) -> None:
        last_status = -STATUS_EVERY
        last_progress = -PROGRESS_EVERY
        while self.now() < self.duration:
            now = self.now()
            self._check_exits(now)
            self._restart_due(now)
            if now - last_status >= STATUS_EVERY:
                last_status = now
                self._read_statuses(now)
                if progress is not None and now - last_progress >= PROGRESS_EVERY:
                    last_progress = now
                    progress(self)
            self._sample_rss(now)
            self._churn(now)
            time.sleep(POLL)
        # The last word: every node's round and counters, just before they are stopped.
        self._read_statuses(self.now())
        self._sample_rss(self.now(), force=True)
        self.final_status = {
            nd.name: nd.status if nd.down_until is None else None for nd in self.nodes
        }
        self.ended = self.now()

    def _check_exits(self, now: float) -> None:
        for nd in self.nodes:
            if nd.down_until is not None or not _exited(nd.proc.proc.pid):
                continue
            code = _exit_status(nd.proc)
            nd.life.end = "exited"
            nd.life.ended = now
            nd.life.exit_code = code
            tail = log_tail(nd.proc.log_path)
            self.events.append(
                {
                    "t": round(now, 1),
                    "node": nd.name,
                    "kind": "unexpected_exit",
                    "exit_code": code,
                    "log_tail": tail,
                }
            )
            console.print(f"[red]{self.label}: {nd.name} exited on its own (exit code {code})[/]")
            console.print("\n".join("  | " + line for line in tail), highlight=False, markup=False)
            self._bury(nd, now, restart_in=3.0)

    def _bury(self, nd: Node, now: float, restart_in: float) -> None:
        self.graveyard.append(nd.proc)
        nd.status = None
        nd.down_until = now + restart_in

    def _restart_due(self, now: float) -> None:
        for nd in self.nodes:
            if nd.down_until is None or now < nd.down_until:
                continue
            old = nd.proc
            self.graveyard.remove(old)
            old.exit_code = old.proc.wait()  # reap: its group is gone and forgotten now
            old.log.close()
            nd.proc = _spawn(old.name, old.data_dir, old.argv)
            nd.lives.append(Life(nd.proc.proc.pid, now))
            nd.down_until = None
            self.events.append({"t": round(now, 1), "node": nd.name, "kind": "restart"})

    def _read_statuses(self, now: float) -> None:
        # All at once (one thread per node): read one after the other, the nodes would
        # be seen at moments a round or more apart, which the spread check would count.
        live = [nd for nd in self.nodes if nd.down_until is None]
        with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
            replies = list(pool.map(read_status, live))
        for nd, reply in zip(live, replies, strict=True):
            if reply is None:
                continue
            nd.status = reply
            rnd = current_round(nd.status)
            if rnd is not None and nd.life.first_round is None:
                nd.life.first_round = rnd
        if self.partition is not None:
            rounds = [current_round(nd.status) for nd in self.nodes if nd.status]
            top = max((r for r in rounds if r is not None), default=0)
            for key, at in (("partition", self.partition[0]), ("heal", self.partition[1])):
                if key not in self.partition_seen and top >= at:
                    self.partition_seen[key] = round(now, 1)
                    self.events.append({"t": round(now, 1), "kind": key, "round": at})
        if self.warm_at is None and all(
            (current_round(nd.status) or 0) >= WARMUP_ROUNDS for nd in self.nodes
        ):
            self.warm_at = now
            if self.churn_every is not None:
                self.next_kill = now + self._gap()

    def _sample_rss(self, now: float, force: bool = False) -> None:
        for nd in self.nodes:
            if nd.down_until is not None:
                continue
            rss = vm_rss(nd.proc.proc.pid)
            if rss is None:
                continue
            life = nd.life
            life.rss_last = rss
            life.rss_max = max(life.rss_max, rss)
            rnd = current_round(nd.status)
            if (
                life.rss_start is None
                and rnd is not None
                and life.first_round is not None
                and rnd >= life.first_round + WARMUP_ROUNDS
            ):
                life.rss_start, life.rss_start_t, life.rss_start_round = rss, now, rnd
            if force or not life.samples or now - life.samples[-1][0] >= 30.0:
                blocks = ((nd.status or {}).get("memory") or {}).get("python_blocks")
                life.samples.append((round(now, 1), rss, rnd, blocks))

    def _gap(self) -> float:
        assert self.churn_every is not None
        return self.churn_every * self.rng.uniform(0.8, 1.2)

    def quiet_from(self) -> float:
        """No kill after this: the last restarted node gets time to catch up before the
        final round spread is measured."""
        return self.duration - max(20.0, min(60.0, 0.1 * self.duration))

    def _churn(self, now: float) -> None:
        if self.next_kill is None or now < self.next_kill or now >= self.quiet_from():
            return
        if any(nd.down_until is not None for nd in self.nodes):
            self.next_kill = now + 1.0  # one node down at a time
            return
        victims = [nd for nd in self.nodes if nd.index not in self.anchors]
        nd = self.rng.choice(victims)
        rnd = current_round(nd.status)
        _killpg(nd.proc.proc.pid, signal.SIGKILL)
        nd.life.end = "killed"
        nd.life.ended = now
        down = self.rng.uniform(3.0, 6.0)
        self.events.append(
            {
                "t": round(now, 1),
                "node": nd.name,
                "kind": "kill",
                "round": rnd,
                "down_s": round(down, 1),
            }
        )
        self._bury(nd, now, restart_in=down)
        self.next_kill = now + self._gap()


# ---- analysis ---------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and "round" in row:
                    rows.append(row)
    return rows


def log_tail(path: Path, lines: int = 20) -> list[str]:
    with contextlib.suppress(OSError):
        return [line[:300] for line in path.read_text(errors="replace").splitlines()[-lines:]]
    return []


def log_excerpt(path: Path, limit: int = 12) -> list[str]:
    """Lines worth a look in a node log: tracebacks, errors, exits, contained failures."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if any(p in line for p in LOG_PATTERNS) and "rejected message" not in line:
                out.append(line[:300])
    counts = Counter(out)
    unique = list(dict.fromkeys(out))
    return [f"{line}  (x{counts[line]})" if counts[line] > 1 else line for line in unique][:limit]


def rss_growth(life: Life) -> dict[str, Any]:
    """Start (after warm-up) vs end of one process, and the growth per round between."""
    assert life.rss_start is not None and life.rss_last is not None
    end_round = life.samples[-1][2] if life.samples else None
    rounds = None
    if end_round is not None and life.rss_start_round is not None:
        rounds = end_round - life.rss_start_round
    grown = life.rss_last - life.rss_start
    return {
        "start": life.rss_start,
        "end": life.rss_last,
        "ratio": round(life.rss_last / life.rss_start, 3),
        "rounds": rounds,
        "bytes_per_round": round(grown / rounds) if rounds else None,
        "mib_per_hour": round(
            grown / 2**20 / max(1e-9, life.samples[-1][0] - (life.rss_start_t or 0)) * 3600, 1
        )
        if life.samples
        else None,
        "second_half_growth_bytes": second_half_growth(life),
        # Python objects (sys.getallocatedblocks) at the first and last sample: flat
        # blocks with growing RSS point at native memory or the allocator, not a leak
        # of Python objects.
        "python_blocks": [life.samples[0][3], life.samples[-1][3]] if life.samples else None,
        "flat": life.rss_last <= RSS_FLAT_RATIO * life.rss_start + RSS_FLAT_SLACK,
    }


def second_half_growth(life: Life) -> int | None:
    """RSS growth over the second half of the process's samples: a leak keeps growing,
    an allocator warming up levels off."""
    if len(life.samples) < 4 or life.rss_last is None:
        return None
    mid_t = (life.samples[0][0] + life.samples[-1][0]) / 2
    mid = min(life.samples, key=lambda sample: abs(sample[0] - mid_t))
    return life.rss_last - mid[1]


def summarize(run: Run, round_timeout: float) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    finals: list[float] = []
    ends: dict[str, int] = {}
    for nd in run.nodes:
        rows = read_rows(nd.proc.data_dir / "metrics.jsonl")
        timed_out = [r for r in rows if r.get("timed_out")]
        # Whether or not the round ended on its timeout: a round that took round_timeout
        # waited it out (e.g. the last update arrived only as the deadline passed).
        full = [
            r for r in rows if float(r.get("seconds", 0.0)) >= FULL_TIMEOUT_FRACTION * round_timeout
        ]
        status = run.final_status.get(nd.name)
        end_round = current_round(status)
        if end_round is None and rows:
            end_round = int(rows[-1]["round"])
        if end_round is not None:
            ends[nd.name] = end_round
        acc = rows[-1].get("accuracy") if rows else None
        if isinstance(acc, int | float):
            finals.append(float(acc))
        first, last = nd.lives[0], nd.lives[-1]
        counters = (status or {}).get("counters", {})
        nodes[nd.name] = {
            "peer_id": (status or {}).get("node", {}).get("id"),
            "processes": len(nd.lives),
            "kills": sum(1 for life in nd.lives if life.end == "killed"),
            "unexpected_exits": sum(1 for life in nd.lives if life.end == "exited"),
            "rss_start_bytes": first.rss_start,
            "rss_end_bytes": last.rss_last,
            "rss_end_process_age_s": round(run.ended - last.started, 1),
            "end_round": end_round,
            "rounds_trained": len(rows),
            "final_accuracy": acc,
            "timed_out_rounds": len(timed_out),
            "full_timeout_rounds": len(full),
            "full_timeouts_at": [
                {
                    "round": r["round"],
                    "seconds": r.get("seconds"),
                    "heard": r.get("peers_heard"),
                    "timed_out": r.get("timed_out"),
                }
                for r in full
            ][:20],
            "counters": {
                k: counters.get(k)
                for k in (
                    "faults_injected",
                    "frames_rejected",
                    "contained_errors",
                    "reconnects",
                    "timeouts",
                )
            },
            "lives": [
                {
                    "pid": life.pid,
                    "started_s": round(life.started, 1),
                    "ended_s": None if life.ended is None else round(life.ended, 1),
                    "end": life.end,
                    "exit_code": life.exit_code,
                    "rss_start_bytes": life.rss_start,
                    "rss_last_bytes": life.rss_last,
                    "rss_max_bytes": life.rss_max,
                    "rss_samples": life.samples,
                }
                for life in nd.lives
            ],
            "log": str(nd.proc.log_path),
            "log_excerpt": log_excerpt(nd.proc.log_path),
        }
    median = statistics.median(ends.values()) if ends else None
    spread = {k: v - median for k, v in ends.items()} if median is not None else {}
    # Memory: processes that ran from warm-up to the end (never killed).
    whole = [
        (nd.name, life)
        for nd in run.nodes
        for life in nd.lives
        if life.end == "stopped" and life.started < 1.0 and life.rss_start and life.rss_last
    ]
    growth = {name: rss_growth(life) for name, life in whole}
    total_rows = sum(v["rounds_trained"] for v in nodes.values())
    return {
        "label": run.label,
        "wall_s": round(run.ended, 1),
        "nodes": nodes,
        "events": run.events,
        "partition_seen": run.partition_seen,
        "end_rounds": ends,
        "median_end_round": median,
        "max_abs_spread": max((abs(v) for v in spread.values()), default=None),
        "final_mean_accuracy": round(statistics.fmean(finals), 4) if finals else None,
        "unexpected_exits": sum(v["unexpected_exits"] for v in nodes.values()),
        "kills": sum(v["kills"] for v in nodes.values()),
        "timed_out_rounds": sum(v["timed_out_rounds"] for v in nodes.values()),
        "full_timeout_rounds": sum(v["full_timeout_rounds"] for v in nodes.values()),
        "full_timeout_distinct_rounds": sorted(
            {f["round"] for v in nodes.values() for f in v["full_timeouts_at"]}
        ),
        "rounds_trained": total_rows,
        "rss_whole_run": growth,
        "clean_stop": {
            nd.name: nd.lives[-1].exit_code for nd in run.nodes if nd.lives[-1].end == "stopped"
        },
    }


# ---- driving --------------------------------------------------------------------------


def run_federation(
    label: str,
    args: argparse.Namespace,
    workdir: Path,
    *,
    faults: bool,
    minutes: float,
    partition: tuple[int, int] | None = None,
) -> dict[str, Any]:
    scenario = scenario_for(args, soak_faults(args, partition, faulty=faults))
    run = Run(
        label,
        scenario,
        workdir / label,
        minutes,
        churn_every=args.churn_every if faults else None,
        anchors=args.anchors if faults else (),
        seed=args.seed,
        partition=partition if faults else None,
    )

    def progress(r: Run) -> None:
        rounds = [current_round(nd.status) for nd in r.nodes]
        shown = " ".join("-" if x is None else str(x) for x in rounds)
        console.print(f"[dim]{label} {r.now():6.0f} s  rounds: {shown}[/]", highlight=False)

    try:
        run.start()
        run.watch(progress if not args.quiet else None)
    finally:
        run.stop()
    return summarize(run, args.round_timeout)


def calibrate(args: argparse.Namespace, workdir: Path) -> float:
    """Rounds per second of the fault-free federation, from a short run."""
    res = run_federation("calibration", args, workdir, faults=False, minutes=1 / 3)
    return rate_of(res)


def rate_of(res: dict[str, Any]) -> float:
    median = res.get("median_end_round") or 0
    return max(0.05, float(median) / max(1.0, float(res["wall_s"]) - 5.0))


def partition_rounds(args: argparse.Namespace, rate: float) -> tuple[int, int]:
    """Round span [start, heal) of the 4 | 4 cut: at ~35% of the expected soak rounds,
    lasting ~8% of the run (at least 3 rounds)."""
    if args.partition_round is not None:
        return args.partition_round, args.partition_round + args.partition_rounds
    expected = rate * SOAK_SLOWDOWN * args.minutes * 60.0
    start = max(WARMUP_ROUNDS + 2, int(0.35 * expected))
    length = max(3, int(0.08 * expected))
    return start, start + length


def verdict(soak: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    whole = soak["rss_whole_run"]
    acc_s, acc_b = soak["final_mean_accuracy"], (base or {}).get("final_mean_accuracy")
    out = {
        "unexpected_exits": {
            "value": soak["unexpected_exits"],
            "ok": soak["unexpected_exits"] == 0,
        },
        "rss_flat": {
            "value": {k: v["ratio"] for k, v in whole.items()},
            "ok": bool(whole) and all(v["flat"] for v in whole.values()),
        },
        "round_spread": {
            "value": soak["max_abs_spread"],
            "ok": soak["max_abs_spread"] is not None and soak["max_abs_spread"] <= SPREAD_LIMIT,
        },
        "accuracy_vs_fault_free": {
            "value": None if acc_s is None or acc_b is None else round(acc_s - acc_b, 4),
            "ok": None if acc_b is None else acc_s is not None and acc_s >= acc_b - ACCURACY_POINTS,
        },
        "full_timeout_rounds": {"value": soak["full_timeout_rounds"], "ok": None},
    }
    return out


def growth_text(res: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {mib(v['start'])} -> {mib(v['end'])} MiB, x{v['ratio']:.2f} "
        f"({(v['bytes_per_round'] or 0) / 1024:.1f} KiB/round; second half "
        f"+{(v.get('second_half_growth_bytes') or 0) / 2**20:.1f} MiB)"
        for k, v in res["rss_whole_run"].items()
    )


def full_text(res: dict[str, Any]) -> str:
    distinct = res.get("full_timeout_distinct_rounds") or []
    return f"{res['full_timeout_rounds']} ({len(distinct)})"


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def print_tables(soak: dict[str, Any], base: dict[str, Any] | None, checks: dict[str, Any]) -> None:
    t = Table(title=f"soak: {len(soak['nodes'])} nodes, {soak['wall_s']:.0f} s")
    for col in (
        "node",
        "procs",
        "kills",
        "unexp. exits",
        "RSS start MiB",
        "RSS end MiB",
        "end round",
        "vs median",
        "trained",
        "acc",
        "timeouts",
        "full t/o",
        "contained",
    ):
        t.add_column(col, justify="left" if col == "node" else "right")
    median = soak["median_end_round"]
    for name, nd in soak["nodes"].items():
        contained = sum(((nd["counters"] or {}).get("contained_errors") or {}).values())
        end = nd["end_round"]
        t.add_row(
            name,
            str(nd["processes"]),
            str(nd["kills"]),
            str(nd["unexpected_exits"]),
            mib(nd["rss_start_bytes"]),
            mib(nd["rss_end_bytes"]),
            "-" if end is None else str(end),
            "-" if end is None or median is None else f"{end - median:+g}",
            str(nd["rounds_trained"]),
            "-" if nd["final_accuracy"] is None else f"{nd['final_accuracy']:.3f}",
            str(nd["timed_out_rounds"]),
            str(nd["full_timeout_rounds"]),
            str(contained),
        )
    console.print(t)
    s = Table(title="criteria")
    for col in ("check", "soak", "fault-free", "limit", "result"):
        s.add_column(col, justify="left" if col in ("check", "limit") else "right")

    def res(ok: bool | None) -> str:
        return "[green]PASS[/]" if ok else ("-" if ok is None else "[red]FAIL[/]")

    s.add_row(
        "unexpected exits",
        str(soak["unexpected_exits"]),
        "-" if base is None else str(base["unexpected_exits"]),
        "0",
        res(checks["unexpected_exits"]["ok"]),
    )
    ratios = growth_text(soak)
    s.add_row(
        "RSS growth, whole-run processes",
        ratios or "none",
        "-",
        f"<= x{RSS_FLAT_RATIO:.2f} + {RSS_FLAT_SLACK // 2**20} MiB",
        res(checks["rss_flat"]["ok"]),
    )
    s.add_row(
        "max |end round - median|",
        str(soak["max_abs_spread"]),
        "-" if base is None else str(base["max_abs_spread"]),
        f"<= {SPREAD_LIMIT}",
        res(checks["round_spread"]["ok"]),
    )
    s.add_row(
        "final mean accuracy",
        str(soak["final_mean_accuracy"]),
        "-" if base is None else str(base["final_mean_accuracy"]),
        f">= fault-free - {ACCURACY_POINTS:.2f}",
        res(checks["accuracy_vs_fault_free"]["ok"]),
    )
    s.add_row(
        "median end round",
        str(soak["median_end_round"]),
        "-" if base is None else str(base["median_end_round"]),
        "",
        "-",
    )
    s.add_row(
        "timed-out rounds (all nodes)",
        str(soak["timed_out_rounds"]),
        "-" if base is None else str(base["timed_out_rounds"]),
        "",
        "-",
    )
    s.add_row(
        "node-rounds that lasted a full round_timeout (distinct rounds)",
        full_text(soak),
        "-" if base is None else full_text(base),
        "(reported)",
        "-",
    )
    s.add_row("kills (SIGKILL + restart)", str(soak["kills"]), "-", "", "-")
    s.add_row(
        "exit codes on the final SIGTERM",
        " ".join(str(c) for c in soak["clean_stop"].values()),
        "-" if base is None else " ".join(str(c) for c in base["clean_stop"].values()),
        "",
        "-",
    )
    console.print(s)


def markdown(soak: dict[str, Any], base: dict[str, Any] | None, checks: dict[str, Any]) -> str:
    """The same numbers as the console tables, as Markdown for docs/reliability.md."""
    lines = [
        "| node | processes | kills | unexpected exits | RSS start -> end (MiB) "
        "| end round (vs median) | rounds trained | final accuracy | timed-out rounds "
        "| full-timeout rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    median = soak["median_end_round"]
    for name, nd in soak["nodes"].items():
        end = nd["end_round"]
        vs = "" if end is None or median is None else f" ({end - median:+g})"
        acc = nd["final_accuracy"]
        lines.append(
            f"| {name} | {nd['processes']} | {nd['kills']} | {nd['unexpected_exits']} "
            f"| {mib(nd['rss_start_bytes'])} -> {mib(nd['rss_end_bytes'])} "
            f"| {end}{vs} | {nd['rounds_trained']} | {'-' if acc is None else f'{acc:.3f}'} "
            f"| {nd['timed_out_rounds']} | {nd['full_timeout_rounds']} |"
        )
    lines += ["", "| check | soak | fault-free | limit | result |", "|---|---|---|---|---|"]

    def res(ok: bool | None) -> str:
        return "-" if ok is None else ("**pass**" if ok else "**FAIL**")

    b = base or {}
    growth = growth_text(soak)
    rows = [
        (
            "unexpected exits",
            soak["unexpected_exits"],
            b.get("unexpected_exits"),
            "0",
            checks["unexpected_exits"]["ok"],
        ),
        (
            "RSS of the processes that lived the whole run",
            growth or "none",
            "-",
            f"<= x{RSS_FLAT_RATIO:.2f} + {RSS_FLAT_SLACK // 2**20} MiB",
            checks["rss_flat"]["ok"],
        ),
        (
            "max \\|end round - median\\|",
            soak["max_abs_spread"],
            b.get("max_abs_spread"),
            f"<= {SPREAD_LIMIT}",
            checks["round_spread"]["ok"],
        ),
        (
            "final mean accuracy",
            soak["final_mean_accuracy"],
            b.get("final_mean_accuracy"),
            f">= fault-free - {ACCURACY_POINTS:.2f}",
            checks["accuracy_vs_fault_free"]["ok"],
        ),
        ("median end round", soak["median_end_round"], b.get("median_end_round"), "", None),
        (
            "timed-out rounds, all nodes",
            soak["timed_out_rounds"],
            b.get("timed_out_rounds"),
            "",
            None,
        ),
        (
            "node-rounds that lasted a full round_timeout (distinct rounds)",
            full_text(soak),
            None if base is None else full_text(base),
            "",
            None,
        ),
        ("SIGKILL + restart", soak["kills"], "-", "", None),
        (
            "exit codes on the final SIGTERM",
            " ".join(str(c) for c in soak["clean_stop"].values()),
            None if base is None else " ".join(str(c) for c in base["clean_stop"].values()),
            "",
            None,
        ),
    ]
    for name, v_soak, v_base, limit, ok in rows:
        lines.append(
            f"| {name} | {v_soak} | {'-' if v_base is None else v_base} | {limit} | {res(ok)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of each run (default 10)")
    ap.add_argument("--quick", action="store_true", help="1-minute runs, churn every 15 s")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--churn-every", type=float, default=30.0, help="seconds between kills")
    ap.add_argument(
        "--anchors", default="0,4", help="node indices never killed (comma list; '' = none)"
    )
    ap.add_argument("--latency", type=float, default=0.2, help="link delay (s), both runs")
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--corrupt", type=float, default=0.01)
    ap.add_argument("--round-timeout", type=float, default=30.0)
    ap.add_argument(
        "--compression",
        default="",
        help="update pipeline for both runs, comma list (e.g. delta,topk:0.1,quantize:8)",
    )
    ap.add_argument("--partition-round", type=int, default=None, help="override: cut at this round")
    ap.add_argument("--partition-rounds", type=int, default=10, help="with --partition-round")
    ap.add_argument(
        "--baseline",
        choices=("before", "concurrent", "skip"),
        default="before",
        help="the fault-free run of the same length: before the soak (default), "
        "concurrently (twice the load), or not at all",
    )
    ap.add_argument(
        "--code",
        choices=("head", "worktree"),
        default="head",
        help="run the nodes from a copy of HEAD (default) or of the work tree, made at start",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the node dirs (logs) afterwards")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes = 1.0
        args.churn_every = 15.0
    args.anchors = [int(x) for x in args.anchors.split(",") if x.strip()]
    args.out = args.out.resolve()
    args.compression = [x.strip() for x in args.compression.split(",") if x.strip()]
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="p2pfl-soak-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    code = use_code(args.code, workdir)
    started = time.time()
    base: dict[str, Any] | None = None
    soak: dict[str, Any] | None = None
    failed = True
    try:
        with _signals_raise():
            if args.baseline == "before":
                base = run_federation(
                    "fault-free", args, workdir, faults=False, minutes=args.minutes
                )
                rate = rate_of(base)
            elif args.partition_round is None:
                rate = calibrate(args, workdir)
            else:
                rate = 1.0
            partition = partition_rounds(args, rate)
            console.print(
                f"fault-free rate {rate:.2f} rounds/s; "
                f"partition rounds {partition[0]}..{partition[1]}"
            )
            if args.baseline == "concurrent":
                base, soak = run_concurrently(args, workdir, partition)
            else:
                soak = run_federation(
                    "soak", args, workdir, faults=True, minutes=args.minutes, partition=partition
                )
        checks = verdict(soak, base)
        print_tables(soak, base, checks)
        failed = not all(c["ok"] for c in checks.values() if c["ok"] is not None)
        doc = {
            "benchmark": "soak",
            "command": "python benchmarks/soak.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "commit": git_commit(),
            "code": code,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "settings": {
                "minutes": args.minutes,
                "nodes": args.nodes,
                "seed": args.seed,
                "churn_every_s": args.churn_every,
                "anchors": args.anchors,
                "latency_s": args.latency,
                "loss": args.loss,
                "corrupt": args.corrupt,
                "round_timeout": args.round_timeout,
                "partition_rounds": list(partition),
                "baseline": args.baseline,
                "aggregation": "trimmed_mean f=1",
                "compression": args.compression,
            },
            "checks": checks,
            "pass": not failed,
            "soak": soak,
            "fault_free": base,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, args.out)
        md = markdown(soak, base, checks)
        (workdir / "soak.md").write_text(md)
        print(md, flush=True)
        console.print(
            f"wrote {args.out}; node dirs in {workdir}"
            + ("" if args.keep or failed else " (removed)")
        )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every node process was stopped[/]")
        return 130
    finally:
        if args.workdir is None and not args.keep and not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def run_concurrently(
    args: argparse.Namespace, workdir: Path, partition: tuple[int, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fault-free run in a child process of this script, the soak here."""
    out = workdir / "fault-free.json"
    cmd = [
        sys.executable,
        __file__,
        "--minutes",
        str(args.minutes),
        "--nodes",
        str(args.nodes),
        "--seed",
        str(args.seed),
        "--round-timeout",
        str(args.round_timeout),
        "--latency",
        str(args.latency),
        "--compression",
        ",".join(args.compression),
        "--workdir",
        str(workdir / "child"),
        "--keep",
        "--quiet",
        "--baseline-only",
        str(out),
    ]
    child = subprocess.Popen(cmd, start_new_session=True)
    try:
        soak = run_federation(
            "soak", args, workdir, faults=True, minutes=args.minutes, partition=partition
        )
        child.wait(timeout=args.minutes * 60 + 120)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # it stops its own nodes in its finally
            child.wait()
    return json.loads(out.read_text()), soak


def baseline_only(argv: list[str]) -> int:
    """`--baseline-only OUT`: the fault-free run alone, its summary as JSON (for
    --baseline concurrent)."""
    i = argv.index("--baseline-only")
    out = Path(argv[i + 1])
    rest = argv[:i] + argv[i + 2 :]
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--round-timeout", type=float)
    ap.add_argument("--latency", type=float)
    ap.add_argument("--compression", default="")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(rest)
    args.compression = [x for x in args.compression.split(",") if x]
    args.workdir.mkdir(parents=True, exist_ok=True)
    with _signals_raise():
        try:
            res = run_federation(
                "fault-free", args, args.workdir, faults=False, minutes=args.minutes
            )
        except KeyboardInterrupt:
            return 130
    out.write_text(json.dumps(res) + "\n")
    return 0


def use_code(which: str, workdir: Path) -> dict[str, Any]:
    """Which p2pfl the nodes run: a copy made now in the work dir, first on the nodes'
    sys.path, so edits made to the work tree during the run (others' work in progress)
    cannot change what a restarted node loads. `head`: the committed tree (git archive);
    `worktree`: the work tree as it is at the start, uncommitted edits included."""
    repo = Path(__file__).resolve().parent.parent
    src = workdir / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    if which == "worktree":
        shutil.copytree(repo / "p2pfl", src / "p2pfl", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(
            ["git", "archive", "HEAD", "p2pfl"], cwd=repo, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    # `python -m p2pfl` puts the current directory first on sys.path, then PYTHONPATH,
    # then the editable install (the work tree): run the nodes from the snapshot.
    os.environ["PYTHONPATH"] = str(src)
    os.chdir(src)
    return {
        "from": "HEAD" if which == "head" else "work tree",
        "commit": git_commit(),
        "uncommitted_package_files": git_dirty() if which == "worktree" else [],
        "path": str(src),
    }


def git_dirty() -> list[str]:
    """Package files that differ from the commit: the nodes ran the work tree."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "p2pfl"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.splitlines()]


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    if "--baseline-only" in sys.argv:
        sys.exit(baseline_only(sys.argv[1:]))
    sys.exit(main())
