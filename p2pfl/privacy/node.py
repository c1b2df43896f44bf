"""A node's privacy: its budget, the mechanism on each round's update, and the file that
keeps what it has spent across restarts.

Why a file of its own, written before the update leaves: the checkpoint is written after
a round's aggregation, so a node that crashed between sending its update and writing the
checkpoint would restart believing it never spent that round, and the budget would
silently grow by a round per crash. `privacy.json` is replaced atomically (fsync'd)
before `release` returns, so whatever has left the node is on disk first; a round
retrained after a restart is a second release and is charged again, as it must be.
An unreadable file stops the node: starting from zero would forget spent privacy.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.datadir import DataDir, atomic_write, read_file
from p2pfl.privacy.accountant import AccountingUnavailable, epsilon_spent, noise_for_epsilon
from p2pfl.privacy.budget import EpsilonOf, PrivacyBudget
from p2pfl.privacy.mechanism import gaussian_release

log = logging.getLogger("p2pfl.node")

STATE_FILE = "privacy.json"


class NodePrivacy:
    """Clip-and-noise each round's update, charged to an (epsilon, delta) budget."""

    def __init__(
        self,
        *,
        target: float | None,
        delta: float,
        clip: float,
        noise_multiplier: float,
        derived: bool = False,
        group_min: int = 1,
        rng: np.random.Generator | None = None,
        epsilon_of: EpsilonOf = epsilon_spent,
    ) -> None:
        if group_min < 1:
            raise ValueError(f"group_min must be >= 1, got {group_min}")
        self.clip = clip
        self.derived = derived  # the noise was derived from the target and the rounds
        # Distributed DP (with secure aggregation): each member of a group of at least
        # `group_min` adds 1/group_min of the noise variance, so the group's sum, the
        # only thing the group reveals, carries at least the full noise. 1 = local DP.
        self.group_min = group_min
        self.share = 1.0 / group_min
        self.topped_up = 0  # rounds whose update went out in the clear, full noise added
        self._epsilon_of = epsilon_of
        self.budget = PrivacyBudget(
            target=target, delta=delta, noise_multiplier=noise_multiplier, epsilon_of=epsilon_of
        )
        # OS entropy, never the configured seed: a seed anyone can read would let them
        # regenerate the noise and subtract it.
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._lock = threading.Lock()  # releases run in a worker thread, status on the loop
        self._path: Path | None = None
        self._stopped_logged = False
        self.stopped_at: int | None = None  # the first round not contributed (budget spent)
        self.clipped_rounds = 0

    @classmethod
    def from_config(cls, config: NodeConfig) -> NodePrivacy | None:
        """The node's privacy, or None when it is off; a missing extra is a config error."""
        if not config.privacy:
            return None
        field = "dp_epsilon" if config.dp_epsilon is not None else "dp_noise"
        try:
            if config.dp_noise is not None:
                noise, derived = config.dp_noise, False
            else:
                assert config.dp_epsilon is not None  # validated: one of them is set
                noise = noise_for_epsilon(config.dp_epsilon, config.dp_delta, config.rounds)
                derived = True
            return cls(
                target=config.dp_epsilon,
                delta=config.dp_delta,
                clip=config.dp_clip,
                noise_multiplier=noise,
                derived=derived,
                group_min=config.secure_min_group if config.secure_aggregation else 1,
            )
        except AccountingUnavailable as exc:
            raise ConfigError(field, str(exc)) from None

    def attach(self, datadir: DataDir, checkpoint_round: int) -> None:
        """Keep the spent budget in `datadir` from now on, starting from what it holds.

        An unreadable file is a ConfigError (the data dir is released first, as for a
        checkpoint of another model): the operator decides, never a silent reset."""
        path = datadir.path / STATE_FILE
        raw = read_file(path)
        with self._lock:
            self._path = path
            if raw is None:
                if checkpoint_round > 0:
                    log.warning(
                        "privacy: no %s beside a checkpoint at round %d; the budget starts at "
                        "0 (rounds released by an earlier run without it are not counted)",
                        STATE_FILE,
                        checkpoint_round,
                    )
                return
            try:
                history, last = PrivacyBudget.parse_state(json.loads(raw))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                datadir.close()
                raise ConfigError(
                    "dp_epsilon",
                    f"{path} is unreadable ({exc}); the privacy already spent cannot be "
                    "known: restore the file, or move it away to start a fresh budget "
                    "(which forgets what this node has released)",
                ) from None
            old = self.budget
            self.budget = PrivacyBudget(
                target=old.target,
                delta=old.delta,
                noise_multiplier=old.noise_multiplier,
                epsilon_of=self._epsilon_of,
                history=history,
                last_round=last,
            )
        log.info(
            "privacy: %d rounds already released, epsilon %.4g spent (delta %g)",
            self.budget.rounds,
            self.budget.spent,
            self.budget.delta,
        )

    def allows(self, round: int) -> bool:
        """May `round` contribute an update? No once the budget cannot pay for another
        round; said once, with what the node does instead."""
        with self._lock:
            if not self.budget.exhausted:
                return True
            if self.stopped_at is None:
                self.stopped_at = round
            b = self.budget
        if not self._stopped_logged:
            self._stopped_logged = True
            log.warning(
                "privacy budget spent: epsilon %.4g of %.4g (delta %g) after %d rounds; from "
                "round %d this node sends its round's start model (no new update) and keeps "
                "serving peers and aggregating",
                b.spent,
                b.target,
                b.delta,
                b.rounds,
                round,
            )
        return False

    def release(self, round: int, start: np.ndarray, trained: np.ndarray) -> np.ndarray:
        """What leaves the node for `round`: start + clip(update) + noise, charged (and on
        disk) before it is returned; `start` unchanged when the budget cannot pay.

        Blocking (fsync): a real node calls it in a worker thread."""
        if not self.allows(round):
            return start
        with self._lock:
            self.budget.charge(round)
            if self._path is not None:
                atomic_write(self._path, json.dumps(self.budget.state()).encode())
            out = gaussian_release(
                start,
                trained,
                clip=self.clip,
                noise_multiplier=self.budget.noise_multiplier * math.sqrt(self.share),
                rng=self._rng,
            )
            self.clipped_rounds += out.clipped
        return out.params

    def top_up(self, params: np.ndarray) -> np.ndarray:
        """A distributed-DP update about to leave in the clear (no group this round,
        policy "plain"): add the noise the group would have added, N(0, (1 - share)
        (sigma C)^2), so that what leaves carries the full noise its round was charged
        for (independent Gaussians add their variances)."""
        if self.share >= 1.0:
            return params
        std = self.budget.noise_multiplier * self.clip * math.sqrt(1.0 - self.share)
        with self._lock:
            noise = self._rng.standard_normal(params.size, dtype=np.float32)
            self.topped_up += 1
        noise *= np.float32(std)
        out: np.ndarray = np.asarray(params, dtype=np.float32) + noise
        return out

    def status(self) -> dict[str, Any]:
        """For `p2pfl status`, each metrics row and the scenario report."""
        with self._lock:
            out = {
                **self.budget.status(),
                "clip": self.clip,
                "noise_derived": self.derived,
                "clipped_rounds": self.clipped_rounds,
                "last_round": self.budget.last_round,
                "stopped_at": self.stopped_at,
            }
            if self.share < 1.0:
                # Against group mates who pool their own noise: all group_min - 1 others
                # of a smallest group leave only this node's share in the sum.
                worst = [(s * math.sqrt(self.share), n) for s, n in self.budget.history]
                colluding = self._epsilon_of(worst, self.budget.delta)
                out["distributed"] = {
                    "group_min": self.group_min,
                    "noise_share": round(self.share, 6),
                    "epsilon_if_mates_collude": _finite(colluding),
                    "topped_up_rounds": self.topped_up,
                }
            return out


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None
