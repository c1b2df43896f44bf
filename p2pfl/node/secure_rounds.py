"""The node's secure-aggregation part: the thin layer between `SecureParticipant`
(sans-IO, `p2pfl.secure`) and the node's mesh, outbox and round machine.

What it adds to the protocol (docs/secure-aggregation.md, step 9): once our group's
outcome for a round is known, its mean goes to the neighbours outside the group and
counts here as each mate's input (the mates send us nothing: they hold the same mean);
without a group, the node's `no_group` policy applies (the update in the clear, or an
`sa2_none` notice so nobody waits for it). A peer that asks for our state gets the mean
of the group means we received, never a model our own update shaped alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from p2pfl.protocol import Broadcast, Phase
from p2pfl.secure.admission import Admission
from p2pfl.secure.group_leader import LeaderSettings
from p2pfl.secure.group_member import MemberPolicy
from p2pfl.secure.group_messages import Abstain, GroupSend, IdentityKey
from p2pfl.secure.participant import Outcome, SecureParticipant, public_model
from p2pfl.secure.wire import group_from_envelope, to_envelope
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import SecureEnvelope

if TYPE_CHECKING:
    from p2pfl.node.daemon import Node


def participant_for(node: Node, admission: Admission) -> SecureParticipant:
    """Secure aggregation's timeouts as fractions of the round timeout: the leader
    collects vectors while members may still train, so that step gets the most."""
    c, rt = node.config, node.config.round_timeout
    return SecureParticipant(
        node.identity,
        LeaderSettings(
            c.federation,
            group_size=c.group_size,
            min_group=c.secure_min_group,
            join_timeout=0.1 * rt,
            setup_timeout=0.1 * rt,
            collect_timeout=0.4 * rt,
            reveal_timeout=0.1 * rt,
        ),
        MemberPolicy(
            c.federation,
            min_group=c.secure_min_group,
            dim=node.model.num_params,
            # "auto": mates beyond our neighbours only where a proof means something.
            relayed_mates=c.secure_mates == "members"
            or (c.secure_mates == "auto" and admission.closed),
            admission=admission,
        ),
        no_group=c.secure_no_group,  # type: ignore[arg-type]  # checked by the config
        # Past the leader's collect and reveal deadlines, so a group that completes
        # with dropouts is not given up by its members just before.
        mean_timeout=0.6 * rt,
    )


class SecureRounds:
    def __init__(self, node: Node, admission: Admission) -> None:
        self.node = node
        self.participant = participant_for(node, admission)
        # Our updates by round while their groups' outcomes are pending.
        self.contributions: dict[int, Broadcast] = {}
        # What a peer asking for our state may get: never our own model.
        self.public_params: np.ndarray | None = None

    # ---- what the node asks -------------------------------------------------------------

    def ready(self, connected: list[str]) -> int:
        """Connected peers we can run a round with: those whose identity key we have."""
        return len(self.participant.keyed(connected))

    def peers_needed(self) -> int:
        return self.participant.peers_needed()

    def greeting(self, round: int) -> bytes:
        """What follows our Hello on a new link: our identity key (mates check our round
        keys against it)."""
        return codec.encode(to_envelope(self.participant.greeting(round)))

    def next_deadline(self) -> float | None:
        return self.participant.next_deadline()

    def status(self) -> dict[str, object]:
        return self.participant.status()

    # ---- events -------------------------------------------------------------------------

    def start_round(self, round: int, now: float) -> None:
        """Our training starts: declare our leader among our keyed neighbours."""
        keyed = self.participant.keyed(self.node.peers.connected_ids())
        self._send(self.participant.start_round(round, keyed, now))

    def contribute(self, action: Broadcast, params: np.ndarray, now: float) -> None:
        """Our trained update goes into our group only."""
        self.contributions[action.round] = Broadcast(
            action.round, params, action.samples, action.to
        )
        self._send(self.participant.contribute(action.round, params, now))
        self.progress(now)

    def on_envelope(self, peer: str, env: SecureEnvelope, now: float) -> None:
        node = self.node
        try:
            msg = group_from_envelope(env, max_dim=node.model.num_params)
        except WireError as exc:
            node.mesh.count_rejection(peer, exc.reason, exc.detail)
            return
        if isinstance(msg, IdentityKey):
            if self.participant.on_identity(peer, msg):
                node.mesh.notify_peers_changed()  # a peer became ready for secure rounds
            else:
                node.mesh.count_rejection(peer, "identity_mismatch", "key hash is not its id")
        elif isinstance(msg, Abstain):
            self._send(self.participant.on_abstain(peer, msg.round, now))
            node._apply(node.machine.receive_abstain(now, peer, msg.round))
        else:
            self._send(self.participant.on_message(peer, msg, now))
            self.progress(now)

    def on_lost(self, peer: str, now: float) -> None:
        self._send(self.participant.forget(peer, now))
        self.progress(now)

    def on_timeout(self, now: float) -> None:
        self._send(self.participant.on_timeout(now))
        self.progress(now)

    def aggregated(self, received: tuple[np.ndarray, ...]) -> None:
        self.public_params = public_model(received)

    # ---- outcomes -----------------------------------------------------------------------

    def progress(self, now: float) -> None:
        """Settle every contribution whose group's outcome is known. Neighbours may still
        collect a round we have left, so what we owe them goes out even then; our
        mates' copies count here only while we collect that round."""
        machine = self.node.machine
        for round in sorted(self.contributions):
            here = machine.round == round
            if here and machine.phase is not Phase.COLLECTING:
                continue  # aggregating, or catching up: our mates' copies can wait
            outcome = self.participant.outcome(round)
            if outcome is None:
                if round < machine.round - 2:
                    del self.contributions[round]  # long gone; nobody waits for it
                continue
            self._settle(self.contributions.pop(round), outcome, now, inject=here)
        self.node._wakeup.set()

    def _settle(self, c: Broadcast, outcome: Outcome, now: float, *, inject: bool) -> None:
        node = self.node
        if outcome.mean is not None:
            mean, members = outcome.mean.mean, outcome.mean.members
            samples = min(c.samples * len(members), codec.MAX_SAMPLES - 1)
            outside = tuple(p for p in c.to if p not in members)
            node._send_model(c.round, mean, samples, outside)
            self.participant.means_forwarded += len(outside)
            for mate in (p for p in c.to if p in members and inject):
                if node.machine.round != c.round:
                    break  # the round ended on an earlier mate's copy
                node._apply(node.machine.receive_update(now, mate, c.round, mean, samples))
        elif self.participant.no_group == "plain":
            # In the clear: with distributed DP it carries only this node's share of
            # the noise, so the rest is added first (privacy/node.py, top_up).
            privacy = node.learner.privacy
            params = c.params if privacy is None else privacy.top_up(c.params)
            node._send_model(c.round, params, c.samples, c.to)
        else:
            notice = Abstain(node.id, c.round, outcome.reason[:64])
            payload = codec.encode(to_envelope(notice))
            for peer in c.to:
                node.mesh.enqueue(peer, payload)

    def _send(self, sends: list[GroupSend]) -> None:
        for send in sends:
            payload = codec.encode(to_envelope(send.message))
            for peer in send.to:
                self.node.mesh.enqueue(peer, payload)
