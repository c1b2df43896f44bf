"""Scenario outputs: `metrics.json`, a summary table on the console, a plot.

Both runners hand over the same thing, a mapping node name -> {"peer_id", "rounds"}
where rounds are the node's per-round rows (as in its metrics.jsonl), so the report
never knows whether the nodes were processes or coroutines. The report shows whatever
metrics the model reports (p2pfl.metrics picks the primary one: accuracy, else loss);
the plot is `<primary metric>.png`, so `accuracy.png` for classification and `loss.png`
for a regression model. matplotlib is optional and imported only when plotting.
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

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from p2pfl.metrics import (
    fmt_metric,
    higher_is_better,
    metric_names,
    number,
    primary_metric,
    row_metrics,
    row_timing,
    timing_text,
)
from p2pfl.scenario.faults import fault_table, mark_faults, report_timeline
from p2pfl.scenario.schema import Scenario
from p2pfl.units import format_bytes

MAX_TABLE_ROWS = 25
PROGRESS_BAR_WIDTH = 10
BYTE_COUNTERS = ("bytes_sent", "bytes_received")
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

    Every node is marked with its role and its final metrics; metrics in the summary are
    the honest nodes' only (a malicious node's own accuracy says nothing about the attack's
    effect).
    """
    clean = {
        name: {
            **dict(rec),
            "role": _role(scenario, name),
            "rounds": sorted(_rows(rec), key=lambda r: int(r.get("round", 0))),
        }
        for name, rec in sorted(nodes.items(), key=lambda kv: _node_order(kv[0]))
    }
    for rec in clean.values():
        rec["final_metrics"] = row_metrics(rec["rounds"][-1]) if rec["rounds"] else {}
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


_num = number


