"""One-hidden-layer perceptron with ReLU: a small non-linear model for comparisons.

Parameter layout (flat float32): W1 (n_features x hidden), b1 (hidden),
W2 (hidden x n_classes), b2 (n_classes), each row-major. He initialization suits
ReLU; biases start at zero. Weight decay applies to W1 and W2 only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from p2pfl.learning.model import F32, FlatParamModel, clip_factors, softmax_cross_entropy

WEIGHT_DECAY = 1e-4


class MLP(FlatParamModel):
    name = "mlp"

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        seed: int,
        hidden: int = 32,
        weight_decay: float = WEIGHT_DECAY,
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        d, h, k = n_features, hidden, n_classes
        super().__init__(n_features, n_classes, d * h + h + h * k + k)
        self.hidden = hidden
        self.weight_decay = np.float32(weight_decay)
        self._w1, self._b1, self._w2, self._b2 = _views(self._params, d, h, k)
        self._gw1, self._gb1, self._gw2, self._gb2 = _views(self._grad, d, h, k)
        rng = np.random.default_rng(seed)
        self._w1[...] = rng.normal(0.0, np.sqrt(2.0 / d), size=(d, h))
        self._w2[...] = rng.normal(0.0, np.sqrt(2.0 / h), size=(h, k))

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        d, h, k = self.n_features, self.hidden, self.n_classes
        return [("w1", (d, h)), ("b1", (h,)), ("w2", (h, k)), ("b2", (k,))]

    def _hidden(self, x: F32) -> F32:
        a: F32 = x @ self._w1
        a += self._b1
        np.maximum(a, 0.0, out=a)
        return a

    def logits(self, x: F32) -> F32:
        z: F32 = self._hidden(x) @ self._w2
        z += self._b2
        return z

    def _forward_backward(self, x: F32, y: npt.NDArray[np.int64]) -> float:
        a = self._hidden(x)
        z: F32 = a @ self._w2
        z += self._b2
        loss, dz = softmax_cross_entropy(z, y)
        np.matmul(a.T, dz, out=self._gw2)
        self._gw2 += self.weight_decay * self._w2
        np.sum(dz, axis=0, out=self._gb2)
        da: F32 = dz @ self._w2.T
        da *= a > 0  # ReLU gate: a > 0 exactly where the pre-activation was positive
        np.matmul(x.T, da, out=self._gw1)
        self._gw1 += self.weight_decay * self._w1
        np.sum(da, axis=0, out=self._gb1)
        return loss

    def _clipped_backward(self, x: F32, y: npt.NDArray[np.int64], clip: float) -> float:
        # Per example: (a_i outer dz_i, dz_i) for the output layer, (x_i outer da_i,
        # da_i) for the hidden one; each outer product's norm is the product of the
        # two norms, so the squared norm needs only row norms. da is linear in dz row
        # by row, so scaling dz's rows scales both layers' per-example gradients.
        a = self._hidden(x)
        z: F32 = a @ self._w2
        z += self._b2
        loss, dz = softmax_cross_entropy(z, y)
        dz *= np.float32(x.shape[0])  # per-example gradients, not the batch mean's
        da: F32 = dz @ self._w2.T
        da *= a > 0
        sq = (_row_sq(a) + 1.0) * _row_sq(dz) + (_row_sq(x) + 1.0) * _row_sq(da)
        c = clip_factors(sq, clip)[:, None]
        dz *= c
        da *= c
        np.matmul(a.T, dz, out=self._gw2)
        np.sum(dz, axis=0, out=self._gb2)
        np.matmul(x.T, da, out=self._gw1)
        np.sum(da, axis=0, out=self._gb1)
        return loss

    def _add_weight_decay(self) -> None:
        self._gw2 += self.weight_decay * self._w2
        self._gw1 += self.weight_decay * self._w1


def _row_sq(m: F32) -> np.ndarray:
    """Squared L2 norm of every row."""
    out: np.ndarray = np.einsum("ij,ij->i", m, m, dtype=np.float64)
    return out


def _views(flat: F32, d: int, h: int, k: int) -> tuple[F32, F32, F32, F32]:
    """Split a flat vector into (W1, b1, W2, b2) views, no copies."""
    o1 = d * h
    o2 = o1 + h
    o3 = o2 + h * k
    return flat[:o1].reshape(d, h), flat[o1:o2], flat[o2:o3].reshape(h, k), flat[o3:]
