"""Which metrics a node's history rows report, which one leads, and how to print them.

A model reports whatever metrics it likes (`Model.evaluate`: "loss" always, "accuracy"
for classification, anything else), so the status screen, the scenario table, the plot and
`metrics.json` all ask this module instead of assuming accuracy. The "primary" metric is
the one a single number or a plot shows: accuracy when the rows have it (higher is
better), else loss (lower is better), else the first one reported.

Stdlib only: `p2pfl status` imports it and must stay fast (no numpy, no trio).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

TIMING_KEYS = ("train_s", "encode_s", "aggregate_s", "eval_s")
"""The parts of a round's CPU time a node records in each row's "timing", in round order."""

# Metrics where a larger value is better; everything else (loss, mae, mse, ...) is an
# error measure, where lower is better. Only used to word plots and captions.
_HIGHER_IS_BETTER = frozenset(
    {"accuracy", "acc", "f1", "auc", "r2", "precision", "recall", "top5", "top_5_accuracy"}
)


def number(value: Any) -> float | None:
    """A finite int/float as float, else None (bools, strings, NaN and inf are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def row_metrics(row: Any) -> dict[str, float]:
    """The finite metrics of one history row, in the order the model reported them.

    Rows carry a "metrics" mapping; older rows (checkpoints written before it existed)
    only have "accuracy"/"loss" at the top level, so those are read too.
    """
    if not isinstance(row, Mapping):
        return {}
    out: dict[str, float] = {}
    nested = row.get("metrics")
    if isinstance(nested, Mapping):
        for key, value in nested.items():
            if (v := number(value)) is not None:
                out[str(key)] = v
    for key in ("accuracy", "loss"):
        if key not in out and (v := number(row.get(key))) is not None:
            out[key] = v
    return out


def metric_names(rows: Iterable[Any]) -> list[str]:
    """Every metric any row reports: the primary first, then accuracy, loss, the rest in
    the order first seen."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row_metrics(row):
            seen.setdefault(key, None)
    names = list(seen)
    primary = primary_metric(names)
    head = [n for n in (primary, "accuracy", "loss") if n is not None and n in seen]
    head = list(dict.fromkeys(head))
    return head + [n for n in names if n not in head]


def primary_metric(names: Iterable[str]) -> str | None:
    """accuracy if present, else loss, else the first name; None when there are none."""
    names = list(names)
    for preferred in ("accuracy", "loss"):
        if preferred in names:
            return preferred
    return names[0] if names else None


def higher_is_better(name: str) -> bool:
    """True for score-like metrics (accuracy, f1, r2, ...), False for errors and losses."""
    return name.lower() in _HIGHER_IS_BETTER


def row_timing(row: Any) -> dict[str, float]:
    """A row's "timing" (seconds per phase), finite numbers only, known phases first."""
    timing = row.get("timing") if isinstance(row, Mapping) else None
    if not isinstance(timing, Mapping):
        return {}
    known = [k for k in TIMING_KEYS if k in timing]
    rest = sorted(str(k) for k in timing if k not in TIMING_KEYS)
    out: dict[str, float] = {}
    for key in [*known, *rest]:
        if (v := number(timing.get(key))) is not None:
            out[key] = v
    return out


def fmt_metric(value: Any, digits: int = 4) -> str:
    """Fixed decimals for everyday magnitudes (0.9123, 12.3456), significant digits for
    very large or tiny ones (an MSE of 1.235e+06 stays readable); "-" for no number."""
    v = number(value)
    if v is None:
        return "-"
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}g}"


def fmt_seconds(value: Any) -> str:
    """A phase's time: '1.23s', '250ms', '4.0ms', '0.3ms' (phases of a small model take
    well under a hundredth of a second, which '0.00s' would hide)."""
    v = number(value)
    if v is None or v < 0:
        return "-"
    if v >= 1:
        return f"{v:.2f}s"
    return f"{v * 1000:.0f}ms" if v >= 0.01 else f"{v * 1000:.1f}ms"


def timing_text(timing: Mapping[str, Any]) -> str:
    """'train 250ms · encode 4.0ms · aggregate 1.0ms · eval 20ms' ('' when nothing timed)."""
    return " · ".join(f"{timing_label(k)} {fmt_seconds(v)}" for k, v in timing.items())


def timing_label(key: str) -> str:
    """'aggregate_s' -> 'aggregate'."""
    return key.removesuffix("_s")


__all__ = [
    "TIMING_KEYS",
    "fmt_metric",
    "fmt_seconds",
    "higher_is_better",
    "metric_names",
    "number",
    "primary_metric",
    "row_metrics",
    "row_timing",
    "timing_label",
    "timing_text",
]
