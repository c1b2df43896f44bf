"""The privacy accountant: Google's `dp-accounting` (RDP), never a hand-written one.

Why a library: composing Gaussian mechanisms over rounds and converting to (epsilon,
delta) is easy to get subtly wrong (orders, conversions, the neighbouring relation); the
RDP accountant of `dp-accounting` is the one TensorFlow Privacy and many papers use.

Each round a node contributes is one Gaussian mechanism with noise multiplier sigma
(noise std / clip norm) on its whole data (no subsampling: a node trains on all of its
shard every round, so there is no amplification to claim). Rounds compose adaptively;
a history of (sigma, rounds) runs is handed over as one composed event, so a node whose
operator changed the noise between restarts is still accounted exactly.

`dp-accounting` is an optional extra (`pip install 'p2pfl[dp]'`); it is imported only
when a node with privacy on starts, and its absence is one line naming the extra.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

EXTRA_HINT = "pip install 'p2pfl[dp]' (it installs dp-accounting)"


class AccountingUnavailable(ImportError):
    """`dp-accounting` is not installed; the message names the extra to install."""


def dp_accounting() -> Any:
    """The `dp_accounting` module, imported on first use (it takes a second to import)."""
    try:
        import dp_accounting as module
    except ImportError as exc:
        raise AccountingUnavailable(
            f"differential privacy needs the dp extra: {EXTRA_HINT} ({exc})"
        ) from None
    return module


def _event(history: Sequence[tuple[float, int]]) -> Any:
    dpa = dp_accounting()
    events = [
        dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(float(sigma)), int(count))
        for sigma, count in history
        if count > 0
    ]
    return dpa.ComposedDpEvent(events)


def epsilon_spent(history: Sequence[tuple[float, int]], delta: float) -> float:
    """Epsilon at `delta` after the rounds of `history` ((sigma, rounds) runs): 0 for
    none, inf when a run had no noise."""
    if not any(count > 0 for _, count in history):
        return 0.0
    if any(count > 0 and not sigma > 0 for sigma, count in history):
        return math.inf
    accountant = dp_accounting().rdp.RdpAccountant()
    accountant.compose(_event(history))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=32)  # every in-process node of a scenario asks the same
def noise_for_epsilon(epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier (within 1e-4 relative) whose `rounds` rounds spend at
    most `epsilon` at `delta`, found by dp-accounting's own search (Brent's method)."""
    if not (epsilon > 0 and 0 < delta < 1 and rounds >= 1):
        raise ValueError(
            f"need epsilon > 0, 0 < delta < 1, rounds >= 1; got {epsilon=}, {delta=}, {rounds=}"
        )
    dpa = dp_accounting()
    sigma = float(
        dpa.calibrate_dp_mechanism(
            dpa.rdp.RdpAccountant,
            lambda s: dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), rounds),
            epsilon,
            delta,
            bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-6,
        )
    )
    # The search is within its tolerance of the optimum on either side; the budget must
    # hold exactly, so step up until the accountant itself says it does.
    while epsilon_spent([(sigma, rounds)], delta) > epsilon:
        sigma *= 1.0001
    return sigma


@functools.lru_cache(maxsize=256)
def dp_sgd_epsilon(
    sampling_rate: float, noise_multiplier: float, steps: int, delta: float
) -> float:
    """Example-level epsilon at `delta` after `steps` DP-SGD steps, each a Gaussian
    mechanism with `noise_multiplier` on a batch that is a `sampling_rate` fraction of
    the node's examples (RDP of the Poisson-subsampled Gaussian, as in Abadi et al.
    2016 and TensorFlow Privacy). The built-in models shuffle and take fixed-size
    batches rather than Poisson samples; accounting them as Poisson-sampled is the
    common approximation (Opacus and TF Privacy report the same), said in the docs."""
    if steps <= 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    dpa = dp_accounting()
    q = min(1.0, max(0.0, float(sampling_rate)))
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(float(noise_multiplier))), int(steps)
    )
    accountant = dpa.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
