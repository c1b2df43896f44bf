"""rich rendering of a node's status dict (the `status` control command's result).

Every field is optional: a `p2pfl status` of one version may talk to a node of another, so a
missing or odd-typed value prints as "-" instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from p2pfl.metrics import (
    fmt_metric,
    metric_names,
    primary_metric,
    row_metrics,
    row_timing,
    timing_text,
)
from p2pfl.units import format_bytes

MISSING = "-"
ID_WIDTH = 12

# Short forms keep the peers table inside 80 columns.
_SHORT = {
    "connected": "up",
    "disconnected": "down",
    "bootstrap": "boot",
    "peer-exchange": "pex",
    "inbound": "in",
}
_STATE_STYLES = {
    "connected": "green",
    "connecting": "yellow",
    "handshaking": "yellow",
    "suspect": "yellow",
    "backoff": "yellow",
    "disconnected": "red",
    "failed": "red",
    "left": "dim",
    "dead": "red",
    "banned": "bold red",
}


# --- tolerant accessors and formatters ------------------------------------------------------


def _section(obj: Any, key: str) -> Mapping[str, Any]:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _secure_rows(secure: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One line of secure-aggregation counters, and a warning line while this node is
    in no group (its update is withheld or sent in the clear, per its policy)."""
    led = secure.get("groups_led")
    led = led if isinstance(led, Mapping) else {}
    grouped, out = secure.get("rounds_grouped"), secure.get("rounds_out")
    rows = [
        (
            "secure agg",
            f"in a group {fmt_int(grouped)} rounds, without {fmt_int(out)} "
            f"(policy {fmt_text(secure.get('no_group'))}); keyed peers "
            f"{fmt_int(secure.get('keyed_peers'))}; led groups "
            f"{fmt_int(led.get('completed', 0))} completed, {fmt_int(led.get('failed', 0))} failed",
        )
    ]
    streak = secure.get("out_streak")
    if isinstance(streak, int) and streak > 0:
        reasons = secure.get("out_reasons")
        why = (
            ", ".join(f"{k} {v}" for k, v in reasons.items())
            if isinstance(reasons, Mapping)
            else ""
        )
        action = "sent in the clear" if secure.get("no_group") == "plain" else "withheld"
        rows.append(
            ("secure WARNING", f"no group for the last {streak} rounds ({why}); update {action}")
        )
    return rows


