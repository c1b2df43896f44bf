"""What one node does in secure aggregation, round after round (sans-IO).

`GroupDriver` runs the group protocol; this class adds what a node needs around it
(docs/secure-aggregation.md):

- **Neighbour keys.** Each neighbour sends its Ed25519 identity key once per link
  (`IdentityKey`). It is kept only if its hash is the peer id the link authenticated,
  so a mate's round key is checked against a key that came over our own channel.
- **One outcome per round.** Either our group's mean (to forward to the neighbours
  outside the group and to count as the mates' input) or "out" with a reason: the
  schedule left us without a group, a leader failed the group, or no mean came within
  `mean_timeout` of our update. The node then applies its `no_group` policy.
- **The no-group policy**: `wait` (do not start rounds with fewer keyed neighbours than
  a group needs; a round that still ends without a group withholds our update), `skip`
  (run rounds, withhold the update when there is no group), `plain` (send the update
  in the clear: an explicit downgrade). Never a silent fallback: each round out is
  counted by reason, and the first of a streak is logged.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from p2pfl.identity import Identity, peer_id_from_public_key
from p2pfl.logs import event
from p2pfl.secure.group_driver import GroupDriver
from p2pfl.secure.group_leader import LeaderSettings
from p2pfl.secure.group_member import MemberPolicy
from p2pfl.secure.group_messages import GroupMean, GroupMessage, GroupSend, IdentityKey

log = logging.getLogger("p2pfl.secure")

NoGroupPolicy = Literal["wait", "skip", "plain"]
NO_GROUP_POLICIES: tuple[str, ...] = ("wait", "skip", "plain")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How round `round` ended for us as a member: `mean` set, or out for `reason`."""

    round: int
    mean: GroupMean | None
    reason: str = ""


