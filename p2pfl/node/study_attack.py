"""What a malicious study node does on the wire besides crafting its model: which
neighbours still get its honest model (`honest_to`), and whose models its attack may
overhear (not its accomplices'). Both name peers by id or listen address, matched
against what the peer table knows (`p2pfl.learning.attacks.match_peers`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from p2pfl.config import NodeConfig
from p2pfl.learning.attacks import match_peers
from p2pfl.membership import PeerTable
from p2pfl.node.learner import Learner

log = logging.getLogger("p2pfl.node")


class StudyAttack:
    def __init__(self, config: NodeConfig, learner: Learner, peers: PeerTable) -> None:
        self.config = config
        self.learner = learner
        self.peers = peers
        self._logged: tuple[str, ...] = ()  # the honest_to peers, as last logged

    def honest_recipients(self, round: int, to: tuple[str, ...]) -> tuple[str, ...]:
        """The neighbours this attacker sends its honest model to this round."""
        if not self.config.attack_honest_to or not self.learner.attacking(round):
            return ()
        named = self._named(self.config.attack_honest_to, to)
        honest = tuple(p for p in to if p in named)
        if honest != self._logged:  # says when the matched set changes
            self._logged = honest
            shown = ", ".join(p[:12] for p in honest) or "none"
            log.info(
                "attack: honest model to %d of %d neighbours (%s)", len(honest), len(to), shown
            )
        return honest

    def overhear(self, senders: Sequence[str], received: Sequence[np.ndarray]) -> None:
        """Hand the attack what it overheard this round, accomplices left out."""
        colluders = self._named(self.config.attack_colluders, tuple(senders))
        heard = [(s, m) for s, m in zip(senders, received, strict=True) if s not in colluders]
        self.learner.overhear([m for _, m in heard], [s for s, _ in heard])

    def _named(self, names: tuple[str, ...], among: tuple[str, ...]) -> frozenset[str]:
        if not names:
            return frozenset()
        return match_peers(names, among, self.peers.addresses())