def _privacy_rows(privacy: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Epsilon spent (of the budget), at what delta, noise and clip; and a warning line
    once the budget is spent and the node no longer contributes updates."""
    budget = privacy.get("budget")
    of = f" of {fmt_float(budget, 3)}" if _number(budget) is not None else " (no budget)"
    rows = [
        (
            "privacy",
            f"epsilon {fmt_float(privacy.get('epsilon'), 3)}{of} spent at delta "
            f"{fmt_text(privacy.get('delta'))} over {fmt_int(privacy.get('rounds'))} rounds; "
            f"noise {fmt_float(privacy.get('noise_multiplier'), 3)} x clip "
            f"{fmt_text(privacy.get('clip'))}",
        )
    ]
    distributed = privacy.get("distributed")
    if isinstance(distributed, Mapping):
        rows.append(
            (
                "privacy (groups)",
                f"distributed: each member adds 1/{fmt_int(distributed.get('group_min'))} of "
                f"the noise; epsilon {fmt_float(distributed.get('epsilon_if_mates_collude'), 3)}"
                " if a smallest group's other members collude",
            )
        )
    if privacy.get("exhausted") is True:
        rows.append(
            (
                "privacy SPENT",
                f"budget spent: no updates since round {fmt_int(privacy.get('stopped_at'))} "
                "(sends its start model; still serves peers and aggregates)",
            )
        )
    return rows


def _total(counts: Any) -> int:
    """Sum of a {name: n} map's numbers (0 for anything else)."""
    if not isinstance(counts, Mapping):
        return 0
    return int(sum(n for n in (_number(v) for v in counts.values()) if n is not None))


def _events_text(counts: Mapping[str, Any], reasons: Mapping[str, Any]) -> str:
    """'too_few_inputs 12 (krum with f=2 needs 7 inputs, had 5: ...)', per reason."""
    parts = []
    for key, n in counts.items():
        why = reasons.get(key)
        parts.append(f"{fmt_text(key)} {fmt_int(n)}" + (f" ({fmt_text(why)})" if why else ""))
    return "; ".join(parts)


def _robustness_rows(rob: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A line when the rule fell back, one when a guard changed what it did (neither
    otherwise), and the three most suspected neighbours once any peer was observed."""
    rows = []
    reasons = _section(rob, "reasons")
    fallbacks, guards = _section(rob, "fallbacks"), _section(rob, "guards")
    if fallbacks:
        rounds = f"{_total(fallbacks)} of {fmt_int(rob.get('aggregations'))} rounds"
        rows.append(("rule fell back", f"{rounds}: {_events_text(fallbacks, reasons)}"))
    if guards:
        rows.append(("rule guards", _events_text(guards, reasons)))
    suspicion = _section(rob, "suspicion")  # most suspected first
    top = [(p, r) for p, r in suspicion.items() if isinstance(r, Mapping)][:3]
    if top:
        parts = []
        for peer, rec in top:
            flags = _section(rec, "flagged")
            of = f"{_total(flags)} of {fmt_int(rec.get('observed'))}"
            why = f"{'/'.join(str(k) for k in flags)} {of}" if flags else f"{of} flagged"
            parts.append(f"{short_id(peer)} {fmt_float(rec.get('score'), 2)} ({why})")
        suspects = len(_list(rob, "suspects"))
        tail = f"; suspects: {suspects}" if suspects else ""
        rows.append(("suspicion", ", ".join(parts) + tail))
    return rows


def _list(obj: Any, key: str) -> list[Any]:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt_text(value: Any) -> str:
    if value is None or value == "" or isinstance(value, Mapping | list):
        return MISSING
    return str(value)


def short_id(value: Any, width: int = ID_WIDTH) -> str:
    text = fmt_text(value)
    return text if text == MISSING else text[:width]


def fmt_int(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{int(number):,}"


def fmt_float(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def fmt_bytes(value: Any) -> str:
    """1536 -> '1.5 KiB' (p2pfl.units, the one convention); '-' when missing."""
    number = _number(value)
    return MISSING if number is None or number < 0 else format_bytes(number)


def fmt_duration(value: Any) -> str:
    """Seconds -> '2d 03h', '1h 02m 03s', '4m 05s', '12.3s'."""
    number = _number(value)
    if number is None or number < 0:
        return MISSING
    if number < 60:
        return f"{number:.1f}s"
    total = int(number)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s"


def fmt_ago(value: Any) -> str:
    text = fmt_duration(value)
    return text if text == MISSING else f"{text} ago"


# --- pieces ----------------------------------------------------------------------------------


def _rejected_text(rejected: list[Any]) -> str:
    if not rejected:
        return "0"
    reasons = []
    for item in rejected:
        if isinstance(item, Mapping):
            reasons.append(f"{short_id(item.get('peer'))}: {fmt_text(item.get('reason'))}")
        else:
            reasons.append(fmt_text(item))
    return f"{len(rejected)} ({'; '.join(reasons)})"


def _aggregation_text(agg: Mapping[str, Any]) -> str:
    if not agg:
        return MISSING
    parts = [
        f"round {fmt_int(agg.get('round'))}",
        fmt_text(agg.get("rule")),
        f"inputs {fmt_int(agg.get('inputs_used'))}",
        f"rejected {_rejected_text(_list(agg, 'rejected'))}",
    ]
    if agg.get("timed_out") is True:
        parts.append("timed out")
    return ", ".join(parts)


def _round_text(rnd: Mapping[str, Any]) -> str:
    if not rnd:
        return MISSING
    current = fmt_int(rnd.get("current"))
    target = rnd.get("target")
    of = f"/{fmt_int(target)}" if _number(target) is not None else ""
    mode = ", asynchronous" if rnd.get("mode") == "async" else ""
    return f"{current}{of}  ({fmt_text(rnd.get('phase'))}{mode})"


def _model_text(model: Mapping[str, Any]) -> str:
    if not model:
        return MISSING
    return (
        f"v{fmt_int(model.get('version'))}  hash {short_id(model.get('hash'))}  "
        f"params {fmt_int(model.get('params'))}"
    )


def _last_row(history: list[Any]) -> Mapping[str, Any]:
    return history[-1] if history and isinstance(history[-1], Mapping) else {}


def _last_metrics_text(history: list[Any]) -> str:
    """The last round's metrics, whatever the model reports (accuracy, loss, mae, ...)."""
    last = _last_row(history)
    if not last:
        return MISSING
    metrics = row_metrics(last)
    names = metric_names([last])
    shown = ", ".join(f"{name} {fmt_metric(metrics[name])}" for name in names) or "no metrics"
    return (
        f"round {fmt_int(last.get('round'))}: {shown}, {fmt_float(last.get('seconds'), 2)}s, "
        f"sent {fmt_bytes(last.get('bytes_sent'))}, "
        f"received {fmt_bytes(last.get('bytes_received'))}, "
        f"heard {fmt_int(last.get('peers_heard'))} peers"
    )


def _last_timing_text(history: list[Any]) -> str | None:
    """Where the last round's CPU went ('train 1.20s, encode 0.01s, ...'); None if unknown."""
    timing = row_timing(_last_row(history))
    if not timing:
        return None
    return timing_text(timing)


SPARK = "▁▂▃▄▅▆▇█"
SPARK_ROUNDS = 30


def sparkline(values: list[float]) -> str:
    """Unicode block sparkline of `values`, scaled to their own range (flat: mid blocks)."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return SPARK[3] * len(values)
    top = len(SPARK) - 1
    return "".join(SPARK[round((v - low) / (high - low) * top)] for v in values)


def history_text(history: list[Any]) -> str | None:
    """The primary metric over the last SPARK_ROUNDS rounds, as a sparkline with its range."""
    rows = [r for r in history if isinstance(r, Mapping)][-SPARK_ROUNDS:]
    names = metric_names(rows)
    metric = primary_metric(names)
    if metric is None:
        return None
    values = [v for r in rows if (v := row_metrics(r).get(metric)) is not None]
    if len(values) < 2:
        return None
    return (
        f"{metric} {sparkline(values)} {fmt_float(values[0], 3)} -> {fmt_float(values[-1], 3)} "
        f"(last {len(values)} rounds)"
    )


def status_line(status: Mapping[str, Any]) -> str:
    """One line for logs and pipes (`p2pfl status --watch` when stdout is not a terminal):
    round and phase, peers connected of known, the last round's primary metric."""
    rnd = _section(status, "round")
    peers = [p for p in _list(status, "peers") if isinstance(p, Mapping)]
    connected = sum(1 for p in peers if p.get("state") == "connected")
    history = _list(status, "history")
    last = row_metrics(history[-1]) if history and isinstance(history[-1], Mapping) else {}
    metric = primary_metric(list(last))
    shown = f" {metric} {fmt_float(last[metric], 4)}" if metric is not None else ""
    node = _section(status, "node")
    return (
        f"node {short_id(node.get('id'))} round {_round_text(rnd)} "
        f"peers {connected}/{len(peers)} connected{shown}"
    )


def status_header(status: Mapping[str, Any]) -> Panel:
    node = _section(status, "node")
    listen = [fmt_text(a) for a in _list(node, "listen")]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    rows = [
        ("node", fmt_text(node.get("id"))),
        ("version", f"{fmt_text(node.get('version'))}  role {fmt_text(node.get('role'))}"),
        ("federation", fmt_text(node.get("federation"))),
        ("listen", ", ".join(listen) if listen else MISSING),
        ("uptime", f"{fmt_duration(node.get('uptime_s'))}  pid {fmt_text(node.get('pid'))}"),
        ("data dir", fmt_text(node.get("data_dir"))),
        ("round", _round_text(_section(status, "round"))),
        ("model", _model_text(_section(status, "model"))),
        ("last aggregation", _aggregation_text(_section(status, "last_aggregation"))),
        ("last round", _last_metrics_text(_list(status, "history"))),
    ]
    if node.get("state") == "stopped":  # `p2pfl status --offline`
        problems = "; ".join(fmt_text(p) for p in _list(node, "problems"))
        rows.insert(
            0,
            ("state", "STOPPED: read from its data dir" + (f" ({problems})" if problems else "")),
        )
    timing = _last_timing_text(_list(status, "history"))
    if timing is not None:
        rows.append(("round timing", timing))
    trend = history_text(_list(status, "history"))
    if trend is not None:
        rows.append(("history", trend))
    comp = status.get("compression")
    if isinstance(comp, Mapping):
        stages = " > ".join(fmt_text(x) for x in _list(comp, "pipeline")) or MISSING
        rows.append(
            (
                "compression",
                f"{stages}  last update {fmt_bytes(comp.get('raw_bytes'))} -> "
                f"{fmt_bytes(comp.get('wire_bytes'))} ({fmt_float(comp.get('ratio'), 1)}x)",
            )
        )
    rows.extend(_robustness_rows(_section(status, "robustness")))
    secure = status.get("secure")
    if isinstance(secure, Mapping):
        rows.extend(_secure_rows(secure))
    privacy = status.get("privacy")
    if isinstance(privacy, Mapping):
        rows.extend(_privacy_rows(privacy))
    part = status.get("participation")
    if isinstance(part, Mapping):
        when = ", ".join(fmt_text(c) for c in _list(part, "conditions"))
        state = (
            "training"
            if part.get("training") is not False
            else f"IDLE: {fmt_text(part.get('reason'))}"
        )
        sat = fmt_int(part.get("idle_rounds"))
        rows.append(("participation", f"{state}  (when {when}; {sat} rounds sat out)"))
    examples = status.get("privacy_examples")
    if isinstance(examples, Mapping):
        rows.append(
            (
                "DP-SGD",
                f"example-level epsilon {fmt_float(examples.get('epsilon'), 3)} at delta "
                f"{fmt_text(examples.get('delta'))} after {fmt_int(examples.get('steps'))} "
                f"steps; noise {fmt_float(examples.get('noise_multiplier'), 3)} x clip "
                f"{fmt_text(examples.get('clip'))}",
            )
        )
    loop = status.get("event_loop")
    if isinstance(loop, Mapping):
        stalls = [s for s in _list(loop, "recent_stalls") if isinstance(s, Mapping)]
        worst = max(stalls, key=lambda s: s.get("ms") or 0, default=None)
        text = f"longest step {fmt_float(loop.get('max_step_ms'), 1)} ms"
        if worst is not None:
            ms, task = fmt_float(worst.get("ms"), 1), fmt_text(worst.get("task"))
            text += f"; recent stall {ms} ms in {task}"
        rows.append(("event loop", text))
    records = status.get("records")
    if isinstance(records, Mapping) and (
        records.get("evaluations_skipped") or records.get("checkpoints_superseded")
    ):
        rows.append(
            (
                "records",
                f"behind the rounds: {fmt_int(records.get('evaluations_skipped'))} "
                "evaluations skipped, "
                f"{fmt_int(records.get('checkpoints_superseded'))} checkpoints superseded, "
                f"{fmt_int(records.get('queued'))} queued",
            )
        )
    for key, value in rows:
        grid.add_row(key, Text(value))
    return Panel(grid, title=f"p2pfl node {short_id(node.get('id'))}", title_align="left")


def peers_table(status: Mapping[str, Any]) -> Table:
    peers = [p for p in _list(status, "peers") if isinstance(p, Mapping)]
    # A borderless table with short headers fits 10 columns in an 80-column terminal.
    table = Table(
        title=f"peers ({len(peers)})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0),
        collapse_padding=True,
        expand=False,
    )
    for name, justify in (
        ("id", "left"),
        ("address", "left"),
        ("state", "left"),
        ("via", "left"),
        ("rnd", "right"),
        ("seen", "right"),
        ("rtt", "right"),
        ("in", "right"),
        ("out", "right"),
        ("rej", "right"),
    ):
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=True,
            min_width={"id": 12, "address": 15}.get(name),
        )
    for peer in peers:
        state = fmt_text(peer.get("state"))
        table.add_row(
            short_id(peer.get("id")),
            fmt_text(peer.get("address")),
            Text(_SHORT.get(state, state), style=_STATE_STYLES.get(state, "")),
            _SHORT.get(fmt_text(peer.get("found_via")), fmt_text(peer.get("found_via"))),
            fmt_int(peer.get("round")),
            fmt_ago(peer.get("last_seen_s")).removesuffix(" ago"),
            fmt_float(peer.get("rtt_ms"), 1),
            fmt_bytes(peer.get("bytes_in")),
            fmt_bytes(peer.get("bytes_out")),
            fmt_int(peer.get("rejected")),
        )
    return table


def _times(n: Any, what: str) -> str:
    """'1 failure', '3 failures'."""
    return f"{fmt_int(n)} {what}" + ("" if n == 1 else "s")


SHOWN_FAILING = 8  # lines per list of failing places; --json has all


def _failing_lines(
    rows: list[Mapping[str, Any]], line: Callable[[Mapping[str, Any]], tuple[str, str]], what: str
) -> Text | None:
    """One line per row (a yellow head, then the rest), at most SHOWN_FAILING of them."""
    if not rows:
        return None
    text = Text()
    for row in rows[:SHOWN_FAILING]:
        head, rest = line(row)
        text.append(head, style="yellow")
        text.append(rest + "\n")
    if len(rows) > SHOWN_FAILING:
        text.append(f"... and {len(rows) - SHOWN_FAILING} more {what} (--json has all)\n")
    return text


def dial_lines(status: Mapping[str, Any]) -> Text | None:
    """Failing dial targets: where, how often, the last error and the next retry (what
    "dial failures 6" never said: a wrong federation, a closed port, a bad address)."""

    def line(t: Mapping[str, Any]) -> tuple[str, str]:
        retry = (
            "dialing now" if t.get("dialing") else f"retry in {fmt_duration(t.get('retry_in_s'))}"
        )
        return f"dial {fmt_text(t.get('address'))}", (
            f" ({fmt_text(t.get('found_via'))}): {_times(t.get('failures'), 'failure')}, "
            f"last: {fmt_text(t.get('last_error'))}; {retry}"
        )

    rows = _list(status, "dial_targets")
    failing = [t for t in rows if isinstance(t, Mapping) and t.get("failures")]
    return _failing_lines(failing, line, "failing targets")


def inbound_lines(status: Mapping[str, Any]) -> Text | None:
    """Hosts whose handshakes with us failed, and why: the dialed side's view of a
    wrong federation or secret, which its peer table never sees (no peer id)."""

    def line(t: Mapping[str, Any]) -> tuple[str, str]:
        return f"inbound {fmt_text(t.get('address'))}", (
            f": {_times(t.get('failures'), 'failed handshake')}, "
            f"last {fmt_ago(t.get('last_s'))}: {fmt_text(t.get('last_error'))}"
        )

    rows = [t for t in _list(status, "inbound_failures") if isinstance(t, Mapping)]
    return _failing_lines(rows, line, "hosts")


def counters_line(status: Mapping[str, Any]) -> Text:
    """'frames rejected 3 (too_large 2, bad_msgpack 1) · reconnects 4 · ...'."""
    counters = _section(status, "counters")
    parts = []
    for name, value in counters.items():
        label = str(name).replace("_", " ")
        if isinstance(value, Mapping):
            total = sum(n for n in (_number(v) for v in value.values()) if n is not None)
            detail = ", ".join(f"{k} {fmt_int(v)}" for k, v in value.items())
            parts.append(f"{label} {int(total)}" + (f" ({detail})" if detail else ""))
        else:
            parts.append(f"{label} {fmt_int(value)}")
    return Text("counters: " + (" · ".join(parts) if parts else MISSING), style="dim")


def render_status(status: Mapping[str, Any]) -> RenderableType:
    """The whole `p2pfl status` screen for one status dict."""
    parts: list[RenderableType] = [status_header(status), peers_table(status)]
    for lines in (dial_lines(status), inbound_lines(status)):
        if lines is not None:
            parts.append(lines)
    parts.append(counters_line(status))
    return Group(*parts)


def render_error(message: str) -> RenderableType:
    """Shown in place of the status by `--watch` while the node is unreachable."""
    return Panel(Text(message, style="red"), title="p2pfl status", title_align="left")


__all__ = [
    "counters_line",
    "fmt_ago",
    "fmt_bytes",
    "fmt_duration",
    "peers_table",
    "render_error",
    "render_status",
    "short_id",
    "status_header",
]
