"""Outer (server-side) optimizers of federated learning, run by every node on its own.

Why: plain FedAvg adopts the aggregate as the next model. Reddi et al. (ICLR 2021,
"Adaptive Federated Optimization") read the aggregate as one step of an outer
optimizer instead: the change the round proposes is a *pseudo-gradient*, and an outer
optimizer with its own learning rate, momentum and per-coordinate scaling decides how
far to move along it. On heterogeneous (non-IID) shards this damps the coordinates
where the nodes disagree from round to round and speeds up the ones they agree on. In a
decentralized federation there is no server: each node keeps its own outer state and
applies it to its own round, between the model it started the round from and what its
aggregation rule returned.

Sign convention: ``delta = aggregate - before`` (a *descent* direction, the opposite of
a gradient, as in the paper's Algorithm 2), and every update is ``next = before +
lr * direction``. With that convention:

* ``fedavg``: ``next = aggregate`` (identity; no state, bit-exact).
* ``fedavgm`` (server momentum, Hsu et al. 2019): ``m = beta1 * m + delta``,
  ``next = before + lr * m``. lr 1 and beta1 0 is FedAvg.
* ``fedadagrad``: ``m = beta1 * m + (1 - beta1) * delta``, ``v = v + delta**2``.
* ``fedadam``: same m, ``v = beta2 * v + (1 - beta2) * delta**2``.
* ``fedyogi``: same m, ``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)``
  (v grows at most additively, so one large round cannot shrink the step for long).
* adaptive three: ``next = before + lr * m / (sqrt(v) + tau)``.

As in the paper, ``m`` starts at 0, ``v`` at ``tau**2`` and there is no bias correction
(tau bounds the per-coordinate step at about ``lr * |m| / tau`` instead). The paper
fixes beta1 = 0.9, beta2 = 0.99 and tunes lr and tau per task; our defaults for lr were
measured on digits (docs/optimizers.md) and are in `DEFAULT_LR`.

State is a few float32 vectors of the model's size plus a step count: `state()` gives a
dict of arrays for the checkpoint, `load_state` takes it back (keys carry the
optimizer's name, so a checkpoint of another optimizer is recognised, not misread).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from p2pfl.config import OUTER_OPTIMIZERS

F32 = npt.NDArray[np.float32]

ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
DEFAULT_LR = {
    "fedavg": 1.0,
    "fedavgm": 1.0,
    "fedadagrad": 1.0,
    "fedadam": 0.1,
    "fedyogi": 0.1,
}
"""The outer learning rate when the config leaves it at 0: the best of a grid on digits
(8 nodes, Dirichlet 0.3, 20 rounds, 3 seeds; docs/optimizers.md). The paper tunes it
per task (its grid spans 10^-3 .. 10^1); the per-coordinate step of the adaptive three
is about lr * |m| / (sqrt(v) + tau), so their lr is a step size in parameter units."""
DEFAULT_BETA1 = 0.9  # Reddi et al.: fixed at 0.9 in all their experiments
DEFAULT_BETA2 = 0.99  # likewise
DEFAULT_TAU = 1e-3  # the adaptivity floor; the paper's grid goes 1e-5 .. 1e-1


class OuterOptimizer:
    """One node's outer optimizer (sans-IO: arrays in, arrays out, state as arrays)."""

    def __init__(
        self,
        name: str,
        *,
        lr: float = 0.0,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        tau: float = DEFAULT_TAU,
    ) -> None:
        if name not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"unknown outer optimizer {name!r}; choose one of {', '.join(OUTER_OPTIMIZERS)}"
            )
        lr = DEFAULT_LR[name] if lr == 0 else lr
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"outer learning rate must be > 0, got {lr!r}")
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"outer betas must be in [0, 1), got {beta1!r}, {beta2!r}")
        if not (np.isfinite(tau) and tau > 0):
            raise ValueError(f"outer tau must be > 0, got {tau!r}")
        self.name = name
        self.lr = np.float32(lr)
        self.beta1 = np.float32(beta1)
        self.beta2 = np.float32(beta2)
        self.tau = np.float32(tau)
        self.step_count = 0
        self.m: F32 | None = None  # momentum (fedavgm, and the adaptive three)
        self.v: F32 | None = None  # second moment (the adaptive three)

    @property
    def identity(self) -> bool:
        """FedAvg: the aggregate is adopted as is (callers may skip the optimizer)."""
        return self.name == "fedavg"

    def step(self, before: np.ndarray, aggregate: np.ndarray) -> F32:
        """The next model, from the model the round started at and the round's aggregate.

        An aggregate that is not finite (or of another shape) is handed back untouched
        and leaves the state as it was: the round machine refuses such an aggregate
        anyway, and a NaN must never reach the moments, which would carry it forever.
        """
        agg = np.asarray(aggregate, dtype=np.float32)
        if self.identity:
            return agg
        start = np.asarray(before, dtype=np.float32)
        if agg.shape != start.shape or not np.isfinite(agg).all():
            return agg
        delta = np.subtract(agg, start, dtype=np.float32)
        self._fit(delta.shape)
        assert self.m is not None
        m = self.m
        if self.name == "fedavgm":
            m *= self.beta1
            m += delta
            direction = m
        else:
            assert self.v is not None
            v = self.v
            m *= self.beta1
            m += (np.float32(1.0) - self.beta1) * delta
            sq = np.square(delta)
            if self.name == "fedadagrad":
                v += sq
            elif self.name == "fedadam":
                v *= self.beta2
                v += (np.float32(1.0) - self.beta2) * sq
            else:  # fedyogi
                # v - (1 - beta2) * d^2 * sign(v - d^2), computed into `sq`.
                sq *= np.sign(v - sq)
                sq *= np.float32(1.0) - self.beta2
                v -= sq
            direction = np.sqrt(v)
            direction += self.tau
            np.divide(m, direction, out=direction)
        self.step_count += 1
        direction = direction * self.lr  # never scale the momentum buffer itself
        direction += start
        out: F32 = direction
        return out

    def _fit(self, shape: tuple[int, ...]) -> None:
        """Fresh moments for a model of `shape` (the first round, or another model)."""
        if self.m is None or self.m.shape != shape:
            self.m = np.zeros(shape, np.float32)
            self.v = np.full(shape, self.tau * self.tau, np.float32) if self.adaptive else None
            self.step_count = 0

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE

    def reset(self) -> None:
        """Forget the moments (e.g. after training diverged: they no longer describe
        where the federation is going)."""
        self.m = self.v = None
        self.step_count = 0

    # ---- checkpoints -------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the moments and the step count, keyed ``<name>.<what>``; empty for
        FedAvg and before the first step."""
        if self.identity or self.m is None:
            return {}
        state = {
            f"{self.name}.m": self.m.copy(),
            # int32: the dtypes a checkpoint stores (p2pfl.wire.tensors); 2**31 rounds.
            f"{self.name}.step": np.array([min(self.step_count, 2**31 - 1)], np.int32),
        }
        if self.v is not None:
            state[f"{self.name}.v"] = self.v.copy()
        return state

    def load_state(self, state: dict[str, np.ndarray], num_params: int) -> bool:
        """Take back `state()`; False (state left fresh) when it is empty or belongs to
        another optimizer or model size, ValueError when it is ours but damaged."""
        if self.identity or not state:
            return False
        ours = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{self.name}.")}
        if not ours or len(ours) != len(state):
            return False  # another optimizer's state: start fresh
        want = {"m", "step", "v"} if self.adaptive else {"m", "step"}
        if set(ours) != want:
            raise ValueError(f"outer optimizer state has keys {sorted(ours)}, want {sorted(want)}")
        step = np.asarray(ours["step"]).reshape(-1)
        if step.size != 1 or int(step[0]) < 0:
            raise ValueError(f"outer optimizer state: bad step {ours['step']!r}")
        moments = {k: np.asarray(ours[k], np.float32) for k in want - {"step"}}
        if any(a.shape != (num_params,) for a in moments.values()):
            return False  # written for a model of another size
        if not all(np.isfinite(a).all() for a in moments.values()):
            raise ValueError("outer optimizer state contains NaN or infinite values")
        self.m = moments["m"].copy()
        self.v = moments["v"].copy() if "v" in moments else None
        self.step_count = int(step[0])
        return True
