"""`[[faults]]` in scenario files: what to break, when, and how each runner applies it.

    [[faults]]
    at_round = 3          # from this round on (the affected node's own round)
    kind = "crash"        # crash | restart | partition | heal | delay | loss | corrupt
    nodes = [2]           #   | duplicate | reorder | truncate | stall | slow

`crash` SIGKILLs the nodes' processes once they report round `at_round` on their
control sockets (no goodbye); `restart` starts them again on the same data dir once a
live node reaches `at_round`, and they resume from their checkpoints. Everything else is
a network fault: each node applies its part to its own links through a fault plan
file (`p2pfl.transport.faults`), so the same scenario works with real processes and
in-process nodes.

    partition  `nodes` are cut off from all the others until a later `heal` (or
               `until_round`); both sides apply the cut
    heal       ends every partition open at `at_round`
    loss       `nodes` (default all) drop `probability` of what they send
    delay      `nodes` delay what they send by `delay` +/- `jitter` seconds
    corrupt    `nodes` garble `probability` of what they send (`flips` bytes each)
    duplicate, reorder, truncate: `nodes` do so with `probability`
    stall      `nodes` stop reading from everyone (slow consumers)

Network faults last until `until_round` (exclusive) or the end of the run.

`slow` (`factor = 5`, `nodes` required, from round 0 for the whole run) makes those
nodes' local training take `factor` times as long: each node gets the config value
`train_slowdown` and, after training, waits (factor - 1) x the seconds it trained, so
stragglers can be studied on one machine, with real processes, Ray or in-process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.scenario.table import ScenarioError

if TYPE_CHECKING:  # the transport pulls in trio and numpy: only needed to write plans
    from p2pfl.transport.faults import FaultPlan, FaultRule

KINDS = (
    "crash",
    "restart",
    "partition",
    "heal",
    "delay",
    "loss",
    "corrupt",
    "duplicate",
    "reorder",
    "truncate",
    "stall",
    "slow",
)
PROCESS_KINDS = ("crash", "restart")
# How many rounds ahead of a crash the runner starts watching its victims closely.
CLOSE_WATCH_ROUNDS = 2
FAULTS_FILE = "faults.json"
# Keys each kind accepts besides at_round and kind.
_KEYS: dict[str, tuple[str, ...]] = {
    "crash": ("nodes",),
    "restart": ("nodes",),
    "partition": ("nodes", "until_round"),
    "heal": (),
    "delay": ("nodes", "until_round", "delay", "jitter", "probability"),
    "loss": ("nodes", "until_round", "probability"),
    "corrupt": ("nodes", "until_round", "probability", "flips"),
    "duplicate": ("nodes", "until_round", "probability"),
    "reorder": ("nodes", "until_round", "probability"),
    "truncate": ("nodes", "until_round", "probability"),
    "stall": ("nodes", "until_round"),
    "slow": ("nodes", "factor"),
}
# The transport-level rule kind of each scenario kind (partition -> cut, loss -> drop).
_RULE_KIND = {
    "partition": "cut",
    "loss": "drop",
    "delay": "delay",
    "corrupt": "corrupt",
    "duplicate": "duplicate",
    "reorder": "reorder",
    "truncate": "truncate",
    "stall": "stall",
}


@dataclass(frozen=True)
class FaultEvent:
    at_round: int
    kind: str
    nodes: tuple[int, ...] = ()  # () = every node (network kinds only)
    until_round: int | None = None
    probability: float = 1.0
    delay: float = 0.0
    jitter: float = 0.0
    flips: int = 1
    factor: float = 1.0  # slow: how many times longer the nodes' training takes

    def label(self) -> str:
        """Short text for the timeline and the plot."""
        who = ",".join(f"n{i}" for i in self.nodes) if self.nodes else "all"
        if self.kind == "partition":
            return f"partition {who} | rest"
        if self.kind == "heal":
            return "heal"
        if self.kind == "delay":
            jitter = f"±{self.jitter * 1000:.0f}" if self.jitter else ""
            return f"delay {self.delay * 1000:.0f}{jitter} ms ({who})"
        if self.kind == "slow":
            return f"slow x{self.factor:g} ({who})"
        if self.kind in PROCESS_KINDS or self.kind == "stall":
            return f"{self.kind} {who}"
        return f"{self.kind} {self.probability:.0%} ({who})"


def _error(path: str, message: str) -> Exception:
    return ScenarioError(path, message)


def parse_faults(raw: Any, nodes: int, rounds: int) -> tuple[FaultEvent, ...]:
    """Validate the `[[faults]]` array; every error names `faults[i].key`."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _error("faults", "expected an array of tables ([[faults]])")
    events = [_parse_event(item, f"faults[{i}]", nodes, rounds) for i, item in enumerate(raw)]
    _check_sequence(events, nodes)
    return tuple(events)


