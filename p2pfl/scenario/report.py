"""Scenario outputs: `metrics.json`, a summary table on the console, `accuracy.png`.

Both runners hand over the same thing, a mapping node name -> {"peer_id", "rounds"}
where rounds are the node's per-round rows (as in its metrics.jsonl), so the report
never knows whether the nodes were processes or coroutines. matplotlib is optional
and imported only when plotting.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl.scenario.faults import fault_table, mark_faults, report_timeline
from p2pfl.scenario.schema import Scenario

MAX_TABLE_ROWS = 25
NodeRecord = Mapping[str, Any]


def build_metrics(
    scenario: Scenario,
    nodes: Mapping[str, NodeRecord],
    *,
    wall_seconds: float,
    mode: str,
    complete: bool = True,
) -> dict[str, Any]:
    """The whole `metrics.json` document (rows sorted by round, summary computed).

    Every node is marked with its role; accuracies in the summary are the honest nodes'
    only (a malicious node's own accuracy says nothing about the attack's effect).
    """
    clean = {
        name: {
            **dict(rec),
            "role": _role(scenario, name),
            "rounds": sorted(_rows(rec), key=lambda r: int(r.get("round", 0))),
        }
        for name, rec in sorted(nodes.items(), key=lambda kv: _node_order(kv[0]))
    }
    honest = [n for n, rec in clean.items() if rec["role"] == "honest"]
    summary = summarize({n: rec["rounds"] for n, rec in clean.items()}, wall_seconds, honest)
    summary["malicious_nodes"] = [n for n in clean if n not in honest]
    faults = {"faults": report_timeline(scenario.faults, clean)} if scenario.faults else {}
    return {
        "scenario": scenario.to_dict(),
        "mode": mode,
        "complete": complete,
        "nodes": clean,
        "summary": summary,
        **faults,
        "wall_seconds": round(wall_seconds, 3),
    }


def _role(scenario: Scenario, name: str) -> str:
    index, _ = _node_order(name)
    return scenario.role(index)


def records_from_disk(out: Path, nodes: int) -> dict[str, dict[str, Any]]:
    """Node records rebuilt from `<out>/nodes/n<i>/metrics.jsonl`, for a run that failed.

    Nodes append a line per finished round, so this works whatever killed the run.
    """
    records: dict[str, dict[str, Any]] = {}
    for i in range(nodes):
        rows = []
        path = out / "nodes" / f"n{i}" / "metrics.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and "round" in row:
                rows.append(row)
        records[f"n{i}"] = {"peer_id": None, "rounds": rows}
    return records


def _rows(rec: NodeRecord) -> list[dict[str, Any]]:
    return [dict(r) for r in rec.get("rounds", ()) if isinstance(r, Mapping) and "round" in r]


def _node_order(name: str) -> tuple[int, str]:
    digits = name.lstrip("n")
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _stats(values: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None
    return sum(vals) / len(vals), min(vals), max(vals)


def summarize(
    rows_by_node: Mapping[str, Sequence[Mapping[str, Any]]],
    wall: float,
    honest: Collection[str] | None = None,
) -> dict[str, Any]:
    """Per-round mean/min/max accuracy across nodes, and the final state of every node.

    Accuracy and loss count only the `honest` nodes (default: all); traffic and round
    counts include everyone.
    """
    counted = set(rows_by_node if honest is None else honest)
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    scored: dict[int, list[Mapping[str, Any]]] = {}
    for name, rows in rows_by_node.items():
        for row in rows:
            by_round.setdefault(int(row["round"]), []).append(row)
            if name in counted:
                scored.setdefault(int(row["round"]), []).append(row)
    per_round = []
    for r in sorted(by_round):
        rows = by_round[r]
        mean, lo, hi = _stats(_num(x.get("accuracy")) for x in scored.get(r, ()))
        loss, _, _ = _stats(_num(x.get("loss")) for x in scored.get(r, ()))
        secs, _, _ = _stats(_num(x.get("seconds")) for x in rows)
        per_round.append(
            {
                "round": r,
                "nodes": len(rows),
                "accuracy_mean": mean,
                "accuracy_min": lo,
                "accuracy_max": hi,
                "loss_mean": loss,
                "seconds_mean": secs,
                "bytes_sent": int(sum(_num(x.get("bytes_sent")) or 0 for x in rows)),
            }
        )
    last = [rows[-1] for rows in rows_by_node.values() if rows]
    last_scored = [rows[-1] for n, rows in rows_by_node.items() if rows and n in counted]
    mean, lo, hi = _stats(_num(x.get("accuracy")) for x in last_scored)
    completed = [len(rows) for rows in rows_by_node.values()]
    return {
        "per_round": per_round,
        "final": {
            "accuracy_mean": mean,
            "accuracy_min": lo,
            "accuracy_max": hi,
            "rounds_completed_min": min(completed, default=0),
            "rounds_completed_max": max(completed, default=0),
            "bytes_sent_total": int(sum(_num(x.get("bytes_sent")) or 0 for x in last)),
            "bytes_received_total": int(sum(_num(x.get("bytes_received")) or 0 for x in last)),
        },
        "wall_seconds": round(wall, 3),
        "honest_nodes": len(counted),
    }


def write_metrics(out: Path, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics.json` atomically (a reader never sees half a file)."""
    path = out / "metrics.json"
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _fmt_acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # unreachable, keeps mypy happy


