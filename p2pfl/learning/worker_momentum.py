"""Worker momentum (Karimireddy, He and Jaggi, ICML 2021, "Learning from History for
Byzantine Robust Optimization"), at the level of a decentralized round.

Why: a robust rule can only tell an attacker from an honest node when the honest inputs
sit closer to each other than the attacker's distortion. Each honest round update is
noisy (a few minibatches of a skewed shard), and an attacker hides inside that noise
(ALIE, IPM). Averaging each node's updates over time shrinks the noise of what it
sends by about sqrt((1 - beta) / (1 + beta)), while the drift the attacker must add to
do harm stays the same, so the rule sees a tighter honest cluster.

Where: on the round's update, not inside the optimizer. The local SGD already has its
own heavy-ball momentum (`learning.model.MOMENTUM`), which smooths minibatch gradients
within a round but does nothing to what crosses the network. Here the node trains from
its round start `s` to `w`, takes the update `u = w - s`, keeps

    m_1 = u_1,    m_t = beta * m_{t-1} + (1 - beta) * u_t,

and both sends and aggregates with `s + m_t` (its own model counts in the rule, so it
must be the same vector its neighbours see). The paper's recursion starts from m_0 = 0;
with a federation that runs tens of rounds, not thousands of steps, that zero start
costs several rounds of progress ((1 - beta) of the first update), so the buffer starts
at the first update, as PyTorch's SGD momentum does. The buffer is not checkpointed: a
restarted node starts it again from its next update.
"""

from __future__ import annotations

import numpy as np


class WorkerMomentum:
    """The exponential average of a node's round updates (sans-IO: arrays in, out)."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"worker momentum must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.buffer: np.ndarray | None = None

    def apply(self, start: np.ndarray, trained: np.ndarray) -> np.ndarray:
        """The model to send and aggregate for a round trained from `start` to `trained`:
        `start + m`, with m updated by this round's update."""
        update = np.subtract(trained, start, dtype=np.float32)
        if self.buffer is None or self.buffer.shape != update.shape:
            self.buffer = update
        else:
            # m = beta * m + (1 - beta) * u, in place (one pass, no temporaries of size d
            # beyond the update itself).
            self.buffer *= self.beta
            self.buffer += (1.0 - self.beta) * update
        out: np.ndarray = np.add(start, self.buffer, dtype=np.float32)
        return out

    def reset(self) -> None:
        """Forget the history (training diverged: its updates are no guide)."""
        self.buffer = None