def _stats(values: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None
    return sum(vals) / len(vals), min(vals), max(vals)


def _metric_stats(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> dict[str, tuple[float | None, float | None, float | None]]:
    """name -> (mean, min, max) over the rows that report it."""
    values = [row_metrics(x) for x in rows]
    return {name: _stats(v.get(name) for v in values) for name in names}


def _timing_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean seconds per phase (train_s, encode_s, ...) over the rows that timed it."""
    collected: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row_timing(row).items():
            collected.setdefault(key, []).append(value)
    return {key: round(sum(vs) / len(vs), 6) for key, vs in collected.items()}


def summarize(
    rows_by_node: Mapping[str, Sequence[Mapping[str, Any]]],
    wall: float,
    honest: Collection[str] | None = None,
) -> dict[str, Any]:
    """Per-round mean/min/max of every metric across nodes, and the final state of every node.

    Metrics count only the `honest` nodes (default: all); traffic, timing and round counts
    include everyone. `accuracy_*`/`loss_mean` stay as before (None when not reported);
    `metrics_mean/min/max` hold every metric by name and `primary_metric` names the one
    the table and the plot lead with.
    """
    counted = set(rows_by_node if honest is None else honest)
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    scored: dict[int, list[Mapping[str, Any]]] = {}
    for name, rows in rows_by_node.items():
        for row in rows:
            by_round.setdefault(int(row["round"]), []).append(row)
            if name in counted:
                scored.setdefault(int(row["round"]), []).append(row)
    names = metric_names(row for rows in scored.values() for row in rows)
    primary = primary_metric(names)
    traffic = cumulative_traffic(rows_by_node, sorted(by_round))
    per_round = []
    for r in sorted(by_round):
        rows = by_round[r]
        stats = _metric_stats(scored.get(r, ()), names)
        mean, lo, hi = stats.get("accuracy", (None, None, None))
        secs, _, _ = _stats(_num(x.get("seconds")) for x in rows)
        per_round.append(
            {
                "round": r,
                "nodes": len(rows),
                "accuracy_mean": mean,
                "accuracy_min": lo,
                "accuracy_max": hi,
                "loss_mean": stats.get("loss", (None,))[0],
                "metrics_mean": {n: st[0] for n, st in stats.items()},
                "metrics_min": {n: st[1] for n, st in stats.items()},
                "metrics_max": {n: st[2] for n, st in stats.items()},
                "seconds_mean": secs,
                "timing_mean": _timing_means(rows),
                "bytes_sent": traffic[r]["bytes_sent"],
                **_round_epsilon(rows),
            }
        )
    last_scored = [rows[-1] for n, rows in rows_by_node.items() if rows and n in counted]
    final_stats = _metric_stats(last_scored, names)
    mean, lo, hi = final_stats.get("accuracy", (None, None, None))
    p_mean, p_lo, p_hi = final_stats.get(primary or "", (None, None, None))
    completed = [len(rows) for rows in rows_by_node.values()]
    totals = cumulative_traffic(rows_by_node, [max(by_round, default=0)])[max(by_round, default=0)]
    return {
        "metrics": names,
        "primary_metric": primary,
        "per_round": per_round,
        "final": {
            "accuracy_mean": mean,
            "accuracy_min": lo,
            "accuracy_max": hi,
            "metric": primary,
            "metric_mean": p_mean,
            "metric_min": p_lo,
            "metric_max": p_hi,
            "metrics_mean": {n: st[0] for n, st in final_stats.items()},
            "timing_mean": _timing_means([row for rows in by_round.values() for row in rows]),
            "rounds_completed_min": min(completed, default=0),
            "rounds_completed_max": max(completed, default=0),
            "bytes_sent_total": totals["bytes_sent"],
            "bytes_received_total": totals["bytes_received"],
        },
        "wall_seconds": round(wall, 3),
        "honest_nodes": len(counted),
        "rule_events": rule_events(rows_by_node),
        **privacy_summary(rows_by_node),
    }


def cumulative_traffic(
    rows_by_node: Mapping[str, Sequence[Mapping[str, Any]]], rounds: Sequence[int]
) -> dict[int, dict[str, int]]:
    """Bytes sent and received by all nodes together up to each of `rounds`, never less
    than at an earlier round.

    A node's rows carry its process's running totals, so summing the rows of one round
    loses a node that is down in that round (no row), and a restarted node counts from
    zero again. Instead each node contributes its latest total at or before the round,
    and a total that drops (a new process) continues from where the old one ended.
    """
    wanted = sorted(set(rounds))
    out = {r: dict.fromkeys(BYTE_COUNTERS, 0) for r in wanted}
    for rows in rows_by_node.values():
        ordered = sorted(rows, key=lambda row: int(row["round"]))
        base = dict.fromkeys(BYTE_COUNTERS, 0)  # what earlier processes of the node sent
        prev = dict.fromkeys(BYTE_COUNTERS, 0)  # the last total this process reported
        latest = dict.fromkeys(BYTE_COUNTERS, 0)
        k = 0
        for r in wanted:
            while k < len(ordered) and int(ordered[k]["round"]) <= r:
                for key in BYTE_COUNTERS:
                    value = int(_num(ordered[k].get(key)) or 0)
                    if value < prev[key]:  # restarted: its counters began again at zero
                        base[key] += prev[key]
                    prev[key] = value
                    latest[key] = base[key] + value
                k += 1
            for key in BYTE_COUNTERS:
                out[r][key] += latest[key]
    return out


def _epsilon(row: Mapping[str, Any]) -> float | None:
    privacy = row.get("privacy")
    return _num(privacy.get("epsilon")) if isinstance(privacy, Mapping) else None


def _round_epsilon(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The largest epsilon any node had spent by this round (only with privacy on)."""
    spent = [e for e in map(_epsilon, rows) if e is not None]
    return {"epsilon_max": max(spent)} if spent else {}


def privacy_summary(rows_by_node: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Every node's spent epsilon at its last row, the budget, and the nodes whose budget
    ran out ({} without privacy: reports of other runs stay as they were)."""
    last = {
        name: rows[-1]["privacy"]
        for name, rows in rows_by_node.items()
        if rows and isinstance(rows[-1].get("privacy"), Mapping)
    }
    if not last:
        return {}
    spent = {name: _num(p.get("epsilon")) for name, p in last.items()}
    finite = [e for e in spent.values() if e is not None]
    budgets = {b for p in last.values() if (b := _num(p.get("budget"))) is not None}
    return {
        "privacy": {
            "epsilon_by_node": spent,
            "epsilon_max": max(finite, default=None),
            "epsilon_min": min(finite, default=None),
            "budget": max(budgets) if budgets else None,
            "delta": next(iter(last.values())).get("delta"),
            "exhausted_nodes": sorted(
                (n for n, p in last.items() if p.get("exhausted") is True), key=_node_order
            ),
        }
    }


def rule_events(rows_by_node: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Node-rounds in which the aggregation rule fell back (`fallbacks`) or a guard
    changed or qualified what it did (`guards`), by reason, and the nodes concerned
    (`<kind>_nodes`; every node counts: an attacker's rule is a rule too)."""
    counts: dict[str, dict[str, int]] = {"fallbacks": {}, "guards": {}}
    nodes: dict[str, set[str]] = {"fallbacks": set(), "guards": set()}
    for name, rows in rows_by_node.items():
        for row in rows:
            rule = row.get("rule")
            if not isinstance(rule, Mapping):
                continue  # a row from before rule reports existed
            fallback = rule.get("fallback")
            keys = {
                "fallbacks": [fallback] if isinstance(fallback, str) else [],
                "guards": [k for k in rule.get("guards") or () if isinstance(k, str)],
            }
            for kind, found in keys.items():
                for key in found:
                    counts[kind][key] = counts[kind].get(key, 0) + 1
                    nodes[kind].add(name)
    return {
        **counts,
        **{f"{kind}_nodes": sorted(names, key=_node_order) for kind, names in nodes.items()},
    }


def write_metrics(out: Path, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics.json` atomically (a reader never sees half a file)."""
    path = out / "metrics.json"
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(v: float | None) -> str:
    return fmt_metric(v, 3)


def _short(name: str) -> str:
    """Column header for a metric ('accuracy' -> 'acc', as the table always said)."""
    return "acc" if name == "accuracy" else name


def summary_table(metrics: Mapping[str, Any]) -> Table:
    """Per-round table (sampled when long) with the final numbers as its caption.

    Columns: mean/min/max of the primary metric, then the mean of every other metric the
    model reports; the caption adds where a round's CPU went (mean per node and round).
    """
    summary = metrics["summary"]
    rows = summary["per_round"]
    if len(rows) > MAX_TABLE_ROWS:
        step = math.ceil(len(rows) / (MAX_TABLE_ROWS - 1))
        rows = [*rows[:-1:step], rows[-1]]
    names = _summary_names(summary)
    primary = names[0] if names else None
    others = names[1:]
    name = metrics.get("scenario", {}).get("name", "scenario")
    title = f"{name}: {len(metrics.get('nodes', {}))} nodes ({metrics.get('mode')})"
    bad = summary.get("malicious_nodes") or []
    if bad:
        names_bad = ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else "")
        title += (
            f"\n{len(bad)} malicious ({names_bad}); {primary or 'metrics'} over honest nodes only"
        )
    table = Table(title=title)
    cols = ["round", "nodes"]
    if primary is not None:
        p = _short(primary)
        cols += [f"{p} mean", f"{p} min", f"{p} max"]
    cols += [_short(n) for n in others]
    privacy = summary.get("privacy")
    if isinstance(privacy, Mapping):
        cols.append("eps max")
    for col in (*cols, "sent (all)"):
        table.add_column(col, justify="right")
    for r in rows:
        means, lows, highs = (
            r.get(k) or {} for k in ("metrics_mean", "metrics_min", "metrics_max")
        )
        cells = [str(r["round"]), str(r["nodes"])]
        if primary is not None:
            cells += [_fmt(_num(d.get(primary))) for d in (means, lows, highs)]
        cells += [_fmt(_num(means.get(n))) for n in others]
        if isinstance(privacy, Mapping):
            cells.append(_fmt(_num(r.get("epsilon_max"))))
        table.add_row(*cells, format_bytes(r["bytes_sent"]))
    f = summary["final"]
    finals = f.get("metrics_mean") or {}
    lines = []
    if primary is not None:
        head = (
            f"final {primary} mean {_fmt(_num(f.get('metric_mean')))} "
            f"(min {_fmt(_num(f.get('metric_min')))}, max {_fmt(_num(f.get('metric_max')))})"
        )
        head += "".join(f", {n} {_fmt(_num(finals.get(n)))}" for n in others)
        lines.append(head + "\n")
    lines.append(
        f"sent {format_bytes(f['bytes_sent_total'])}, "
        f"received {format_bytes(f['bytes_received_total'])}; "
        f"wall {metrics['wall_seconds']:.1f} s"
    )
    timing = timing_text(f.get("timing_mean") or {})
    if timing:
        lines.append(f"\nCPU per round: {timing}")
    # Process runs record each node's VmHWM (in-process nodes share one process: none).
    nodes = (metrics.get("nodes") or {}).values()
    rss = [n["peak_rss_bytes"] for n in nodes if n.get("peak_rss_bytes")]
    if rss:
        lines.append(
            f"\npeak RSS per node: mean {format_bytes(sum(rss) / len(rss))}, "
            f"max {format_bytes(max(rss))}"
        )
    if isinstance(privacy, Mapping):
        budget = _num(privacy.get("budget"))
        spent_out = privacy.get("exhausted_nodes") or []
        lines.append(
            f"\nprivacy: epsilon spent {_fmt(_num(privacy.get('epsilon_min')))}.."
            f"{_fmt(_num(privacy.get('epsilon_max')))} per node"
            + (f" of a budget of {_fmt(budget)}" if budget is not None else "")
            + f" at delta {privacy.get('delta')}"
            + (f"; budget spent on {len(spent_out)} nodes" if spent_out else "")
        )
    idle = {
        name: sum(1 for row in n.get("rounds") or () if row.get("trained") is False)
        for name, n in (metrics.get("nodes") or {}).items()
    }
    if any(idle.values()):
        lines.append(
            f"\nparticipation: {sum(idle.values())} node-rounds sat out on "
            f"{sum(1 for v in idle.values() if v)} nodes (device conditions)"
        )
    events = summary.get("rule_events") or {}
    for kind, label in (("fallbacks", "fell back to the median"), ("guards", "guards")):
        counts = events.get(kind) or {}
        if counts:
            detail = ", ".join(f"{k} {v}" for k, v in counts.items())
            lines.append(
                f"\nrule {label}: {sum(counts.values())} node-rounds ({detail}) "
                f"on {len(events.get(f'{kind}_nodes') or ())} nodes"
            )
    table.caption = "".join(lines)
    return table


def _summary_names(summary: Mapping[str, Any]) -> list[str]:
    names = summary.get("metrics")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


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


def plot_name(metrics: Mapping[str, Any]) -> str:
    """`<primary metric>.png`: accuracy.png for classification, loss.png for regression;
    metrics.png when the name would not make a plain file name."""
    primary = metrics.get("summary", {}).get("primary_metric")
    plain = isinstance(primary, str) and 0 < len(primary) <= 40 and not primary.startswith(".")
    if plain and all(c.isalnum() or c in "_-." for c in str(primary)):
        return f"{primary}.png"
    return "metrics.png"


def plot_metrics(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """The primary metric: thin line per node, thick mean line; None (and no file) if
    matplotlib is missing."""
    fig = metric_figure(metrics)
    if fig is None:
        return None
    fig.savefig(path)
    return path


def metric_figure(metrics: Mapping[str, Any]) -> Any:
    """The plot as a matplotlib Figure (None without matplotlib), for `plot_metrics`.

    The y axis fits the values (a federation between 0.90 and 0.95 accuracy is not a
    flat line at the top of a 0..1 axis), kept inside 0..1 for accuracy;
    a loss or an error is drawn logarithmically when positive and spanning more than two
    decades. Rounds are whole numbers, so are the x ticks. Uses the
    object API with the Agg canvas, not pyplot: no global state, no GUI backend probing,
    and one LineCollection keeps 100 nodes as fast as 8.
    """
    if _preloader is not None:
        _preloader.join()
    summary = metrics["summary"]
    names = _summary_names(summary)
    if not names:
        # A metrics document without the list (hand-built): find the metric in the rows.
        names = metric_names(r for rec in metrics["nodes"].values() for r in rec["rounds"])
    metric = names[0] if names else "accuracy"
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
    values: list[float] = []
    for rec in metrics["nodes"].values():
        pts = [
            (float(r["round"]), v)
            for r in rec["rounds"]
            if (v := row_metrics(r).get(metric)) is not None
        ]
        if pts:
            lines["malicious" if rec.get("role") == "malicious" else "honest"].append(pts)
            values.extend(v for _, v in pts)
    for role, color in (("honest", "tab:blue"), ("malicious", "tab:gray")):
        if lines[role]:
            style = "solid" if role == "honest" else "dashed"
            collection = LineCollection(
                lines[role], linewidths=0.7, alpha=0.35, colors=color, linestyles=style
            )
            ax.add_collection(collection)
    means = [
        (r["round"], m)
        for r in summary["per_round"]
        if (m := _num((r.get("metrics_mean") or {}).get(metric, r.get(f"{metric}_mean"))))
        is not None
    ]
    if means:
        xs, ys = zip(*means, strict=True)
        label = "honest mean" if summary.get("malicious_nodes") else "mean"
        ax.plot(xs, ys, color="tab:red", linewidth=2.5, label=label, marker="o", markersize=3)
        ax.legend(loc="lower right" if higher_is_better(metric) else "upper right")
    _plot_epsilon(ax, summary)
    if metrics.get("faults"):
        mark_faults(ax, metrics["faults"])  # vertical lines and labels at the fault rounds
    ax.autoscale_view()
    if metric == "accuracy":
        bottom, top = ax.get_ylim()
        ax.set_ylim(max(bottom, 0.0), min(top, 1.0))
    elif values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric}")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{metrics.get('scenario', {}).get('name', 'scenario')}: {metric} per node")
    fig.tight_layout()
    return fig


def _plot_epsilon(ax: Any, summary: Mapping[str, Any]) -> None:
    """With differential privacy on: the largest epsilon any node has spent, per round,
    on a second y axis (up to the budget, when there is one), so the privacy cost sits
    beside the accuracy it bought."""
    spent = [
        (r["round"], e)
        for r in summary["per_round"]
        if (e := _num(r.get("epsilon_max"))) is not None
    ]
    if not spent:
        return
    eps = ax.twinx()
    xs, ys = zip(*spent, strict=True)
    eps.plot(xs, ys, color="tab:green", linewidth=1.5, linestyle="--", label="epsilon spent (max)")
    privacy = summary.get("privacy") or {}
    budget = _num(privacy.get("budget")) if isinstance(privacy, Mapping) else None
    top = max(ys) if budget is None else max(budget, max(ys))
    eps.set_ylim(0.0, 1.05 * top if top > 0 else 1.0)
    eps.set_ylabel("epsilon spent (max over nodes)", color="tab:green")
    eps.legend(loc="center right")


plot_accuracy = plot_metrics  # the name it had when every model was a classifier


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
    """metrics.json + the plot (see `plot_name`), and the table on `console` (None = print
    nothing)."""
    metrics = build_metrics(
        scenario, nodes, wall_seconds=wall_seconds, mode=mode, complete=complete
    )
    write_metrics(out, metrics)
    name = plot_name(metrics)
    png = plot_metrics(metrics, out / name)
    if console is not None:
        console.print(summary_table(metrics))
        if metrics.get("faults"):
            console.print(fault_table(metrics["faults"]))
        if png is None:
            console.print(f"[yellow]matplotlib is not installed: {name} skipped[/]")
        console.print(f"outputs in {out}/ (metrics.json{f', {name}' if png else ''})")
    return metrics


class RoundProgress:
    """Progress bar over rounds: the slowest node's completed rounds, plus the mean of the
    primary metric (accuracy, else loss) over the honest nodes' latest rows.

    Both runners feed it the same way, so the bar looks the same for processes and
    in-process runs. Use as a context manager around the run.

    On 80 columns the counts, the time and the note must all stay readable, so the bar
    has a fixed width and only the scenario's name gives way (cut with an ellipsis):
    rich would otherwise crop the end of the line, which is where the numbers are.
    """

    def __init__(self, console: Console, name: str, rounds: int, nodes: int) -> None:
        self._name = name
        self._nodes = nodes
        self._progress = Progress(
            TextColumn(
                "[bold]{task.description}",
                table_column=Column(no_wrap=True, overflow="ellipsis", min_width=8, ratio=1),
            ),
            BarColumn(bar_width=PROGRESS_BAR_WIDTH),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("rounds", table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[note]}", table_column=Column(no_wrap=True)),
            console=console,
            expand=True,  # the name's column takes what is left (ratio), no more
        )
        self._task = self._progress.add_task(name, total=rounds, note=f"starting {nodes} nodes...")

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def renderable(self) -> RenderableType:
        """What the live display shows now (for tests, and to print the bar once)."""
        return self._progress.get_renderable()

    def update(self, completed_min: int, last_rows: Sequence[Mapping[str, Any]]) -> None:
        self._progress.update(self._task, completed=completed_min, note=self.note(last_rows))

    def note(self, last_rows: Sequence[Mapping[str, Any]]) -> str:
        """'mean acc 0.912 (6/8 nodes)' or 'mean loss 0.0312' from each node's latest row."""
        metric = primary_metric(metric_names(last_rows))
        if metric is None:
            return ""
        values = [v for row in last_rows if (v := row_metrics(row).get(metric)) is not None]
        note = f"mean {_short(metric)} {_fmt(sum(values) / len(values))}"
        if len(values) < self._nodes:
            note += f" ({len(values)}/{self._nodes} nodes)"
        return note
