"""`p2pfl scenario run FILE`: the command-line front of the scenario runners.

`p2pfl/cli.py` calls `add_scenario_arguments(subparsers)` with the subparsers of its
`scenario` command and dispatches to `run_scenario_cli(args)` (also set as `func`).
Exit codes: 0 success, 1 run failed (message says why), 2 usage error (a bad scenario
file, or one the chosen runner cannot run, such as crash faults with --in-process),
130 interrupted (all nodes stopped). Every run that started leaves a `metrics.json`,
marked `"complete": false` when it did not finish.
Everything heavy (trio, the node, matplotlib) is imported only when a run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.scenario.schema import RunFailed, Scenario, ScenarioError, load_scenario

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_BAD_FILE, EXIT_INTERRUPTED = 0, 1, 2, 130
MANY_PROCESSES = 32


def add_scenario_arguments(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register the scenario actions (`run`) on the `p2pfl scenario` subparsers."""
    run = subparsers.add_parser(
        "run",
        help="run a scenario file",
        description="Start every node of the scenario, watch the rounds, stop the nodes, "
        "then write metrics.json and a plot (accuracy.png, or <metric>.png for a model "
        "without accuracy) and print a summary table.",
    )
    run.add_argument("file", type=Path, help="scenario TOML file (see docs/scenarios.md)")
    run.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/<name>-<timestamp>)"
    )
    run.add_argument(
        "--in-process",
        action="store_true",
        help="run all nodes in this process on the in-memory transport (for large N)",
    )
    run.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="one Ray actor per node (extra p2pfl[ray]); ADDRESS as ray.init takes it "
        "('auto', HOST:6379), none starts a local Ray",
    )
    run.add_argument("--json", action="store_true", help="print a JSON result on stdout only")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default from rounds and round_timeout)",
    )
    run.set_defaults(func=run_scenario_cli)


def default_out_dir(scenario: Scenario) -> Path:
    return Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_scenario(
    scenario: Scenario,
    out: Path,
    *,
    in_process: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    timeout: float | None = None,
    ray: str | None = None,
) -> dict[str, Any]:
    """Run, then write the report; returns the metrics document. Raises RunFailed.

    `ray`: None = not on Ray; "" = a local Ray; else the address of a Ray cluster."""
    from p2pfl.scenario.report import RoundProgress, preload_plotting, write_report

    preload_plotting()
    con = console
    progress = (
        RoundProgress(con, scenario.name, scenario.rounds, scenario.nodes)
        if show_progress and con is not None
        else None
    )
    mode = "in-process" if in_process else "processes" if ray is None else "ray"
    started = time.monotonic()
    try:
        with progress if progress is not None else contextlib.nullcontext():
            if in_process:
                from p2pfl.scenario.inprocess import run_in_process

                nodes, wall = run_in_process(scenario, out, progress=progress, timeout=timeout)
            elif ray is not None:
                from p2pfl.scenario.ray_runner import run_ray

                nodes, wall = run_ray(
                    scenario, out, address=ray, progress=progress, timeout=timeout
                )
            else:
                from p2pfl.scenario.processes import run_processes

                nodes, wall = run_processes(scenario, out, progress=progress, timeout=timeout)
    except (Exception, KeyboardInterrupt):
        # Any failure, also an unexpected one (a spawn's OSError): the docs promise a
        # partial metrics.json, and the run's cause is re-raised untouched.
        _write_partial(out, scenario, time.monotonic() - started, mode)
        raise
    return write_report(out, scenario, nodes, wall_seconds=wall, mode=mode, console=con)


def _write_partial(out: Path, scenario: Scenario, wall: float, mode: str) -> None:
    """Best effort: report the rounds that did finish; never hides the original error.

    Written even when no round finished (a failure before round 0, an early Ctrl-C): a
    `metrics.json` with `"complete": false` and zero rounds tells a script reading the
    output folder that the run started and stopped, where a missing file looks like a
    run that never began (or is still going).
    """
    from p2pfl.scenario.report import records_from_disk, write_report

    try:
        out.mkdir(parents=True, exist_ok=True)
        nodes = records_from_disk(out, scenario.nodes)
        write_report(
            out, scenario, nodes, wall_seconds=wall, mode=mode, console=None, complete=False
        )
    except Exception:  # reporting on a failed run must never mask its cause
        pass


