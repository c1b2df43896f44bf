"""Device-aware participation: train only when the device allows it (on AC power, CPU
otherwise idle, inside a time window), and say why not.

Why: a phone or a laptop is someone's device first. A node outside its conditions keeps
its place in the federation (it stays connected, serves peers, aggregates and sends its
round's start model, a zero update, so peers' quorums hold), but spends no battery or
CPU on training; `p2pfl status` says it is idle and why.

Conditions (`--train-when`, repeatable; all must hold):

- `ac_power`: on mains power (a device without a battery counts as on mains);
- `cpu_below:P`: the rest of the system used less than P% of the CPU since the last
  check (our own process's share is taken out, or training would stop itself);
- `hours:H1-H2`: local time in [H1, H2) hours, wrapping midnight (`hours:22-7`).

The decision is sans-IO (`decide` takes readings); `read_device` is the thin layer over
`psutil` (extra `p2pfl[device]`), imported only when a condition needs it. Networks
that charge by volume cannot be told apart portably, so there is no `unmetered`
condition: say so rather than guess.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EXTRA_HINT = "pip install 'p2pfl[device]' (it installs psutil)"
NEEDS_PSUTIL = ("ac_power", "cpu_below")


@dataclass(frozen=True)
class Condition:
    kind: str  # ac_power | cpu_below | hours
    value: float = 0.0
    start: int = 0
    end: int = 0

    def __str__(self) -> str:
        if self.kind == "cpu_below":
            return f"cpu_below:{self.value:g}"
        if self.kind == "hours":
            return f"hours:{self.start}-{self.end}"
        return self.kind


def parse_conditions(specs: Sequence[str]) -> tuple[Condition, ...]:
    """ValueError naming the bad condition and the accepted forms."""
    out = []
    for spec in specs:
        kind, _, arg = spec.strip().partition(":")
        if kind == "ac_power" and not arg:
            out.append(Condition("ac_power"))
        elif kind == "cpu_below":
            try:
                value = float(arg)
            except ValueError:
                value = math.nan
            if not 0 < value <= 100:
                raise ValueError(f"{spec!r}: cpu_below takes a percentage in (0, 100]")
            out.append(Condition("cpu_below", value=value))
        elif kind == "hours":
            a, sep, b = arg.partition("-")
            if not (sep and a.isdigit() and b.isdigit() and 0 <= int(a) < 24 and 0 <= int(b) <= 24):
                raise ValueError(f"{spec!r}: hours takes H1-H2 in local hours, e.g. hours:22-7")
            if int(a) == int(b):
                raise ValueError(f"{spec!r}: an empty window (H1 = H2)")
            out.append(Condition("hours", start=int(a), end=int(b)))
        else:
            raise ValueError(
                f"unknown condition {spec!r}; use ac_power, cpu_below:PERCENT or hours:H1-H2"
            )
    return tuple(out)


@dataclass(frozen=True)
class Readings:
    on_ac: bool | None  # None: unknown (no psutil reading asked for)
    other_cpu_percent: float | None
    hour: int


def decide(conditions: Sequence[Condition], readings: Readings) -> tuple[bool, str]:
    """(may train, why not): the first condition that fails names the reason."""
    for c in conditions:
        if c.kind == "ac_power" and readings.on_ac is False:
            return False, "on battery (ac_power)"
        if c.kind == "cpu_below":
            load = readings.other_cpu_percent
            if load is not None and load >= c.value:
                return False, f"CPU busy: {load:.0f}% used by others (cpu_below:{c.value:g})"
        if c.kind == "hours":
            h = readings.hour
            inside = c.start <= h < c.end if c.start < c.end else (h >= c.start or h < c.end)
            if not inside:
                return False, f"outside hours {c.start}-{c.end} (now {h}h)"
    return True, ""


class DeviceReader:
    """Readings from psutil (only what the conditions need) and the clock."""

    def __init__(self, conditions: Sequence[Condition]) -> None:
        self.kinds = {c.kind for c in conditions}
        self._psutil: Any = None
        if self.kinds & set(NEEDS_PSUTIL):
            try:
                import psutil
            except ImportError as exc:
                raise ValueError(f"these conditions need psutil: {EXTRA_HINT} ({exc})") from None
            self._psutil = psutil
            self._me = psutil.Process()
            psutil.cpu_percent(interval=None)  # the first call only starts the window
            self._me.cpu_percent(interval=None)

    def read(self) -> Readings:
        on_ac = None
        other = None
        ps = self._psutil
        if ps is not None and "ac_power" in self.kinds:
            battery = ps.sensors_battery()
            on_ac = True if battery is None else bool(battery.power_plugged)
        if ps is not None and "cpu_below" in self.kinds:
            total = ps.cpu_percent(interval=None)  # all CPUs, since the last call
            mine = self._me.cpu_percent(interval=None) / max(1, ps.cpu_count() or 1)
            other = max(0.0, total - mine)
        return Readings(on_ac, other, datetime.datetime.now().hour)


class Participation:
    """A node's conditions, its current decision and how many rounds it sat out."""

    def __init__(self, conditions: Sequence[Condition], reader: Any | None = None) -> None:
        self.conditions = tuple(conditions)
        self.reader = reader if reader is not None else DeviceReader(self.conditions)
        self.training = True
        self.reason = ""
        self.idle_rounds = 0
        self.changed = False  # the decision flipped at the last check (log it once)

    def check(self) -> bool:
        ok, why = decide(self.conditions, self.reader.read())
        self.changed = ok != self.training
        self.training, self.reason = ok, why
        if not ok:
            self.idle_rounds += 1
        return ok

    def status(self) -> dict[str, Any]:
        return {
            "conditions": [str(c) for c in self.conditions],
            "training": self.training,
            "reason": self.reason or None,
            "idle_rounds": self.idle_rounds,
        }
