"""What two nodes must agree on to learn together: the model's layout and the task.

Peers exchange one flat float32 vector, so two nodes whose models differ in size,
layer shapes or order, or whose data differ in feature shape or class count, would
reject each other's every update (`bad_shape`) or, worse, average numbers that mean
different things. Each node announces this fingerprint when it connects; a peer whose
fingerprint differs is refused with one log line naming both. Checkpoints carry it
too, so a node restarted with another model does not load mismatched parameters.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from p2pfl.learning.datasets import Dataset
from p2pfl.learning.model import Model

FINGERPRINT_LEN = 16  # hex characters of sha256


@dataclass(frozen=True, slots=True)
class Fingerprint:
    num_params: int
    dtype: str
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    feature_shape: tuple[int, ...]
    n_classes: int

    @property
    def digest(self) -> str:
        """A short stable hash of everything above (what goes on the wire)."""
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_LEN]

    def describe(self) -> dict[str, Any]:
        return {
            "num_params": self.num_params,
            "dtype": self.dtype,
            "layout": [[name, list(shape)] for name, shape in self.layout],
            "feature_shape": list(self.feature_shape),
            "n_classes": self.n_classes,
        }

    def difference(self, other_digest: str) -> str | None:
        """None if a peer's digest matches ours, else a short explanation."""
        if other_digest == self.digest:
            return None
        return (
            f"model/task fingerprint {other_digest!r} differs from ours {self.digest!r} "
            f"({self.num_params} params, features {self.feature_shape}, "
            f"{self.n_classes} classes)"
        )


def fingerprint(model: Model, data: Dataset) -> Fingerprint:
    """The fingerprint of `model` trained on `data` (layout from `model.layout()` when
    the model has one, else one tensor of `num_params`)."""
    layout_fn = getattr(model, "layout", None)
    raw = layout_fn() if callable(layout_fn) else [("params", (model.num_params,))]
    layout = tuple((str(name), tuple(int(n) for n in shape)) for name, shape in raw)
    return Fingerprint(
        num_params=int(model.num_params),
        dtype="float32",
        layout=layout,
        feature_shape=tuple(int(n) for n in data.x_train.shape[1:]),
        n_classes=int(data.n_classes),
    )
