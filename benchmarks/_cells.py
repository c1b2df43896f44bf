"""What the scenario benchmarks share: one run of a scenario, a grid of them, the JSON.

A benchmark script owns its question (the scenario it varies, the numbers it keeps
from each run, its table); the mechanics of getting those numbers are the same
everywhere and live here, so that every script measures a cell the same way:

- `run_cell_in_process`: one scenario document run by the real Node code in this
  process (in-memory transport), in a throwaway folder, with its metrics;
- `counting_fallbacks`: how often the aggregation rules fell back to the median;
- `chosen`, `run_grid`: which parts of a grid to run (`--only`); its cells in a pool of
  fresh processes, a progress line per finished one;
- `merge_results`: the results file updated in place, older runs kept unless replaced;
- `run_cli_scenario`, `update_bytes`, `write_rows`: the same through the `p2pfl
  scenario run --in-process` command, for benchmarks that need a child process.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import subprocess
import tempfile
import time
from argparse import ArgumentParser, Namespace
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from p2pfl.scenario import Scenario, parse_scenario
from p2pfl.scenario.inprocess import run_in_process
from p2pfl.scenario.report import build_metrics

Cell = TypeVar("Cell")
Result = dict[str, Any]


def run_cell_in_process(
    doc: dict[str, Any], *, base_dir: Path | None = None
) -> tuple[Scenario, dict[str, Any], float]:
    """Parse `doc`, run it in-process in a temporary folder; (scenario, metrics, wall s).

    The wall time is the run's alone (not the parsing), and goes into the metrics."""
    scenario = parse_scenario(doc, base_dir=base_dir)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        records, _ = run_in_process(scenario, Path(tmp))
    wall = time.monotonic() - started
    return scenario, build_metrics(scenario, records, wall_seconds=wall, mode="in-process"), wall


class FallbackCounter(logging.Handler):
    """Counts the aggregation rules' "falling back" (to the median) log lines."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "falling back" in record.getMessage():
            self.count += 1


@contextmanager
def counting_fallbacks(*, every: bool = False) -> Iterator[FallbackCounter]:
    """Count fallbacks to the median while the block runs. A rule warns the first time
    per node and input count and logs later ones at debug: by default only the
    warnings are counted (nodes that ever fell back), with `every` each aggregation."""
    counter = FallbackCounter(logging.DEBUG if every else logging.WARNING)
    agg_log = logging.getLogger("p2pfl.aggregation")
    saved_level = agg_log.level
    agg_log.addHandler(counter)
    if every:
        agg_log.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        agg_log.removeHandler(counter)
        agg_log.setLevel(saved_level)


def chosen(parser: ArgumentParser, only: str, known: Collection[str], what: str) -> list[str]:
    """The names in a comma-separated `--only` value; an unknown one is a usage error."""
    names = [name for name in only.split(",") if name]
    unknown = set(names) - set(known)
    if unknown:
        parser.error(f"unknown {what} {sorted(unknown)}; choose from {', '.join(known)}")
    return names


def run_grid(
    run_cell: Callable[[Cell], Result],
    todo: list[Cell],
    jobs: int,
    describe: Callable[[Result], str],
) -> list[Result]:
    """Every cell of `todo` in `jobs` fresh ("spawn") processes, in the order they finish;
    `describe(result)` is printed after "[i/n]" as each one does. `run_cell` must be a
    module-level function (the pool pickles it by name)."""
    results: list[Result] = []
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(run_cell, todo), 1):
            results.append(r)
            print(f"[{i}/{len(todo)}] {describe(r)}", flush=True)
    return results


def merge_results(
    path: Path, results: list[Result], *, replaced: Callable[[Result], bool]
) -> list[Result]:
    """Write `{"results": [...]}` to `path`: the results already there that are not
    `replaced` by this run, then this run's. Returns that list."""
    previous = json.loads(path.read_text())["results"] if path.exists() else []
    merged = [r for r in previous if not replaced(r)] + results
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"results": merged}, indent=1) + "\n")
    return merged


def run_cli_scenario(command: list[str], text: str, tag: str, work: Path) -> dict[str, Any]:
    """Write scenario `text` to work/<tag>.toml, run `command scenario run --in-process`
    on it (output in work/<tag>) and return its metrics.json."""
    scenario = work / f"{tag}.toml"
    scenario.write_text(text)
    out = work / tag
    cmd = [*command, "scenario", "run", "--in-process", "--quiet"]
    subprocess.run([*cmd, "--out", str(out), str(scenario)], check=True, stdout=subprocess.DEVNULL)
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


def update_bytes(metrics: dict[str, Any]) -> tuple[list[int], int]:
    """Every node-round's `update_wire_bytes` (what its model message took on the wire),
    and the size of one uncompressed float32 update."""
    wire = [r["update_wire_bytes"] for node in metrics["nodes"].values() for r in node["rounds"]]
    return wire, metrics["nodes"]["n0"]["rounds"][0]["update_raw_bytes"]


def write_rows(path: Path, args: Namespace, started: float, rows: list[Result]) -> None:
    """Write `{"settings", "seconds", "rows"}`: the command-line settings, the seconds
    since `started` (time.perf_counter) and the table's rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
