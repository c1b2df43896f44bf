"""Pipeline syntax: a list of stage strings -> a validated, ordered `Pipeline`.

The same parser reads the node's configuration and the stage list in every received
header, so what a sender may configure and what a receiver accepts are one allow-list.
Stages always run in one fixed order (delta -> topk -> quantize -> zstd); a config
that lists them in another order is refused rather than silently reordered, because
the order a user wrote is the order they think the data goes through.

    delta              send the change of the public copy x_hat (with error feedback),
                       not the model; see `p2pfl.compression.encoder`
    topk:F             keep the ceil(F*d) largest-magnitude coordinates, 0 < F <= 1
    topk:F:noef        the same, dropping (not carrying) what was not sent
    quantize:16        float16
    quantize:8 / :4    int8 / int4, linear, one float32 scale per block of 256 values
    quantize:8s / :4s  the same with stochastic rounding (unbiased)
    zstd:L             zstd level L in 1..22, always last; a message is sent
                       compressed only when that makes it smaller
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

QUANT_BLOCK = 256
"""Values per int8/int4 scale: small enough that one outlier spoils few values."""
ZSTD_LEVELS = range(1, 23)
MAX_STAGE_TEXT = 64


@dataclass(frozen=True, slots=True)
class TopK:
    fraction: float
    error_feedback: bool = True

    def count(self, dim: int) -> int:
        """Coordinates kept out of `dim` (at least one, so every message moves x_hat)."""
        return min(dim, max(1, math.ceil(self.fraction * dim)))

    def __str__(self) -> str:
        return f"topk:{self.fraction!r}" + ("" if self.error_feedback else ":noef")


@dataclass(frozen=True, slots=True)
class Quantize:
    bits: int  # 16, 8 or 4
    stochastic: bool = False

    @property
    def levels(self) -> int:
        """Largest integer magnitude (int8: 127, int4: 7); symmetric, so -128/-8 never occur."""
        return (1 << (self.bits - 1)) - 1

    def __str__(self) -> str:
        return f"quantize:{self.bits}" + ("s" if self.stochastic else "")


@dataclass(frozen=True, slots=True)
class Zstd:
    level: int

    def __str__(self) -> str:
        return f"zstd:{self.level}"


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Which stages run; at most one of each, in the fixed order."""

    delta: bool = False
    topk: TopK | None = None
    quantize: Quantize | None = None
    zstd: Zstd | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        """Canonical stage strings (parse_pipeline(p.stages) == p)."""
        parts: list[object] = ["delta"] if self.delta else []
        parts += [s for s in (self.topk, self.quantize, self.zstd) if s is not None]
        return tuple(str(s) for s in parts)

    @property
    def lossless(self) -> bool:
        return self.topk is None and self.quantize is None


_ORDER = ("delta", "topk", "quantize", "zstd")


def _number(text: str, stage: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad stage {stage!r}: {text!r} is not a number") from None
    return value


def parse_stage(text: str) -> Pipeline:
    """One stage string as a one-stage Pipeline (ValueError naming the stage)."""
    if not isinstance(text, str):
        raise ValueError(f"bad stage {text!r}: expected a string")
    if len(text) > MAX_STAGE_TEXT:
        raise ValueError(f"bad stage {text[:MAX_STAGE_TEXT]!r}...: too long")
    name, _, arg = text.partition(":")
    if name == "delta" and not arg:
        return Pipeline(delta=True)
    if name == "topk":
        value, _, option = arg.partition(":")
        fraction = _number(value, text)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"bad stage {text!r}: fraction must be in (0, 1]")
        if option not in ("", "noef"):
            raise ValueError(f"bad stage {text!r}: unknown option {option!r} (only 'noef')")
        return Pipeline(topk=TopK(fraction, error_feedback=option != "noef"))
    if name == "quantize":
        stochastic = arg.endswith("s")
        bits = arg[:-1] if stochastic else arg
        if bits not in ("16", "8", "4") or (stochastic and bits == "16"):
            raise ValueError(
                f"bad stage {text!r}: use quantize:16, quantize:8, quantize:4, "
                "quantize:8s or quantize:4s"
            )
        return Pipeline(quantize=Quantize(int(bits), stochastic))
    if name == "zstd":
        if not arg.isdigit() or int(arg) not in ZSTD_LEVELS:
            raise ValueError(f"bad stage {text!r}: level must be an integer in 1..22")
        return Pipeline(zstd=Zstd(int(arg)))
    raise ValueError(
        f"bad stage {text!r}: unknown stage (known: delta, topk:F, quantize:16|8|4, zstd:L)"
    )


def parse_pipeline(stages: Sequence[str]) -> Pipeline:
    """Validate and combine stage strings; ValueError naming the offending stage."""
    if isinstance(stages, str):
        raise ValueError(f"pipeline must be a list of stage strings, got the string {stages!r}")
    merged = Pipeline()
    seen: list[str] = []
    for text in stages:
        one = parse_stage(text)
        name = text.partition(":")[0]
        if name in seen:
            raise ValueError(f"bad stage {text!r}: {name} appears twice")
        if seen and _ORDER.index(name) < _ORDER.index(seen[-1]):
            raise ValueError(
                f"bad stage {text!r}: stages must come in the order {' -> '.join(_ORDER)}"
            )
        seen.append(name)
        merged = Pipeline(
            delta=merged.delta or one.delta,
            topk=one.topk or merged.topk,
            quantize=one.quantize or merged.quantize,
            zstd=one.zstd or merged.zstd,
        )
    if merged.topk is not None and not merged.delta:
        raise ValueError("bad stage 'topk': top-k needs 'delta' first (it sparsifies a change)")
    return merged
