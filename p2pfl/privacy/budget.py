"""A node's privacy budget: what it has spent, what is left, whether it may release again.

Sans-IO: the accountant is a function handed in (`p2pfl.privacy.accountant.epsilon_spent`
in a node, anything in a test), state goes in and out as plain JSON-able dicts, and
nothing here reads a clock, a file or a socket.

The budget is enforced before a release, not after: a round is charged only if the
epsilon after it stays within the target, so the spent epsilon never exceeds the budget
(the round that would have crossed it is never released). Without a target the budget
only counts (epsilon is reported, nothing is refused).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

EpsilonOf = Callable[[Sequence[tuple[float, int]], float], float]
"""(history of (noise multiplier, rounds) runs, delta) -> epsilon."""

STATE_VERSION = 1


class BudgetExhausted(RuntimeError):
    """A release was asked for that the budget cannot pay for."""


class PrivacyBudget:
    """The rounds released so far at which noise, and the epsilon they cost."""

    def __init__(
        self,
        *,
        target: float | None,
        delta: float,
        noise_multiplier: float,
        epsilon_of: EpsilonOf,
        history: Sequence[tuple[float, int]] = (),
        last_round: int | None = None,
    ) -> None:
        if target is not None and not target > 0:
            raise ValueError(f"the epsilon budget must be > 0, got {target!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"the noise multiplier must be > 0, got {noise_multiplier!r}")
        self.target = target
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self._epsilon_of = epsilon_of
        self.history: list[tuple[float, int]] = [(float(s), int(n)) for s, n in history if n > 0]
        self.last_round = last_round  # the last round released (None: none yet)
        self.spent = epsilon_of(self.history, delta)
        self._next = epsilon_of(self._with_one_more(), delta)

    def _with_one_more(self) -> list[tuple[float, int]]:
        history = list(self.history)
        if history and history[-1][0] == self.noise_multiplier:
            history[-1] = (self.noise_multiplier, history[-1][1] + 1)
        else:
            history.append((self.noise_multiplier, 1))
        return history

    @property
    def rounds(self) -> int:
        """Rounds released (charged) in all, whatever their noise."""
        return sum(n for _, n in self.history)

    @property
    def exhausted(self) -> bool:
        """True when one more release would spend more than the target."""
        return self.target is not None and self._next > self.target

    @property
    def remaining(self) -> float | None:
        """Epsilon left of the target (None without one)."""
        return None if self.target is None else max(0.0, self.target - self.spent)

    @property
    def next_epsilon(self) -> float:
        """What the spent epsilon would be after one more release."""
        return self._next

    def charge(self, round: int) -> float:
        """Account for one more release (of `round`) and return the epsilon spent now.

        Raises BudgetExhausted, changing nothing, if the target cannot pay for it.
        """
        if self.exhausted:
            raise BudgetExhausted(
                f"round {round} would spend epsilon {self._next:.4g} of a budget of "
                f"{self.target:.4g}"
            )
        self.history = self._with_one_more()
        self.last_round = round
        self.spent = self._next
        self._next = self._epsilon_of(self._with_one_more(), self.delta)
        return self.spent

    def state(self) -> dict[str, Any]:
        """What a restart needs to go on spending from here (JSON-able)."""
        return {
            "version": STATE_VERSION,
            "history": [[s, n] for s, n in self.history],
            "last_round": self.last_round,
        }

    @staticmethod
    def parse_state(doc: Mapping[str, Any]) -> tuple[list[tuple[float, int]], int | None]:
        """(history, last_round) from `state()`'s output; ValueError if it is not one."""
        if not isinstance(doc, Mapping) or doc.get("version") != STATE_VERSION:
            raise ValueError("not a privacy state of a known version")
        history: list[tuple[float, int]] = []
        for item in doc.get("history", ()):
            if not (
                isinstance(item, list | tuple)
                and len(item) == 2
                and isinstance(item[0], int | float)
                and not isinstance(item[1], bool)
                and isinstance(item[1], int)
                and item[0] >= 0
                and item[1] >= 0
            ):
                raise ValueError(f"bad history entry {item!r}")
            history.append((float(item[0]), int(item[1])))
        last = doc.get("last_round")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int)):
            raise ValueError(f"bad last_round {last!r}")
        return history, last

    def status(self) -> dict[str, Any]:
        """For status, metrics rows and reports."""
        return {
            "epsilon": _finite(self.spent),
            "budget": self.target,
            "remaining": None if self.remaining is None else _finite(self.remaining),
            "delta": self.delta,
            "noise_multiplier": round(self.noise_multiplier, 6),
            "rounds": self.rounds,
            "exhausted": self.exhausted,
        }


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None