def _parse_event(item: Any, path: str, nodes: int, rounds: int) -> FaultEvent:
    if not isinstance(item, Mapping):
        raise _error(path, f"expected a table, got {item!r}")
    kind = item.get("kind")
    if kind is None:
        raise _error(f"{path}.kind", "is required")
    if kind not in KINDS:
        raise _error(f"{path}.kind", f"unknown value {kind!r}; choose one of {', '.join(KINDS)}")
    allowed = ("at_round", "kind", *_KEYS[kind])
    for key in item:
        if key not in allowed:
            raise _error(
                f"{path}.{key}", f"unknown key for kind {kind!r}; known: {', '.join(allowed)}"
            )
    # A slow device is slow from the start: its node reads the factor once, at start-up
    # (the config value train_slowdown), so at_round may be left out and must be 0.
    at_round = _int(item, "at_round", path, required=kind != "slow")
    if at_round is None:
        at_round = 0
    if kind == "slow" and at_round != 0:
        raise _error(f"{path}.at_round", "must be 0 for kind 'slow' (slow for the whole run)")
    if not 0 <= at_round < rounds:
        raise _error(f"{path}.at_round", f"must be in 0..{rounds - 1} (rounds = {rounds})")
    until = _int(item, "until_round", path, required=False)
    if until is not None and not at_round < until <= rounds:
        raise _error(f"{path}.until_round", f"must be in {at_round + 1}..{rounds}")
    members: tuple[int, ...] = ()
    if "nodes" in item:
        members = _node_list(item["nodes"], f"{path}.nodes", nodes)
    elif kind in ("crash", "restart", "partition", "slow"):
        raise _error(f"{path}.nodes", f"is required for kind {kind!r}")
    if kind == "partition" and len(members) >= nodes:
        raise _error(f"{path}.nodes", "one side of the partition: the others form the other side")
    values: dict[str, Any] = {}
    for key in ("probability", "delay", "jitter"):
        if key in item:
            value = item[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _error(f"{path}.{key}", f"expected a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise _error(f"{path}.{key}", "must be a finite number >= 0")
            values[key] = float(value)
    if "flips" in item:
        flips = _int(item, "flips", path, required=True)
        assert flips is not None
        if flips < 1:
            raise _error(f"{path}.flips", "must be >= 1")
        values["flips"] = flips
    if kind == "slow":
        values["factor"] = _factor(item, path)
    if kind == "loss" and "probability" not in values:
        raise _error(f"{path}.probability", "is required for kind 'loss' (e.g. 0.1)")
    if values.get("probability", 1.0) > 1.0:
        raise _error(f"{path}.probability", "must be a fraction in [0, 1]")
    if kind == "delay" and values.get("delay", 0.0) == 0.0 and values.get("jitter", 0.0) == 0.0:
        raise _error(f"{path}.delay", "is required for kind 'delay' (seconds, e.g. 0.2)")
    return FaultEvent(at_round, kind, members, until, **values)


def _factor(item: Mapping[str, Any], path: str) -> float:
    """A slow fault's factor: a finite number > 1 (1 would be no fault at all)."""
    value = item.get("factor")
    if value is None:
        raise _error(f"{path}.factor", "is required for kind 'slow' (e.g. 5)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(f"{path}.factor", f"expected a number, got {value!r}")
    if not math.isfinite(value) or value <= 1:
        raise _error(f"{path}.factor", "must be a finite number > 1 (times the training time)")
    return float(value)


def _int(item: Mapping[str, Any], key: str, path: str, *, required: bool) -> int | None:
    value = item.get(key)
    if value is None:
        if required:
            raise _error(f"{path}.{key}", "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(f"{path}.{key}", f"expected an integer, got {value!r}")
    return value


def _node_list(value: Any, path: str, nodes: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _error(path, "expected a non-empty list of node indices")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < nodes:
            raise _error(path, f"{v!r} is not a node index in 0..{nodes - 1}")
    if len(set(value)) != len(value):
        raise _error(path, "lists a node twice")
    return tuple(sorted(value))


def _check_sequence(events: list[FaultEvent], nodes: int) -> None:
    """Crashes and restarts must alternate per node; a heal needs an open partition; a
    node has one slowdown (two would leave which one holds to the reader)."""
    order = sorted(range(len(events)), key=lambda i: (events[i].at_round, i))
    down: dict[int, int] = {}  # node -> round it crashed
    slowed: dict[int, int] = {}  # node -> the slow fault naming it
    open_partitions = 0
    for i in order:
        ev = events[i]
        if ev.kind == "slow":
            for n in ev.nodes:
                if n in slowed:
                    raise _error(
                        f"faults[{i}].nodes", f"node {n} is already slow (faults[{slowed[n]}])"
                    )
                slowed[n] = i
        elif ev.kind == "crash":
            for n in ev.nodes:
                if n in down:
                    raise _error(
                        f"faults[{i}].nodes", f"node {n} is already down (crashed earlier)"
                    )
                down[n] = ev.at_round
            if len(down) >= nodes:
                raise _error(f"faults[{i}].nodes", "would crash every node at once")
        elif ev.kind == "restart":
            for n in ev.nodes:
                if n not in down:
                    raise _error(f"faults[{i}].nodes", f"node {n} is not down (no earlier crash)")
                if ev.at_round <= down[n]:
                    raise _error(
                        f"faults[{i}].at_round",
                        f"must be after the crash of node {n} (round {down[n]})",
                    )
                del down[n]
        elif ev.kind == "partition" and ev.until_round is None:
            open_partitions += 1
        elif ev.kind == "heal":
            if open_partitions == 0:
                raise _error(f"faults[{i}].kind", "nothing to heal: no open partition before it")
            open_partitions = 0


def slow_factors(events: Sequence[FaultEvent]) -> dict[int, float]:
    """Each slow node's factor (its config value `train_slowdown`); others are absent."""
    return {n: ev.factor for ev in events if ev.kind == "slow" for n in ev.nodes}


# ---- network faults: per-node plans ------------------------------------------------------


def _partition_end(events: Sequence[FaultEvent], ev: FaultEvent) -> int | None:
    if ev.until_round is not None:
        return ev.until_round
    heals = [h.at_round for h in events if h.kind == "heal" and h.at_round > ev.at_round]
    return min(heals, default=None)


def fault_plan_nodes(events: Sequence[FaultEvent], nodes: int) -> list[int]:
    """Indices of the nodes that apply network faults (they get a `faults` plan file)."""
    out: set[int] = set()
    for ev in events:
        if ev.kind == "partition":
            out.update(range(nodes))  # both sides cut
        elif ev.kind in _RULE_KIND:
            out.update(ev.nodes or range(nodes))
    return sorted(out)


def node_fault_plans(events: Sequence[FaultEvent], peer_ids: Sequence[str]) -> list[FaultPlan]:
    """Each node's own part of the schedule, with peers named by their ids."""
    from p2pfl.transport.faults import FaultPlan, FaultRule

    n = len(peer_ids)
    rules: list[list[FaultRule]] = [[] for _ in range(n)]
    for ev in events:
        if ev.kind == "partition":
            end = _partition_end(events, ev)
            side = set(ev.nodes)
            for i in range(n):
                other = [j for j in range(n) if (j in side) != (i in side)]
                rules[i].append(
                    FaultRule(
                        "cut",
                        peers=frozenset(peer_ids[j] for j in other),
                        from_round=ev.at_round,
                        to_round=end,
                    )
                )
        elif ev.kind in _RULE_KIND:
            rule = FaultRule(
                _RULE_KIND[ev.kind],
                probability=ev.probability,
                delay=ev.delay,
                jitter=ev.jitter,
                flips=ev.flips,
                from_round=ev.at_round,
                to_round=ev.until_round,
            )
            for i in ev.nodes or range(n):
                rules[i].append(rule)
    return [FaultPlan(tuple(r)) for r in rules]


def plan_path(data_dir: Path) -> Path:
    return Path(data_dir) / FAULTS_FILE


def write_fault_plans(
    events: Sequence[FaultEvent], data_dirs: Sequence[Path], peer_ids: Sequence[str]
) -> None:
    """Write `<data_dir>/faults.json` for every node that applies network faults.

    Runners call this before starting nodes; `Scenario.node_config_values` already
    points those nodes' `faults` field at these paths.
    """
    from p2pfl.transport.faults import dump_fault_plan

    plans = node_fault_plans(events, peer_ids)
    for i in fault_plan_nodes(events, len(peer_ids)):
        Path(data_dirs[i]).mkdir(parents=True, exist_ok=True, mode=0o700)
        dump_fault_plan(plans[i], plan_path(data_dirs[i]))


# ---- crash and restart (real processes) ------------------------------------------------


@dataclass
class CrashSchedule:
    """Which crash/restart events are due, given what the control sockets report (sans-IO)."""

    pending: list[FaultEvent]

    @classmethod
    def of(cls, events: Sequence[FaultEvent]) -> CrashSchedule:
        ordered = sorted((e for e in events if e.kind in PROCESS_KINDS), key=lambda e: e.at_round)
        return cls(ordered)

    def due(self, rounds: Mapping[int, int | None], down: set[int]) -> list[FaultEvent]:
        """Events to carry out now. `rounds` maps each live node to its reported round
        (None when unknown); `down` are the nodes crashed and not yet restarted.

        A crash is due once every victim reports `at_round` or later (one that never
        reported is not killed blind); a restart once any live node reached `at_round`.
        Events are taken in order, so a restart never overtakes its crash.
        """
        out: list[FaultEvent] = []
        while self.pending:
            ev = self.pending[0]
            if ev.kind == "crash":
                seen = [rounds.get(i) for i in ev.nodes]
                if not all(r is not None and r >= ev.at_round for r in seen):
                    break
            else:
                live = [r for i, r in rounds.items() if i not in down and r is not None]
                if not live or max(live) < ev.at_round:
                    break
            out.append(self.pending.pop(0))
            down = down | set(ev.nodes) if ev.kind == "crash" else down - set(ev.nodes)
        return out

    def watch_closely(
        self, rounds: Mapping[int, int | None], ahead: int | None = CLOSE_WATCH_ROUNDS
    ) -> tuple[int, ...]:
        """The victims of the next crash when it is at most `ahead` rounds away (each
        reported at least `at_round - ahead`; None: however far), else ().

        The runner polls these few nodes between its sweeps of every node, often when the
        crash is near: a sweep of 8 control sockets plus the pause between sweeps lasts
        several rounds of a fast federation, and a crash declared for round 6 fired in
        rounds 7 to 14 (docs/reliability.md).
        """
        if not self.pending or self.pending[0].kind != "crash":
            return ()
        ev = self.pending[0]
        if ahead is None:
            return ev.nodes
        seen = [rounds.get(i) for i in ev.nodes]
        if all(r is not None and r >= ev.at_round - ahead for r in seen):
            return ev.nodes
        return ()


def never_restarted(events: Sequence[FaultEvent]) -> set[int]:
    """Nodes whose last process event is a crash: they are not expected to finish."""
    last: dict[int, str] = {}
    for ev in sorted((e for e in events if e.kind in PROCESS_KINDS), key=lambda e: e.at_round):
        for n in ev.nodes:
            last[n] = ev.kind
    return {n for n, k in last.items() if k == "crash"}


class CrashDriver:
    """What both scenario runners (processes, Ray actors) keep around a `CrashSchedule`:
    which nodes are down, which stay down, and the step that carries out the events now
    due. A runner supplies the rounds its live nodes report and how to crash and restart
    one of them."""

    def __init__(self, events: Sequence[FaultEvent]) -> None:
        self.schedule = CrashSchedule.of(events)
        self.down: set[int] = set()
        self.forever = never_restarted(events)
        self.active = any(e.kind in PROCESS_KINDS for e in events)

    def killed(self, index: int) -> bool:
        return index in self.down

    def excused(self, index: int) -> bool:
        """A node crashed for good is not expected to finish its rounds."""
        return index in self.down and index in self.forever

    def step(self) -> None:
        if not self.active:
            return
        rounds = self.reported_rounds()
        for ev in self.schedule.due(rounds, set(self.down)):
            for i in ev.nodes:
                if ev.kind == "crash":
                    self._crash(i, ev)
                else:
                    top = max((r for r in rounds.values() if r is not None), default=0)
                    self._restart(i, ev, top)

    def reported_rounds(self) -> dict[int, int | None]:
        """Each live (not down) node's reported round, None when unknown."""
        raise NotImplementedError

    def _crash(self, i: int, ev: FaultEvent) -> None:
        raise NotImplementedError

    def _restart(self, i: int, ev: FaultEvent, federation_round: int) -> None:
        raise NotImplementedError


def timeline(events: Sequence[FaultEvent]) -> list[dict[str, Any]]:
    """The planned faults in round order, for metrics.json and the plot."""
    rows = []
    for ev in sorted(events, key=lambda e: e.at_round):
        row: dict[str, Any] = {"round": ev.at_round, "kind": ev.kind, "label": ev.label()}
        if ev.nodes:
            row["nodes"] = list(ev.nodes)
        end = ev.until_round
        if ev.kind == "partition":
            end = _partition_end(events, ev)
        if end is not None:
            row["until_round"] = end
        rows.append(row)
    return rows


# ---- report: timeline, table, plot marks ---------------------------------------------


def report_timeline(
    events: Sequence[FaultEvent], records: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The planned faults, each crash/restart completed with when the runner actually
    did it (from the node records' "events": round seen and seconds into the run)."""
    rows = timeline(events)
    for row in rows:
        if row["kind"] not in PROCESS_KINDS:
            continue
        done = []
        for node in row.get("nodes", []):
            for ev in records.get(f"n{node}", {}).get("events", []):
                if ev.get("kind") == row["kind"] and ev.get("at_round") == row["round"]:
                    done.append({"node": node, "round": ev.get("round"), "t": ev.get("t")})
        row["injected"] = done
    return rows


def fault_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A rich Table of the timeline (rich is imported here, only for the console)."""
    from rich.table import Table

    table = Table(title="injected faults")
    for col in ("round", "fault", "until", "done at"):
        table.add_column(col, justify="left" if col == "fault" else "right")
    for row in rows:
        injected = row.get("injected")
        when = "-"
        if injected:
            when = ", ".join(f"n{d['node']}: round {d['round']}, {d['t']:.1f} s" for d in injected)
        elif injected is not None:
            when = "not reached"
        until = row.get("until_round")
        table.add_row(
            str(row["round"]), str(row["label"]), "-" if until is None else str(until), when
        )
    return table


_COLORS = {"crash": "black", "restart": "tab:green", "partition": "tab:orange", "heal": "tab:green"}


def mark_faults(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Vertical lines (and shaded spans for faults with an end) on a matplotlib Axes."""
    from matplotlib.transforms import blended_transform_factory

    text_at = blended_transform_factory(ax.transData, ax.transAxes)
    for k, row in enumerate(rows):
        x = float(row["round"])
        injected = row.get("injected") or []
        seen = [d["round"] for d in injected if isinstance(d.get("round"), int)]
        if seen:
            x = float(min(seen))  # where it really happened
        color = _COLORS.get(str(row["kind"]), "tab:purple")
        ax.axvline(x, color=color, linestyle="--", linewidth=1.0, alpha=0.8)
        until = row.get("until_round")
        if until is not None and row["kind"] != "heal":
            ax.axvspan(x, float(until), color=color, alpha=0.08, linewidth=0)
        ax.text(
            x,
            0.02 + 0.07 * (k % 4),
            f" {row['label']}",
            transform=text_at,
            fontsize=7,
            color=color,
            rotation=0,
            va="bottom",
        )


def in_process_problem(events: Sequence[FaultEvent]) -> str | None:
    """Why the in-process runner cannot run these faults (None if it can): crash and
    restart kill and start OS processes."""
    for i, ev in enumerate(events):
        if ev.kind in PROCESS_KINDS:
            return f"faults[{i}].kind: {ev.kind!r} needs real processes (run without --in-process)"
    return None
