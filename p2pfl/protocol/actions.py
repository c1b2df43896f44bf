"""What the round machine asks its node to do (sans-IO): the actions `RoundMachine`'s
events return, in the order the node must carry them out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfl.aggregation import AggregationRule


@dataclass(frozen=True, slots=True, eq=False)
class Train:
    """Train locally for `round`, starting from `params`; report with `trained()`."""

    round: int
    params: np.ndarray


@dataclass(frozen=True, slots=True, eq=False)
class Broadcast:
    """Send this node's model for `round` to the peers in `to`."""

    round: int
    params: np.ndarray
    samples: int
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Aggregate:
    """Run the rule on these inputs (ours among them, in canonical order) and report
    the result with `aggregated()`. Only with `defer_aggregation`: a real node runs it
    in a worker thread, since a large model's aggregation would stall its event loop."""

    round: int
    inputs: tuple[np.ndarray, ...]
    weights: np.ndarray
    own: np.ndarray

    def run(self, rule: AggregationRule) -> np.ndarray:
        return rule(np.stack(self.inputs), self.weights, self.own)


@dataclass(frozen=True, slots=True, eq=False)
class Aggregated:
    """Round `round` finished; `params` is the model the next round starts from."""

    round: int
    params: np.ndarray
    senders: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]
    timed_out: bool
    rule: str
    # The neighbours' models, aligned with `senders` (what an omniscient attacker overhears).
    received: tuple[np.ndarray, ...] = ()
    # Who each row the rule aggregated came from, in the rule's order (ours included;
    # with distinct_inputs, a model sent by several counts under its first sender):
    # what the rule's per-input flags refer to.
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestUpdates:
    """Half the collection timeout has passed: ask these silent neighbours to resend
    their model for `round` (it may have been lost on the way)."""

    round: int
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RequestState:
    """Ask these peers for their current model (we are behind)."""

    to: tuple[str, ...]


@dataclass(frozen=True, slots=True, eq=False)
class CaughtUp:
    """We jumped from `from_round` to `round` by a robust combination of peers' states."""

    from_round: int
    round: int
    params: np.ndarray
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message was dropped; `reason` is a status counter key."""

    peer: str
    round: int
    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    round: int


Action = (
    Train
    | Broadcast
    | Aggregate
    | Aggregated
    | RequestState
    | RequestUpdates
    | CaughtUp
    | Rejected
    | Finished
)