def summary_table(metrics: Mapping[str, Any]) -> Table:
    """Per-round table (sampled when long) with the final numbers as its caption."""
    summary = metrics["summary"]
    rows = summary["per_round"]
    if len(rows) > MAX_TABLE_ROWS:
        step = math.ceil(len(rows) / (MAX_TABLE_ROWS - 1))
        rows = [*rows[:-1:step], rows[-1]]
    name = metrics.get("scenario", {}).get("name", "scenario")
    title = f"{name}: {len(metrics.get('nodes', {}))} nodes ({metrics.get('mode')})"
    bad = summary.get("malicious_nodes") or []
    if bad:
        names = ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else "")
        title += f"\n{len(bad)} malicious ({names}); accuracy over honest nodes only"
    table = Table(title=title)
    for col in ("round", "nodes", "acc mean", "acc min", "acc max", "loss", "sent (all)"):
        table.add_column(col, justify="right")
    for r in rows:
        loss = r["loss_mean"]
        table.add_row(
            str(r["round"]),
            str(r["nodes"]),
            _fmt_acc(r["accuracy_mean"]),
            _fmt_acc(r["accuracy_min"]),
            _fmt_acc(r["accuracy_max"]),
            "-" if loss is None else f"{loss:.3f}",
            format_bytes(r["bytes_sent"]),
        )
    f = summary["final"]
    table.caption = (
        f"final accuracy mean {_fmt_acc(f['accuracy_mean'])} "
        f"(min {_fmt_acc(f['accuracy_min'])}, max {_fmt_acc(f['accuracy_max'])}); "
        f"sent {format_bytes(f['bytes_sent_total'])}, "
        f"received {format_bytes(f['bytes_received_total'])}; "
        f"wall {metrics['wall_seconds']:.1f} s"
    )
    return table


_preloader: threading.Thread | None = None


def _import_matplotlib() -> None:
    with contextlib.suppress(Exception):  # missing or broken: plot_accuracy reports it
        import matplotlib.backends.backend_agg
        import matplotlib.collections
        import matplotlib.figure  # noqa: F401


def preload_plotting() -> None:
    """Start importing matplotlib in a background thread (~0.7 s) while the nodes run,
    so the plot at the end costs only the drawing."""
    global _preloader
    if _preloader is None:
        _preloader = threading.Thread(target=_import_matplotlib, name="preload-mpl", daemon=True)
        _preloader.start()


def plot_accuracy(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Thin line per node, thick mean line; None (and no file) if matplotlib is missing.

    Uses the object API with the Agg canvas, not pyplot: no global state, no GUI
    backend probing, and one LineCollection keeps 100 nodes as fast as 8.
    """
    if _preloader is not None:
        _preloader.join()
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines: dict[str, list[list[tuple[float, float]]]] = {"honest": [], "malicious": []}
    for rec in metrics["nodes"].values():
        pts = [
            (float(r["round"]), acc)
            for r in rec["rounds"]
            if (acc := _num(r.get("accuracy"))) is not None
        ]
        if pts:
            lines["malicious" if rec.get("role") == "malicious" else "honest"].append(pts)
    for role, color in (("honest", "tab:blue"), ("malicious", "tab:gray")):
        if lines[role]:
            style = "solid" if role == "honest" else "dashed"
            collection = LineCollection(
                lines[role], linewidths=0.7, alpha=0.35, colors=color, linestyles=style
            )
            ax.add_collection(collection)
    means = [
        (r["round"], r["accuracy_mean"])
        for r in metrics["summary"]["per_round"]
        if r["accuracy_mean"] is not None
    ]
    if means:
        xs, ys = zip(*means, strict=True)
        label = "honest mean" if metrics["summary"].get("malicious_nodes") else "mean"
        ax.plot(xs, ys, color="tab:red", linewidth=2.5, label=label, marker="o", markersize=3)
        ax.legend(loc="lower right")
    if metrics.get("faults"):
        mark_faults(ax, metrics["faults"])  # vertical lines and labels at the fault rounds
    ax.autoscale_view()
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{metrics.get('scenario', {}).get('name', 'scenario')}: accuracy per node")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_report(
    out: Path,
    scenario: Scenario,
    nodes: Mapping[str, NodeRecord],
    *,
    wall_seconds: float,
    mode: str,
    console: Console | None,
    complete: bool = True,
) -> dict[str, Any]:
    """metrics.json + accuracy.png, and the table on `console` (None = print nothing)."""
    metrics = build_metrics(
        scenario, nodes, wall_seconds=wall_seconds, mode=mode, complete=complete
    )
    write_metrics(out, metrics)
    png = plot_accuracy(metrics, out / "accuracy.png")
    if console is not None:
        console.print(summary_table(metrics))
        if metrics.get("faults"):
            console.print(fault_table(metrics["faults"]))
        if png is None:
            console.print("[yellow]matplotlib is not installed: accuracy.png skipped[/]")
        console.print(f"outputs in {out}/ (metrics.json{', accuracy.png' if png else ''})")
    return metrics


class RoundProgress:
    """Progress bar over rounds: the slowest node's completed rounds, plus the mean accuracy.

    Both runners feed it the same way, so the bar looks the same for processes and
    in-process runs. Use as a context manager around the run.
    """

    def __init__(self, console: Console, name: str, rounds: int, nodes: int) -> None:
        self._name = name
        self._nodes = nodes
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
        )
        self._task = self._progress.add_task(
            f"{name} ({nodes} nodes)", total=rounds, note="starting nodes..."
        )

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, completed_min: int, accuracies: Sequence[float]) -> None:
        note = ""
        if accuracies:
            mean = sum(accuracies) / len(accuracies)
            note = f"mean acc {mean:.3f}"
            if len(accuracies) < self._nodes:
                note += f" ({len(accuracies)}/{self._nodes} nodes)"
        self._progress.update(self._task, completed=completed_min, note=note)
