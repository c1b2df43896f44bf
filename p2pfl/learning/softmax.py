"""Multinomial logistic regression: the smallest model that learns digits well.

Parameter layout (flat float32): W (n_features x n_classes, row-major), then b
(n_classes). Weight decay applies to W only; a small L2 keeps the weights bounded on
separable shards, where unregularized logits would grow without limit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from p2pfl.learning.model import F32, FlatParamModel, clip_factors, softmax_cross_entropy

WEIGHT_DECAY = 1e-4


class SoftmaxRegression(FlatParamModel):
    name = "softmax"

    def __init__(
        self, n_features: int, n_classes: int, *, seed: int, weight_decay: float = WEIGHT_DECAY
    ) -> None:
        d, k = n_features, n_classes
        super().__init__(n_features, n_classes, d * k + k)
        self.weight_decay = np.float32(weight_decay)
        self._w, self._b = self._params[: d * k].reshape(d, k), self._params[d * k :]
        self._gw, self._gb = self._grad[: d * k].reshape(d, k), self._grad[d * k :]
        # Small random weights (not zeros) so the seed really determines the start.
        rng = np.random.default_rng(seed)
        self._w[...] = rng.normal(0.0, 0.01, size=(d, k))

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [("w", (self.n_features, self.n_classes)), ("b", (self.n_classes,))]

    def logits(self, x: F32) -> F32:
        z: F32 = x @ self._w
        z += self._b
        return z

    def _forward_backward(self, x: F32, y: npt.NDArray[np.int64]) -> float:
        loss, dz = softmax_cross_entropy(self.logits(x), y)
        np.matmul(x.T, dz, out=self._gw)
        self._gw += self.weight_decay * self._w
        np.sum(dz, axis=0, out=self._gb)
        return loss

    def _clipped_backward(self, x: F32, y: npt.NDArray[np.int64], clip: float) -> float:
        # Example i's gradient is (x_i outer g_i, g_i), g_i its row of the logits'
        # gradient: squared norm (||x_i||^2 + 1) ||g_i||^2. Scaling the rows of g scales
        # each example's gradient, so one matmul gives the clipped sum.
        loss, dz = softmax_cross_entropy(self.logits(x), y)
        dz *= np.float32(x.shape[0])  # per-example gradients, not the batch mean's
        sq = (np.einsum("ij,ij->i", x, x) + 1.0) * np.einsum("ij,ij->i", dz, dz)
        dz *= clip_factors(sq, clip)[:, None]
        np.matmul(x.T, dz, out=self._gw)
        np.sum(dz, axis=0, out=self._gb)
        return loss

    def _add_weight_decay(self) -> None:
        self._gw += self.weight_decay * self._w