def _check_out_dir(out: Path, scenario: Scenario, in_process: bool) -> str | None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return f"output folder {out} already exists and is not empty (nodes would resume from it)"
    if not in_process:
        from p2pfl.control import SOCKET_NAME, socket_path_too_long

        deepest = out.resolve() / "nodes" / f"n{scenario.nodes - 1}" / SOCKET_NAME
        problem = socket_path_too_long(deepest)
        if problem is not None:
            return f"{problem}; choose a shorter --out"
    return None


def run_scenario_cli(args: argparse.Namespace) -> int:
    """Entry point for `p2pfl scenario run`; returns the process exit code."""
    as_json: bool = args.json
    try:
        scenario = load_scenario(args.file)
    except ScenarioError as exc:
        return _fail(as_json, f"{args.file}: {exc}", EXIT_BAD_FILE)
    if args.in_process:
        from p2pfl.scenario.faults import in_process_problem

        # The file is fine, the runner chosen for it is not: a usage error (2), told
        # before anything starts, not a run that failed (1).
        unsupported = in_process_problem(scenario.faults)
        if unsupported is not None:
            return _fail(as_json, f"{args.file}: {unsupported}", EXIT_BAD_FILE)
    out = (args.out or default_out_dir(scenario)).resolve()
    problem = _check_out_dir(out, scenario, args.in_process)
    if problem is not None:
        return _fail(as_json, problem, EXIT_FAILED)

    from rich.console import Console

    console = None if (as_json or args.quiet) else Console()
    if args.ray is not None and args.in_process:
        return _fail(as_json, "--ray and --in-process exclude each other", EXIT_BAD_FILE)
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            msg = "--ray needs Ray: pip install 'p2pfl[ray]'"
            return _fail(as_json, msg, EXIT_BAD_FILE)
    many = not args.in_process and args.ray is None and scenario.nodes > MANY_PROCESSES
    if console is not None and many:
        console.print(
            f"note: {scenario.nodes} node processes on {os.cpu_count()} CPUs; "
            "--in-process runs large scenarios much faster"
        )
    try:
        metrics = run_scenario(
            scenario,
            out,
            in_process=args.in_process,
            console=console,
            show_progress=console is not None and not args.quiet,
            timeout=args.timeout,
            ray=args.ray,
        )
    except RunFailed as exc:
        return _fail(as_json, f"scenario {scenario.name!r} failed: {exc}", EXIT_FAILED, out)
    except KeyboardInterrupt:
        msg = f"interrupted: all nodes stopped; partial outputs in {out}"
        return _fail(as_json, msg, EXIT_INTERRUPTED, out)
    final = metrics["summary"]["final"]
    if as_json:
        doc = {"ok": True, "out": str(out), "wall_seconds": metrics["wall_seconds"], **final}
        print(json.dumps(doc))
    elif args.quiet:
        metric, value = final.get("metric") or "accuracy", final.get("metric_mean")
        print(
            f"{scenario.name}: {scenario.nodes} nodes, {scenario.rounds} rounds, "
            f"final mean {metric} {'-' if value is None else f'{value:.3f}'}, "
            f"{metrics['wall_seconds']:.1f} s; outputs in {out}"
        )
    return EXIT_OK


def _fail(as_json: bool, message: str, code: int, out: Path | None = None) -> int:
    if as_json:
        doc: dict[str, Any] = {"ok": False, "error": message, "exit_code": code}
        if out is not None:
            doc["out"] = str(out)
        print(json.dumps(doc))
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m p2pfl.scenario.cli run FILE`), same as `p2pfl scenario`."""
    parser = argparse.ArgumentParser(prog="p2pfl scenario")
    add_scenario_arguments(parser.add_subparsers(dest="scenario_command", required=True))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_scenario_cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
