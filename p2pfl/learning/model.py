"""The Model protocol every learner implements, and the shared SGD machinery.

Federated averaging, robust aggregation and secure aggregation all work on one flat
float32 vector, so a model exposes exactly that (`get_params`/`set_params`) and keeps
its layers as views into it: aggregation never needs to know the architecture, and a
training step never copies the parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
MOMENTUM = 0.9
"""Heavy-ball momentum of the local SGD (PyTorch convention: v = mu*v + g; w -= lr*v)."""
MODEL_NAMES = ("softmax", "mlp")
_EVAL_CHUNK = 8192


@runtime_checkable
class Model(Protocol):
    """What the node, aggregation and checkpoints need from a learner."""

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        ...

    def get_params(self) -> F32:
        """A flat float32 copy of all parameters (safe to keep or send)."""
        ...

    def set_params(self, params: np.ndarray) -> None:
        """Overwrite all parameters; ValueError on wrong shape, dtype or non-finite values."""
        ...

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        rng: np.random.Generator,
    ) -> float:
        """Minibatch SGD with momentum; returns the mean training loss of the last epoch."""
        ...

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Mapping[str, float]:
        """Metrics on the given samples: "loss" always (lower is better), "accuracy"
        for classification, and anything else the model wants to report.

        Status, metrics.jsonl, the scenario table and the plot show whatever is here.
        """
        ...

    def get_optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies of the optimizer buffers, for checkpoints that resume exactly."""
        ...

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore buffers from `get_optimizer_state`; ValueError if they do not fit."""
        ...

    def reset_optimizer(self) -> None:
        """Zero the optimizer buffers (e.g. after adopting a very different model)."""
        ...


def check_flat_vector(vec: np.ndarray, num_params: int, what: str, model: str) -> None:
    """The one validation of a flat parameter vector a model is handed (ValueError):
    float32, shape (num_params,), finite. `model` names the model in the message."""
    if not isinstance(vec, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(vec).__name__}")
    if vec.dtype != np.float32:
        raise ValueError(f"{what} must have dtype float32, got {vec.dtype}")
    if vec.shape != (num_params,):
        raise ValueError(f"{what} must have shape ({num_params},) for {model}, got {vec.shape}")
    if not np.isfinite(vec).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def clip_factors(sq_norms: np.ndarray, clip: float) -> F32:
    """Per-example scale min(1, clip / ||g_i||) from the squared gradient norms."""
    norms = np.sqrt(np.maximum(sq_norms, 0.0))
    out: F32 = np.minimum(1.0, clip / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def softmax_cross_entropy(logits: F32, y: npt.NDArray[np.int64]) -> tuple[float, F32]:
    """Mean cross-entropy and its gradient w.r.t. the logits.

    Subtracting the row max first keeps exp() from overflowing. `logits` is consumed
    (overwritten in place) to save an allocation per step.
    """
    n = logits.shape[0]
    rows = np.arange(n)
    logits -= logits.max(axis=1, keepdims=True)
    picked = logits[rows, y]  # fancy indexing copies: survives the in-place exp below
    np.exp(logits, out=logits)
    sums = logits.sum(axis=1, keepdims=True)
    # -log p_y = log(sum exp z) - z_y: exact even where p_y underflows to 0 in float32.
    loss = float((np.log(sums[:, 0]) - picked).mean(dtype=np.float64))
    probs = logits
    probs /= sums
    probs[rows, y] -= 1.0
    probs /= np.float32(n)
    return loss, probs


class FlatParamModel(ABC):
    """Base for models whose parameters are one flat float32 vector with layer views.

    Subclasses lay out their layers in `self._params` / `self._grad` and implement the
    forward pass and the forward+backward pass; this class owns validation, the SGD
    loop, momentum and evaluation, so every model trains identically.
    """

    name: str = "flat"

    def __init__(self, n_features: int, n_classes: int, num_params: int) -> None:
        if n_features < 1 or n_classes < 2:
            raise ValueError(
                f"need n_features >= 1 and n_classes >= 2, got {n_features=} {n_classes=}"
            )
        self.n_features = n_features
        self.n_classes = n_classes
        self._params: F32 = np.zeros(num_params, dtype=np.float32)
        self._grad: F32 = np.zeros(num_params, dtype=np.float32)
        self._momentum: F32 = np.zeros(num_params, dtype=np.float32)
        self._step: F32 = np.zeros(num_params, dtype=np.float32)
        # FedProx (Li et al. 2020): mu of the proximal term mu/2 ||w - w_start||^2 that
        # `fit` adds to the objective, w_start being the model the call starts from.
        self.prox_mu = np.float32(0.0)
        self.prox_anchor: F32 | None = None  # None: the parameters `fit` starts from
        # DP-SGD (Abadi et al. 2016): per-example clip norm and noise multiplier; a clip
        # of 0 is off. See `set_dp_sgd`.
        self.dp_clip = 0.0
        self.dp_noise = 0.0
        self._dp_rng: np.random.Generator | None = None

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the tensors inside the flat vector, in order.

        Two models exchange parameters only if their layouts agree: the count alone
        would let a (64, 32) and a (32, 64) layer swap values silently.
        """
        return [(self.name, (self.num_params,))]

    # --- subclass hooks -----------------------------------------------------------------
    @abstractmethod
    def logits(self, x: F32) -> F32:
        """Class scores for a float32 batch (a fresh array the caller may overwrite)."""

    @abstractmethod
    def _forward_backward(self, x: F32, y: npt.NDArray[np.int64]) -> float:
        """Fill `self._grad` with d(objective)/d(params); return the mean cross-entropy."""

    def _clipped_backward(self, x: F32, y: npt.NDArray[np.int64], clip: float) -> float:
        """Fill `self._grad` with the sum over the batch of each example's cross-entropy
        gradient clipped to L2 norm `clip` (no weight decay); return the mean loss.
        Models that support DP-SGD implement it without materialising per-example
        gradients (a layer's per-example gradient is an outer product, whose norm is
        the product of two vector norms)."""
        raise NotImplementedError(f"{self.name} does not support DP-SGD")

    def _add_weight_decay(self) -> None:
        """Add the data-independent regulariser's gradient to `self._grad` (DP-SGD adds
        it after clipping and noise: it reveals nothing about the examples). None by
        default."""
        return None

    # --- parameters -----------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return int(self._params.size)

    def get_params(self) -> F32:
        return self._params.copy()

    def set_params(self, params: np.ndarray) -> None:
        self._check_vector(params, "params")
        self._params[...] = params  # in place: the layer views stay valid

    def _check_vector(self, vec: np.ndarray, what: str) -> None:
        check_flat_vector(
            vec,
            self.num_params,
            what,
            f"{self.name} ({self.n_features} features, {self.n_classes} classes)",
        )

    # --- optimizer state ------------------------------------------------------------------
    def get_optimizer_state(self) -> dict[str, np.ndarray]:
        return {"momentum": self._momentum.copy()}

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        if set(state) != {"momentum"}:
            raise ValueError(
                f"optimizer state must have exactly the key 'momentum', got {sorted(state)}"
            )
        self._check_vector(state["momentum"], "optimizer state 'momentum'")
        self._momentum[...] = state["momentum"]

    def reset_optimizer(self) -> None:
        self._momentum.fill(0.0)

    def set_proximal(self, mu: float, anchor: np.ndarray | None = None) -> None:
        """FedProx: from now on `fit` minimises the loss plus mu/2 ||w - w_start||^2.

        Why: on skewed shards many local steps drift each node towards its own optimum
        and the average of drifted models is a poor model; the proximal term keeps each
        node's round near the model it started from. 0 turns it off and leaves `fit`
        bit-identical to plain SGD (the term is never computed). With `anchor`, the
        term pulls towards that vector instead of w_start (Ditto's personal model is
        kept near the global one, not near where it started).
        """
        if not (np.isfinite(mu) and mu >= 0):
            raise ValueError(f"FedProx mu must be a finite number >= 0, got {mu!r}")
        if anchor is not None:
            self._check_vector(anchor, "proximal anchor")
        self.prox_mu = np.float32(mu)
        self.prox_anchor = None if anchor is None else np.array(anchor, dtype=np.float32)

    def set_dp_sgd(self, clip: float, noise_multiplier: float, *, seed: int) -> None:
        """Example-level DP-SGD (Abadi et al. 2016) from now on: each minibatch gradient
        is the sum of the examples' gradients, each clipped to L2 norm `clip`, plus
        Gaussian noise of std `noise_multiplier * clip`, divided by the batch size.
        Weight decay and FedProx's term are added afterwards (they depend on no
        example). `clip = 0` turns it off (`fit` is then bit-identical to plain SGD).
        The privacy this buys is for the examples of this node's training data, per
        step; accounting over steps and rounds is `p2pfl.privacy`'s job.
        """
        if not (np.isfinite(clip) and clip >= 0):
            raise ValueError(f"DP-SGD clip must be a finite number >= 0, got {clip!r}")
        if not (np.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"DP-SGD noise multiplier must be >= 0, got {noise_multiplier!r}")
        if clip > 0:
            probe = np.zeros((1, self.n_features), dtype=np.float32)
            self._clipped_backward(probe, np.zeros(1, dtype=np.int64), float(clip))
        self.dp_clip = float(clip)
        self.dp_noise = float(noise_multiplier)
        self._dp_rng = np.random.default_rng(seed) if clip > 0 else None

    def _dp_backward(self, x: F32, y: npt.NDArray[np.int64]) -> float:
        """`self._grad` = (sum of clipped per-example gradients + N(0, (noise*clip)^2))
        / batch size, then the weight decay; returns the mean loss."""
        assert self._dp_rng is not None
        loss = self._clipped_backward(x, y, self.dp_clip)
        if self.dp_noise > 0:
            noise = self._dp_rng.standard_normal(self.num_params, dtype=np.float32)
            noise *= np.float32(self.dp_noise * self.dp_clip)
            self._grad += noise
        self._grad /= np.float32(x.shape[0])
        self._add_weight_decay()
        return loss

    def _add_proximal(self, anchor: F32) -> None:
        """grad += mu * (w - anchor), in place, through the `_step` scratch buffer."""
        np.subtract(self._params, anchor, out=self._step)
        self._step *= self.prox_mu
        self._grad += self._step

    # --- training and evaluation ----------------------------------------------------------
    def _check_xy(self, x: np.ndarray, y: np.ndarray) -> tuple[F32, npt.NDArray[np.int64]]:
        x32 = np.asarray(x, dtype=np.float32)
        y64 = np.asarray(y, dtype=np.int64)
        if x32.ndim != 2 or x32.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (n, {self.n_features}), got {x32.shape}")
        if y64.shape != (x32.shape[0],):
            raise ValueError(f"y must have shape ({x32.shape[0]},), got {y64.shape}")
        if y64.size and (y64.min() < 0 or y64.max() >= self.n_classes):
            raise ValueError(f"labels must lie in [0, {self.n_classes})")
        return x32, y64

    def loss_and_gradient(
        self, x: np.ndarray, y: np.ndarray, *, anchor: np.ndarray | None = None
    ) -> tuple[float, F32]:
        """Mean cross-entropy and a copy of the full gradient (incl. weight decay).

        With an `anchor` (FedProx's w_start) and mu > 0, both include the proximal term
        mu/2 ||w - anchor||^2 exactly as `fit` adds it. Not part of the protocol;
        exposed for gradient checks and diagnostics.
        """
        x32, y64 = self._check_xy(x, y)
        loss = self._forward_backward(x32, y64)
        if anchor is not None and self.prox_mu > 0:
            self._check_vector(anchor, "anchor")
            self._add_proximal(anchor)
            gap = np.subtract(self._params, anchor, dtype=np.float64)
            loss += 0.5 * float(self.prox_mu) * float(gap @ gap)
        return loss, self._grad.copy()

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        rng: np.random.Generator,
    ) -> float:
        """Momentum SGD over freshly shuffled minibatches each epoch.

        The momentum buffer persists across calls (one optimizer across rounds);
        call `reset_optimizer` to drop it. The returned loss is the sample-weighted
        mean cross-entropy of the last epoch's minibatches (weight decay and FedProx's
        proximal term excluded). With `set_proximal(mu)`, mu > 0, each step's gradient
        also carries mu * (w - w_start), w_start being the parameters at this call.
        """
        x32, y64 = self._check_xy(x, y)
        n = x32.shape[0]
        if n == 0:
            raise ValueError("cannot fit on an empty dataset")
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs=} {batch_size=} {lr=}"
            )
        neg_lr = np.float32(-lr)
        anchor = None
        if self.prox_mu > 0:
            anchor = self.prox_anchor if self.prox_anchor is not None else self._params.copy()
        epoch_loss = 0.0
        for _ in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                if self.dp_clip > 0:
                    total += self._dp_backward(x32[idx], y64[idx]) * idx.size
                else:
                    total += self._forward_backward(x32[idx], y64[idx]) * idx.size
                if anchor is not None:
                    self._add_proximal(anchor)
                self._momentum *= MOMENTUM
                self._momentum += self._grad
                np.multiply(self._momentum, neg_lr, out=self._step)
                self._params += self._step
            epoch_loss = total / n
        return epoch_loss

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        x32, y64 = self._check_xy(x, y)
        n = x32.shape[0]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, _EVAL_CHUNK):
            xb, yb = x32[start : start + _EVAL_CHUNK], y64[start : start + _EVAL_CHUNK]
            z = self.logits(xb)
            correct += int((z.argmax(axis=1) == yb).sum())
            loss, _ = softmax_cross_entropy(z, yb)
            loss_sum += loss * yb.size
        return {"loss": loss_sum / n, "accuracy": correct / n}


def build_model(
    name: str, n_features: int, n_classes: int, *, seed: int, hidden: int = 32
) -> Model:
    """Build a freshly initialized model; the same seed gives identical parameters.

    All nodes of a federation build from the same seed so they start from one model.
    """
    # Local imports: the model modules import this one for the base class.
    if name == "softmax":
        from p2pfl.learning.softmax import SoftmaxRegression

        return SoftmaxRegression(n_features, n_classes, seed=seed)
    if name == "mlp":
        from p2pfl.learning.mlp import MLP

        return MLP(n_features, n_classes, seed=seed, hidden=hidden)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
