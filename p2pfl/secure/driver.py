"""One node's whole secure-aggregation state (sans-IO): keys, member and aggregator.

In a decentralized federation every node aggregates its own neighbours *and* is a
member of each neighbour's groups. This class routes each message to the right side,
runs one `AggregatorRound` per own round, and hands the node the group means once
that round is done. The node only sends what it returns and feeds it time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from p2pfl.identity import Identity
from p2pfl.secure.keys import KeyRejected, KeyStore, SessionKey
from p2pfl.secure.messages import (
    GroupAnnounce,
    GroupRetry,
    MaskedUpdate,
    MaskReveal,
    SecureKey,
    SecureMessage,
    UnmaskRequest,
)
from p2pfl.secure.protocol import (
    AggregatorRound,
    Refused,
    SecureMember,
    SecureResult,
    SecureSettings,
    SecureStats,
    Send,
)

log = logging.getLogger("p2pfl.secure")


class SecureDriver:
    def __init__(
        self, identity: Identity, settings: SecureSettings, dim: int, *, round: int = 0
    ) -> None:
        self.settings = settings
        self.dim = dim
        self.peer_id = identity.peer_id
        self.key = SessionKey(identity, settings.federation, epoch=int(time.time() * 1000))
        self.store = KeyStore(settings.federation)
        self.member = SecureMember(settings.federation, self.key, round=round)
        self.stats = SecureStats()
        self.rejected: dict[str, int] = {}
        self._aggregator: AggregatorRound | None = None
        self._result: SecureResult | None = None

    def key_message(self, round: int) -> SecureKey:
        return SecureKey(self.peer_id, round, self.key.announcement.to_bytes())

    def announce(self, round: int, neighbours: Sequence[str], now: float) -> list[Send]:
        """Our round `round` begins: announce groups of our keyed neighbours.

        Called when our training starts, not when it ends: the neighbours are then
        usually still training too, and compute their masks meanwhile (the masks do
        not depend on the update), so answering costs them one encode and one add.
        """
        self.member.advance(round)
        if self._result is not None and self._result.round < round:
            self._result = None  # an earlier round's means nobody took (we caught up)
        keys = {}
        for peer in neighbours:
            ann = self.store.get(peer)
            if ann is not None:
                keys[peer] = ann
        self._aggregator = AggregatorRound(
            self.settings, aggregator=self.peer_id, round=round, dim=self.dim, keys=keys
        )
        sends = self._aggregator.start(now)
        self._check_done()
        return sends

    def contribute(self, round: int, update: np.ndarray) -> list[Send]:
        """Our update for `round` is trained: answer the neighbours' groups we are in
        (those announced already; later announcements are answered on arrival)."""
        return self.member.set_update(round, update)

    def on_message(self, sender: str, msg: SecureMessage, now: float) -> list[Send]:
        """Route one verified-shape message. Refusals are counted and logged, never raised."""
        try:
            if isinstance(msg, SecureKey):
                self.store.add(sender, msg.key)
                return []
            if isinstance(msg, GroupAnnounce | GroupRetry | UnmaskRequest):
                return self.member.on_message(sender, msg)
            if isinstance(msg, MaskedUpdate | MaskReveal):
                agg = self._aggregator
                if agg is None or msg.round != agg.round:
                    self._reject("not_current_round", sender)
                    return []
                sends = agg.on_message(sender, msg, now)
                self._check_done()
                return sends
        except (Refused, KeyRejected) as exc:
            self._reject(getattr(exc, "reason", type(exc).__name__), sender)
        return []

    def on_timeout(self, now: float) -> list[Send]:
        agg = self._aggregator
        if agg is None or agg.done:
            return []
        deadline = agg.next_deadline()
        if deadline is None or now < deadline:
            return []
        sends = agg.on_timeout(now)
        self._check_done()
        return sends

    def next_deadline(self) -> float | None:
        agg = self._aggregator
        return None if agg is None or agg.done else agg.next_deadline()

    def peer_gone(self, peer: str, now: float) -> list[Send]:
        self.store.forget(peer)
        agg = self._aggregator
        if agg is None or agg.done:
            return []
        sends = agg.peer_gone(peer, now)
        self._check_done()
        return sends

    def take_result(self, round: int) -> SecureResult | None:
        """Round `round`'s group means, once, if that round's protocol is done."""
        result = self._result
        if result is None or result.round != round:
            return None
        self._result = None
        return result

    def status(self) -> dict[str, object]:
        """Counters for `p2pfl status`: groups, retries and bytes as an aggregator, and
        how often our masks as a member were computed ahead of the update."""
        return {
            **self.stats.as_dict(),
            "masked_ahead": self.member.masked_ahead,
            "masked_on_demand": self.member.masked_on_demand,
            "rejected": dict(self.rejected),
        }

    def _check_done(self) -> None:
        agg = self._aggregator
        if agg is not None and agg.done and self._result is None:
            self._result = agg.result()
            self.stats.merge(self._result.stats)
            self._aggregator = None

    def _reject(self, reason: str, sender: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        log.warning("secure aggregation: refused a message from %s: %s", sender[:12], reason)