class SecureParticipant:
    def __init__(
        self,
        identity: Identity,
        settings: LeaderSettings,
        policy: MemberPolicy,
        *,
        no_group: NoGroupPolicy = "wait",
        mean_timeout: float = 15.0,
    ) -> None:
        if no_group not in NO_GROUP_POLICIES:
            raise ValueError(f"no_group must be one of {', '.join(NO_GROUP_POLICIES)}")
        self.identity = identity
        self.me = identity.peer_id
        self.no_group: NoGroupPolicy = no_group
        self.mean_timeout = mean_timeout
        self.driver = GroupDriver(identity, settings, policy, policy.dim)
        self.min_group = policy.min_group
        self.keys: dict[str, bytes] = {}  # peer -> identity key, checked against its id
        self._give_up: tuple[int, float] | None = None  # (round, when) for our mean
        self._outcomes: dict[int, Outcome] = {}
        self.rounds_grouped = 0
        self.rounds_out: Counter[str] = Counter()
        self.means_forwarded = 0
        self._out_streak = 0

    # ---- neighbours ------------------------------------------------------------------

    def greeting(self, round: int) -> IdentityKey:
        return IdentityKey(self.me, round, self.identity.public_bytes)

    def on_identity(self, peer: str, msg: IdentityKey) -> bool:
        """A neighbour's identity key, as received on its own link. False if refused."""
        if msg.sender != peer or peer_id_from_public_key(msg.public) != peer:
            self.driver.refused["identity_mismatch"] += 1
            return False
        self.keys[peer] = msg.public
        return True

    def forget(self, peer: str, now: float) -> list[GroupSend]:
        """The peer's link closed: drop its key; groups we lead stop waiting for it."""
        self.keys.pop(peer, None)
        return self.driver.member_gone(peer, now)

    def on_abstain(self, peer: str, round: int, now: float) -> list[GroupSend]:
        """The peer sends no model for `round`: if it is in a group we lead, it left."""
        return self.driver.member_gone(peer, now, round)

    def keyed(self, peers: list[str]) -> list[str]:
        return [p for p in peers if p in self.keys]

    def peers_needed(self) -> int:
        """Keyed neighbours to wait for before rounds start (policy `wait`)."""
        return self.min_group - 1 if self.no_group == "wait" else 0

    # ---- rounds ----------------------------------------------------------------------

    def start_round(self, round: int, neighbours: list[str], now: float) -> list[GroupSend]:
        """Our round begins (training starts): declare our leader among `neighbours`."""
        for old in [r for r in self._outcomes if r < round - 1]:
            del self._outcomes[old]
        keys = {p: self.keys[p] for p in neighbours if p in self.keys}
        return self.driver.start_round(round, keys, now)

    def contribute(self, round: int, update: np.ndarray, now: float) -> list[GroupSend]:
        """Our trained update for `round`: it goes into our group only."""
        self._give_up = (round, now + self.mean_timeout)
        return self.driver.contribute(round, update, now)

    def on_message(self, sender: str, msg: GroupMessage, now: float) -> list[GroupSend]:
        return self.driver.on_message(sender, msg, now)

    def on_timeout(self, now: float) -> list[GroupSend]:
        sends = self.driver.on_timeout(now)
        if self._give_up is not None and now >= self._give_up[1]:
            round = self._give_up[0]
            self._give_up = None
            if self.outcome(round) is None:
                self._settle(Outcome(round, None, "no_mean_in_time"))
        return sends

    def next_deadline(self) -> float | None:
        deadlines = [self.driver.next_deadline()]
        if self._give_up is not None:
            deadlines.append(self._give_up[1])
        return min((d for d in deadlines if d is not None), default=None)

    def outcome(self, round: int) -> Outcome | None:
        """Round `round`'s outcome for us as a member, once known (then fixed)."""
        done = self._outcomes.get(round)
        if done is not None:
            return done
        member = self.driver.members.get(round)
        if member is None:
            return None
        if member.mean is not None:
            return self._settle(Outcome(round, member.mean))
        if member.phase == "out":
            return self._settle(Outcome(round, None, member.out_reason or "out"))
        return None

    def _settle(self, outcome: Outcome) -> Outcome:
        self._outcomes[outcome.round] = outcome
        if self._give_up is not None and self._give_up[0] == outcome.round:
            self._give_up = None
        if outcome.mean is not None:
            self.rounds_grouped += 1
            if self._out_streak:
                log.info(
                    "secure aggregation: in a group again at round %d after %d rounds without",
                    outcome.round,
                    self._out_streak,
                    extra=event(
                        "secure.regrouped", round=outcome.round, rounds_without=self._out_streak
                    ),
                )
            self._out_streak = 0
        else:
            self.rounds_out[outcome.reason] += 1
            if self._out_streak == 0:
                log.warning(
                    "secure aggregation: no group for round %d (%s); policy %r: %s",
                    outcome.round,
                    outcome.reason,
                    self.no_group,
                    "sending the update in the clear"
                    if self.no_group == "plain"
                    else "withholding the update this round",
                    extra=event(
                        "secure.no_group",
                        round=outcome.round,
                        reason=outcome.reason,
                        policy=self.no_group,
                    ),
                )
            self._out_streak += 1
        return outcome

    # ---- status ----------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        led = [g for lr in self.driver.leaders.values() for g in lr.groups if g.phase != "done"]
        return {
            "version": 2,
            "no_group": self.no_group,
            "keyed_peers": len(self.keys),
            "rounds_grouped": self.rounds_grouped,
            "rounds_out": sum(self.rounds_out.values()),
            "out_reasons": dict(self.rounds_out),
            "out_streak": self._out_streak,
            "means_forwarded": self.means_forwarded,
            "groups_led": {"live": len(led), **self.driver.led},
            "refused": dict(self.driver.refused),
        }


def public_model(received: Sequence[np.ndarray]) -> np.ndarray | None:
    """The mean of the distinct group means a round brought us: what a node in secure
    mode may hand a peer that asks for its state. Its own model is shaped by its own
    update; this is built only from means its neighbours saw anyway."""
    distinct: dict[bytes, np.ndarray] = {}
    for params in received:
        key = hashlib.sha256(np.ascontiguousarray(params).data.cast("B")).digest()
        distinct.setdefault(key, params)
    if not distinct:
        return None
    return np.asarray(np.mean(np.stack(list(distinct.values())), axis=0, dtype=np.float32))
