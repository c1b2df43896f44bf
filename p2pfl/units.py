"""One unit convention for sizes in human output: IEC binary units (B, KiB, MiB, GiB,
TiB; 1 KiB = 1024 B).

Logs, `p2pfl status` and the scenario tables all go through `format_bytes`, so the
same number reads the same everywhere (they used to mix "KB" for 1000 and for 1024
bytes). Binary units because sizes here are of arrays of 4-byte floats and of buffers
and limits set in powers of two (1 MiB frame parts, 16 MiB receive budget). Machine
outputs (`--json`, metrics.jsonl, metrics.json, JSON log fields) keep integer bytes.
"""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB ('1023 B'); a value that would round
    to 1024 of a unit moves up to the next ('1.0 MiB', never '1024.0 KiB'); negative
    sizes keep their sign (a difference between two counters)."""
    size = abs(float(n))
    for unit in _UNITS:
        shown = f"{size:.0f}" if unit == "B" else f"{size:.1f}"
        if float(shown) < 1024 or unit == _UNITS[-1]:
            sign = "-" if n < 0 and float(shown) != 0 else ""
            return f"{sign}{shown} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
