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

`part="head"` (FedPer, Arivazhagan et al. 2019; FedRep, Collins et al. ICML 2021) makes
only the output layer personal: each round v takes the shared model's body as it is and
trains its own head (the last weight and bias of the model's `layout()`) on the node's
data with the body frozen, pulled towards the shared head by the same lambda. It needs a
model with `layout()` and `loss_and_gradient()` (the built-in numpy models).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from p2pfl.learning.model import MOMENTUM

DEFAULT_LAMBDA = 0.1
PARTS = ("all", "head")  # what of the model is personal: all of it (Ditto), the head
DEFAULT_TEST_FRACTION = 0.2

log = logging.getLogger("p2pfl.learning")


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
        part: str = "all",
    ) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"Ditto lambda must be a finite number >= 0, got {lam!r}")
        if part not in PARTS:
            raise ValueError(f"the personal part must be one of {PARTS}, got {part!r}")
        if part == "all" and getattr(model, "set_proximal", None) is None:
            raise ValueError("personalization needs a model with set_proximal(mu, anchor)")
        self.head: slice | None = _head_slice(model) if part == "head" else None
        self._head_momentum: np.ndarray | None = None
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
        if self.head is not None:
            self._step_head(shared, x, y, epochs=epochs, lr=lr, batch_size=batch_size, rng=rng)
            return
        start = shared if self.params is None else self.params
        self.model.set_params(start)
        self.model.set_proximal(self.lam, anchor=shared)
        self.model.fit(x, y, epochs=epochs, lr=lr, batch_size=batch_size, rng=rng)
        new = self.model.get_params()
        if np.isfinite(new).all():
            self.params = new
            self.rounds += 1

    def _step_head(
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
        """v = (the shared body, our head); the head alone trains, by momentum SGD like
        the models' own `fit`, on the gradient of the loss with the body frozen."""
        assert self.head is not None
        head = self.head
        v = np.array(shared, dtype=np.float32)
        if self.params is not None:
            v[head] = self.params[head]
        anchor = np.array(shared[head], dtype=np.float32)
        if self._head_momentum is None:
            self._head_momentum = np.zeros_like(anchor)
        momentum = self._head_momentum
        lam, neg_lr = np.float32(self.lam), np.float32(-lr)
        n = len(y)
        for _ in range(epochs):
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                self.model.set_params(v)
                grad = self.model.loss_and_gradient(x[idx], y[idx])[1][head]
                if lam > 0:
                    grad += lam * (v[head] - anchor)
                momentum *= np.float32(MOMENTUM)
                momentum += grad
                v[head] += neg_lr * momentum
        if np.isfinite(v).all():
            self.params = v
            self.rounds += 1
        else:
            momentum.fill(0.0)

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

    def restore(self, state: Mapping[str, np.ndarray], num_params: int) -> None:
        """v from a checkpoint; one of another model's size is dropped with a warning
        (v then starts again from the shared model, as on a first start)."""
        v = state.get("ditto.v")
        if v is None:
            return
        if v.shape != (num_params,) or not np.isfinite(v).all():
            log.warning("checkpoint's personal model does not fit this model; starting it afresh")
            return
        self.params = np.asarray(v, dtype=np.float32).copy()


def _head_slice(model: Any) -> slice:
    """Where the output layer (the layout's last weight and bias) lies in the flat vector."""
    layout = getattr(model, "layout", None)
    if layout is None or getattr(model, "loss_and_gradient", None) is None:
        raise ValueError(
            "a personal head needs a model with layout() and loss_and_gradient() "
            "(the built-in numpy models)"
        )
    sizes = [math.prod(shape) for _, shape in layout()]
    if len(sizes) < 2 or sum(sizes) != model.num_params:
        raise ValueError("a personal head needs a layout of at least a weight and a bias")
    return slice(model.num_params - sizes[-1] - sizes[-2], model.num_params)
