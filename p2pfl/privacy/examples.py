"""Example-level DP-SGD on a node: hand the clip and noise to the model, count the
steps, and report the example-level epsilon.

Why apart from `NodePrivacy`: DP-SGD protects each record inside a node's training
(per-example clipping and noise in every minibatch, `FlatParamModel.set_dp_sgd`), not
the node's data set as a whole; its epsilon composes over SGD steps with amplification
by subsampling, and it has no budget that stops the node (node-level DP has that). The
two can be combined; each reports its own epsilon.

Steps are counted from the rounds this node has trained; after a restart they are
re-derived from the checkpoint's round (the node trained once per round before it),
so a round retrained after a crash is not counted twice here (a conservative count
would: the docs say so).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from p2pfl.config import ConfigError
from p2pfl.privacy.accountant import AccountingUnavailable, dp_accounting, dp_sgd_epsilon


class ExampleLevelDP:
    """The DP-SGD settings of one node and the steps it has taken."""

    def __init__(
        self, *, clip: float, noise: float, delta: float, batch_size: int, examples: int,
        epochs: int,
    ) -> None:  # fmt: skip
        self.clip = clip
        self.noise = noise
        self.delta = delta
        self.examples = max(1, examples)
        self.sampling_rate = min(1.0, batch_size / self.examples)
        self.steps_per_round = epochs * math.ceil(self.examples / batch_size)
        self.rounds = 0

    @classmethod
    def attach(cls, model: Any, config: Any, examples: int) -> ExampleLevelDP | None:
        """Turn DP-SGD on in `model` as `config` asks (None when it is off); a model
        without per-example clipping, or a missing dp extra, is a config error."""
        if config.dp_sgd_clip <= 0:
            return None
        try:
            dp_accounting()
        except AccountingUnavailable as exc:
            raise ConfigError("dp_sgd_clip", str(exc)) from None
        set_dp_sgd = getattr(model, "set_dp_sgd", None)
        if set_dp_sgd is None:
            raise ConfigError(
                "dp_sgd_clip",
                f"the model {getattr(model, 'name', type(model).__name__)} has no "
                "set_dp_sgd(clip, noise_multiplier, seed=...): DP-SGD works with the built-in "
                "numpy models (not yet through Opacus for the PyTorch adapter)",
            )
        try:  # OS entropy, never the configured seed (it would let anyone remove it)
            set_dp_sgd(config.dp_sgd_clip, config.dp_sgd_noise, seed=secrets.randbits(63))
        except NotImplementedError as exc:
            raise ConfigError("dp_sgd_clip", str(exc)) from None
        return cls(
            clip=config.dp_sgd_clip,
            noise=config.dp_sgd_noise,
            delta=config.dp_delta,
            batch_size=config.batch_size,
            examples=examples,
            epochs=config.epochs,
        )

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round

    def status(self) -> dict[str, Any]:
        eps = dp_sgd_epsilon(self.sampling_rate, self.noise, self.steps, self.delta)
        return {
            "epsilon": round(eps, 6) if math.isfinite(eps) else None,
            "delta": self.delta,
            "steps": self.steps,
            "rounds": self.rounds,
            "sampling_rate": round(self.sampling_rate, 6),
            "clip": self.clip,
            "noise_multiplier": self.noise,
        }
