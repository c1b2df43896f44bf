"""What a node's aggregation rule did over time: fallbacks, guards, per-peer suspicion.

Sans-IO: the node feeds it each finished round (which peer's model was which input row,
the rule's `AggregationReport`, the round machine's rejections) and shows `status()`;
each round's own part goes into that round's metrics row. Nothing here decides anything
about the federation: it makes visible what the rule decided.

Suspicion score of a neighbour: the exponentially weighted share of its observed
inputs that were flagged (clipped, trimmed, excluded by Krum, or rejected by the round
machine as malformed), an observation's weight halving every `half_life` later
observations of that peer. A round counts as an observation of a peer only when there
is evidence either way: its input was aggregated by a rule that flags inputs (not the
mean, median or geometric median, nor a fallback round), or it was rejected. An honest
peer caught in a bad round recovers as its later inputs pass; a peer that stops sending
keeps its score, since no new evidence exists. docs/robustness.md gives the reasons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pfl.aggregation.diagnostics import AggregationReport

REJECTED = "rejected"
# Round-machine rejections that say something about the sender's model itself; stale,
# duplicate and too-far-ahead messages also come from honest peers on a lossy network.
SUSPICIOUS_REJECTIONS = frozenset({"bad_shape", "bad_samples", "non_finite"})
HALF_LIFE = 10.0  # observations of a peer after which an observation weighs half
SUSPECT_SCORE = 0.5  # a peer flagged in more than half of its recent inputs ...
MIN_OBSERVED = 3  # ... observed at least this often is listed in `suspects`
MAX_PEERS = 1024  # peers remembered; the longest unobserved is forgotten first


@dataclass
class PeerSuspicion:
    """One neighbour's record. `score` is in [0, 1]."""

    flagged_weight: float = 0.0
    weight: float = 0.0
    observed: int = 0
    last_round: int = -1
    last: str | None = None  # the last observation's flag (None: it passed)
    flags: Counter[str] = field(default_factory=Counter)

    @property
    def score(self) -> float:
        return self.flagged_weight / self.weight if self.weight > 0 else 0.0

    def observe(self, round: int, flag: str | None, decay: float) -> None:
        self.flagged_weight = decay * self.flagged_weight + (flag is not None)
        self.weight = decay * self.weight + 1.0
        self.observed += 1
        self.last_round = round
        self.last = flag
        if flag is not None:
            self.flags[flag] += 1


class RobustnessLedger:
    """Cumulative guard/fallback counts by reason and per-peer suspicion for one node."""

    def __init__(
        self, own_id: str, *, half_life: float = HALF_LIFE, max_peers: int = MAX_PEERS
    ) -> None:
        if half_life <= 0 or max_peers < 1:
            raise ValueError("half_life must be > 0 and max_peers >= 1")
        self.own_id = own_id
        self.half_life = half_life
        self.decay = 0.5 ** (1.0 / half_life)
        self.max_peers = max_peers
        self.rounds = 0
        self.fallbacks: Counter[str] = Counter()
        self.guards: Counter[str] = Counter()
        self.reasons: dict[str, str] = {}  # key -> the latest detail
        # Reports whose rows did not match the round's inputs (a bug if ever nonzero):
        # their events are counted, their flags cannot be attributed to peers.
        self.unattributed = 0
        self.peers: dict[str, PeerSuspicion] = {}

    def record(
        self,
        round: int,
        inputs: Sequence[str],
        report: AggregationReport | None,
        rejected: Iterable[tuple[str, str]] = (),
        *,
        attribute: bool = True,
    ) -> dict[str, Any]:
        """One finished round: `inputs` names the rule's input rows in order (ours
        among them), `rejected` the round machine's (peer, reason) drops. Returns the
        round's part of the metrics row. With `attribute` False the rule's flags are
        not charged to the peers named (their rows were not theirs alone: with secure
        aggregation a row is a group's mean); events and rejections still count."""
        self.rounds += 1
        details: list[str] = []
        fallback: str | None = None
        guards: list[str] = []
        seen: dict[str, str | None] = {}
        if report is not None:
            for event in report.events:
                (self.fallbacks if event.kind == "fallback" else self.guards)[event.key] += 1
                self.reasons[event.key] = event.detail
                details.append(event.detail)
                if event.kind == "fallback":
                    fallback = fallback or event.key
                else:
                    guards.append(event.key)
            if attribute and report.flagged is not None and report.evidence is not None:
                if report.n == len(inputs):
                    for peer, hit in zip(inputs, report.flagged.tolist(), strict=True):
                        seen[peer] = report.evidence if hit else None
                else:
                    self.unattributed += 1
        for peer, reason in rejected:
            if reason in SUSPICIOUS_REJECTIONS:
                seen[peer] = REJECTED
        seen.pop(self.own_id, None)
        for peer, flag in seen.items():
            self._peer(peer).observe(round, flag, self.decay)
        return {
            "fallback": fallback,
            "guards": guards,
            "detail": "; ".join(details) or None,
            "flagged": {p: flag for p, flag in sorted(seen.items()) if flag is not None},
        }

    def _peer(self, peer: str) -> PeerSuspicion:
        rec = self.peers.get(peer)
        if rec is None:
            if len(self.peers) >= self.max_peers:
                oldest = min(self.peers, key=lambda p: self.peers[p].last_round)
                del self.peers[oldest]
            rec = self.peers[peer] = PeerSuspicion()
        return rec

    def suspects(self) -> list[str]:
        """Peers flagged in more than SUSPECT_SCORE of their recent inputs (observed at
        least MIN_OBSERVED times), most suspicious first."""
        ranked = sorted(self.peers.items(), key=lambda kv: (-kv[1].score, kv[0]))
        return [p for p, r in ranked if r.score > SUSPECT_SCORE and r.observed >= MIN_OBSERVED]

    def status(self) -> dict[str, Any]:
        ranked = sorted(self.peers.items(), key=lambda kv: (-kv[1].score, kv[0]))
        return {
            "aggregations": self.rounds,
            "fallbacks": dict(self.fallbacks),
            "guards": dict(self.guards),
            "reasons": dict(self.reasons),
            "unattributed": self.unattributed,
            "half_life": self.half_life,
            "suspicion": {
                peer: {
                    "score": round(rec.score, 3),
                    "observed": rec.observed,
                    "flagged": dict(rec.flags),
                    "last": rec.last,
                    "last_round": rec.last_round,
                }
                for peer, rec in ranked
            },
            "suspects": self.suspects(),
        }
