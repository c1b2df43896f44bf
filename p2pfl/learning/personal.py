"""Personalization: a personal model beside the shared one (Ditto, Li et al. ICML 2021).

Why: with label-skewed data one shared model is a compromise that fits no node's own
distribution well. Ditto keeps, on every node, a personal model v trained on the node's
own data with a proximal pull towards the current shared model w:

    min_v  F_k(v) + lambda/2 ||v - w||^2

lambda -> 0 is local training alone, lambda -> infinity the shared model; in between,
a node borrows what the federation learned where its own data is thin. The shared model
is trained and aggregated exactly as without personalization (Ditto's global part is
FedAvg, or here whatever rule and optimizer the node runs), so the federation's
robustness and privacy machinery is untouched: the personal model never leaves the node.

Both models are evaluated on the node's *own* test split, held out from its shard
(`test_fraction`, drawn with the node's seed), because personalization is about the
node's distribution, not the federation's: `personal_accuracy` against `local_accuracy`
(the shared model on the same split). The shared test set's metrics stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

DEFAULT_LAMBDA = 0.1
DEFAULT_TEST_FRACTION = 0.2


def local_split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_fit, y_fit, x_test, y_test): `fraction` of the shard held out, stratified by
    label where a label has at least two examples, so a rare class is in both parts."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        if len(idx) < 2:
            continue
        k = max(1, round(fraction * len(idx)))
        test.append(rng.choice(idx, size=min(k, len(idx) - 1), replace=False))
    held = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(y)), held)
    return x[keep], y[keep], x[held], y[held]


class Ditto:
    """The personal model of one node and its own test split."""

    def __init__(
        self,
        model: Any,
        eval_model: Any,
        x_test: np.ndarray,
        y_test: np.ndarray,
        *,
        lam: float = DEFAULT_LAMBDA,
    ) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"Ditto lambda must be a finite number >= 0, got {lam!r}")
        if getattr(model, "set_proximal", None) is None:
            raise ValueError("personalization needs a model with set_proximal(mu, anchor)")
        self.model = model
        self.eval_model = eval_model
        self.lam = lam
        self.x_test, self.y_test = x_test, y_test
        self.params: np.ndarray | None = None  # v; starts as the first shared model
        self.rounds = 0

    def step(
        self,
        shared: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        rng: np.random.Generator,
    ) -> None:
        """One round of v's training: local epochs on (x, y) pulled towards `shared`."""
        start = shared if self.params is None else self.params
        self.model.set_params(start)
        self.model.set_proximal(self.lam, anchor=shared)
        self.model.fit(x, y, epochs=epochs, lr=lr, batch_size=batch_size, rng=rng)
        new = self.model.get_params()
        if np.isfinite(new).all():
            self.params = new
            self.rounds += 1

    def evaluate(
        self, shared: np.ndarray, evaluate: Callable[..., Mapping[str, float]]
    ) -> dict[str, float]:
        """personal_* (v) and local_* (the shared model) metrics on the node's own split."""
        out: dict[str, float] = {}
        if len(self.y_test) == 0:
            return out
        for prefix, params in (("local", shared), ("personal", self.params)):
            if params is None:
                continue
            self.eval_model.set_params(params)
            for key, value in evaluate(self.eval_model, self.x_test, self.y_test).items():
                out[f"{prefix}_{key}"] = value
        return out

    def state(self) -> dict[str, np.ndarray]:
        """For checkpoints: v (empty before the first round)."""
        return {} if self.params is None else {"ditto.v": self.params.copy()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        v = state.get("ditto.v")
        if v is not None:
            self.params = np.asarray(v, dtype=np.float32).copy()
