"""Scenario scaling: wall time per round and peak memory per node as N grows.

Run: python benchmarks/bench_scale.py [--quick] [--rounds R] [--full-mesh]
                                      [--scale-only] [--scale-nodes 100,300,1000]

Every point is one `p2pfl scenario run --json` in a fresh child process, so timings
include nothing left over from a previous point and the child's peak RSS is its own:
- in-process (8, 32, 100 nodes): one interpreter, the MemoryNetwork transport; the
  per-node figure is the child's peak RSS divided by N (the interpreter, numpy and the
  dataset are shared, so it falls as N grows);
- real processes (8, 16 nodes): TCP + TLS on loopback; per-node peak RSS is the mean of
  the nodes' VmHWM, which the runner records in metrics.json.
The 8-node in-process run is the baseline every other row is compared with.

The scale rows (issue 17: target <= 1 s per round and <= 400 MiB at 1000 nodes) run
100 / 300 / 1000 in-process nodes on a 4-regular graph with the 64-hidden MLP, in a
child of this script that times the records as they are written, and print a breakdown
of one steady round in seconds of the one event-loop thread: train, aggregate (the
rule), eval, encode, records (metrics lines and checkpoints) and the rest, which is
messaging (encode/decode of the other messages, heartbeats, handlers) and trio's
scheduling. Train/aggregate/eval/encode are the nodes' own per-round timings summed
over nodes; records are measured around their writes; the rest is the round minus them.
"CPU s" is the child's CPU time for the whole run (start-up and report included), a
steadier comparison than wall time when other work shares the machine.

The default graph is a random 4-regular one, so the message count grows linearly with
N; `--full-mesh` adds full-mesh rows (messages grow as N^2, and heartbeats with them).
"Round" is the mean over nodes of the node's own round duration, ignoring round 0
(start-up: connecting, first training); "wall" is the whole run, start-up included.
Prints a rich table and writes benchmarks/results/bench_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scale.json"

SCENARIO = """
name = "{name}"
nodes = {nodes}
rounds = {rounds}
seed = 0
[topology]
{topology}
{extra}[model]
hidden = {hidden}
[training]
epochs = 1
[protocol]
round_timeout = 30.0
heartbeat_interval = {heartbeat}
heartbeat_timeout = {heartbeat_timeout}
"""
SCALE_HIDDEN = 64
STEADY = ("train_s", "aggregate_s", "eval_s", "encode_s")  # the rows' own timings


def run_point(
    mode: str,
    nodes: int,
    rounds: int,
    kind: str,
    workdir: Path,
    *,
    hidden: int = 32,
    breakdown: bool = False,
    checkpoint_every: int | None = None,
    heartbeat_interval: float | None = None,
) -> dict[str, Any]:
    topology = 'kind = "kregular"\ndegree = 4' if kind == "kregular" else 'kind = "full"'
    # A full mesh pings N*(N-1) pairs per interval; keep that from dominating big meshes.
    heartbeat = heartbeat_interval or (1.0 if kind == "kregular" or nodes <= 32 else 5.0)
    name = f"{mode}-{kind}-{nodes}" + (f"-scale-hb{heartbeat:g}" if breakdown else "")
    extra = "" if checkpoint_every is None else f"checkpoint_every = {checkpoint_every}\n"
    path = workdir / f"{name}.toml"
    path.write_text(
        SCENARIO.format(
            name=name,
            nodes=nodes,
            rounds=rounds,
            topology=topology,
            heartbeat=heartbeat,
            heartbeat_timeout=heartbeat * 6,
            extra=extra,
            hidden=hidden,
        )
    )
    out = workdir / name
    if breakdown:  # this script, in-process, timing the records (see `child`)
        argv = [sys.executable, __file__, "--child", str(path), str(out)]
    else:
        argv = [sys.executable, "-m", "p2pfl", "scenario", "run", str(path), "--out", str(out)]
        argv += ["--json", *(["--in-process"] if mode == "in-process" else [])]
    log = workdir / f"{name}.log"
    start = time.perf_counter()
    with log.open("wb") as sink:  # files, not pipes: nothing can fill up and block the child
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the child's own rusage
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{log.read_text()}")
    metrics = json.loads((out / "metrics.json").read_text())
    steady = [r["seconds_mean"] for r in metrics["summary"]["per_round"][1:]]
    node_rss = [
        rec["peak_rss_bytes"] for rec in metrics["nodes"].values() if "peak_rss_bytes" in rec
    ]
    runner_rss = usage.ru_maxrss * 1024  # Linux reports KiB
    per_node_rss = statistics.mean(node_rss) if node_rss else runner_rss / nodes
    final = metrics["summary"]["final"]
    extra_fields: dict[str, Any] = {}
    if breakdown:
        extra_fields = {
            "hidden": hidden,
            "heartbeat_interval": heartbeat,
            "breakdown_s": _breakdown(metrics, json.loads((out / "records.json").read_text())),
        }
    return {
        "mode": mode,
        "topology": kind,
        "nodes": nodes,
        "rounds": rounds,
        **extra_fields,
        "round_s": statistics.mean(steady) if steady else None,
        "wall_s": metrics["wall_seconds"],
        "command_s": round(elapsed, 3),
        # The child's CPU seconds (whole run): steadier than wall time on a shared machine.
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_per_node_mb": per_node_rss / 2**20,
        "runner_peak_rss_mb": runner_rss / 2**20,
        "final_accuracy_mean": final["accuracy_mean"],
        "bytes_sent_total": final["bytes_sent_total"],
    }


def _breakdown(metrics: dict[str, Any], records: dict[str, float]) -> dict[str, float]:
    """Seconds of one steady round by where they went (see the module docstring)."""
    per_round = metrics["summary"]["per_round"]
    steady = {r["round"] for r in per_round[1:]}
    sums = dict.fromkeys(STEADY, 0.0)
    for rec in metrics["nodes"].values():
        for row in rec["rounds"]:
            if row["round"] in steady:
                for key in STEADY:
                    sums[key] += row.get("timing", {}).get(key, 0.0)
    n = max(len(steady), 1)
    out = {key.removesuffix("_s"): sums[key] / n for key in STEADY}
    # Records are timed over the whole run; their evaluations are the rows' eval_s.
    evals = sum(
        row.get("timing", {}).get("eval_s", 0.0)
        for rec in metrics["nodes"].values()
        for row in rec["rounds"]
    )
    rounds = max(len(per_round), 1)
    out["records"] = max(0.0, records["records_s"] - evals) / rounds
    round_s = statistics.mean(r["seconds_mean"] for r in per_round[1:]) if steady else 0.0
    out["rest"] = max(0.0, round_s - sum(out.values()))
    return {key: round(value, 4) for key, value in out.items()}


def child(scenario_file: Path, out: Path) -> None:
    """Run one in-process scenario with its records timed (records.json): a record's
    work (evaluation, metrics line, checkpoint) and its event-loop part (history, the
    round's log line); checkpoints also on their own."""
    import p2pfl.node.learner as learner
    from p2pfl.scenario.cli import run_scenario
    from p2pfl.scenario.schema import load_scenario

    spent = {"records_s": 0.0, "checkpoints_s": 0.0, "checkpoints": 0}

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - started
                if key == "checkpoints_s":
                    spent["checkpoints"] += 1

        return wrapper

    names = vars(learner)  # the learner's own reference to save_checkpoint
    names["save_checkpoint"] = timed(names["save_checkpoint"], "checkpoints_s")
    for method in ("_record_work", "_finish_record"):
        setattr(learner.Learner, method, timed(getattr(learner.Learner, method), "records_s"))
    run_scenario(load_scenario(scenario_file), out, in_process=True, show_progress=False)
    (out / "records.json").write_text(json.dumps(spent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer points")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--full-mesh", action="store_true", help="add full-mesh rows")
    parser.add_argument("--scale-only", action="store_true", help="only the scale rows")
    parser.add_argument(
        "--scale-nodes", default="100,300,1000", help="in-process sizes of the scale rows"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="the scale rows' checkpoint_every (default: the in-process default, 0)",
    )
    parser.add_argument(
        "--no-heartbeat-row",
        dest="heartbeat_row",
        action="store_false",
        help="skip the largest scale size's second run with 5 s heartbeats",
    )
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rounds = args.rounds or (3 if args.quick else 6)
    points = [("in-process", n, "kregular") for n in (8, 32, 100)]
    points += [("processes", n, "kregular") for n in (8, 16)]
    if args.full_mesh:
        points += [("in-process", n, "full") for n in (8, 32, 100)]
        points += [("processes", n, "full") for n in (8, 16)]
    if args.quick:
        points = [p for p in points if p[1] <= 32]
    if args.scale_only:
        points = []
    scale_sizes = [int(n) for n in args.scale_nodes.split(",") if n.strip()]
    console = Console(width=None if sys.stdout.isatty() else 120)  # a log keeps whole columns
    results = []
    scale = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for mode, n, kind in points:
            console.print(f"running {mode} {kind} N={n} ...", style="dim")
            results.append(run_point(mode, n, rounds, kind, Path(tmp)))
        # The largest size once more with 5 s heartbeats: what the 1 s ones cost.
        scale_points = [(n, 1.0) for n in scale_sizes]
        scale_points += [(max(scale_sizes), 5.0)] if scale_sizes and args.heartbeat_row else []
        for n, beat in scale_points:
            console.print(f"running in-process kregular N={n} (scale, {beat:g} s heartbeats)")
            scale.append(
                run_point(
                    "in-process",
                    n,
                    rounds,
                    "kregular",
                    Path(tmp),
                    hidden=SCALE_HIDDEN,
                    breakdown=True,
                    checkpoint_every=args.checkpoint_every,
                    heartbeat_interval=beat,
                )
            )
    if results:
        _print_rows(console, results, rounds)
    if scale:
        _print_scale(console, scale, rounds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "bench_scale",
        "rounds": rounds,
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),  # other work on the machine inflates wall times
        "baseline": "in-process kregular N=8",
        "results": results,
        "scale": scale,
        "scale_targets": {"round_s": 1.0, "runner_peak_rss_mb": 400},
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


def _print_scale(console: Console, scale: list[dict[str, Any]], rounds: int) -> None:
    parts = ("train", "aggregate", "eval", "encode", "records", "rest")
    table = Table(
        title=f"in-process scale, 4-regular, {SCALE_HIDDEN}-hidden MLP, {rounds} rounds: "
        "seconds of a steady round (target <= 1 s, <= 400 MiB at 1000 nodes)"
    )
    for col in ("N", "beat s", "s/round", "RSS MiB", *parts, "CPU s", "acc"):
        table.add_column(col, justify="right")
    for r in scale:
        b = r["breakdown_s"]
        table.add_row(
            str(r["nodes"]),
            f"{r['heartbeat_interval']:g}",
            f"{r['round_s']:.3f}" if r["round_s"] is not None else "-",
            f"{r['runner_peak_rss_mb']:.0f}",
            *(f"{b[p]:.3f}" for p in parts),
            f"{r['cpu_s']:.1f}",
            f"{r['final_accuracy_mean']:.3f}" if r["final_accuracy_mean"] is not None else "-",
        )
    console.print(table)
    console.print(
        "rest = messaging (the other messages, heartbeats, handlers) + trio scheduling",
        style="dim",
    )


def _print_rows(console: Console, results: list[dict[str, Any]], rounds: int) -> None:
    base = results[0]
    table = Table(title=f"scenario scaling ({rounds} rounds, {os.cpu_count()} CPUs)")
    for col in ("mode", "graph", "N", "round s", "x base", "wall s", "RSS/node MB", "acc"):
        table.add_column(col, justify="right")
    for r in results:
        ratio = r["round_s"] / base["round_s"] if r["round_s"] and base["round_s"] else None
        table.add_row(
            r["mode"],
            r["topology"],
            str(r["nodes"]),
            f"{r['round_s']:.3f}" if r["round_s"] is not None else "-",
            f"{ratio:.1f}" if ratio is not None else "-",
            f"{r['wall_s']:.1f}",
            f"{r['peak_rss_per_node_mb']:.1f}",
            f"{r['final_accuracy_mean']:.3f}" if r["final_accuracy_mean"] is not None else "-",
        )
    console.print(table)


if __name__ == "__main__":
    main()
