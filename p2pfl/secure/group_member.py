"""A member's side of one secure-aggregation v2 round (sans-IO; docs/secure-aggregation-v2.md).

The member, not the leader, decides: its leader comes from the schedule over its own
verified neighbours; it refuses a group below its own minimum or holding a mate it has
not authenticated itself; it answers one group per round; and it keeps the one rule
that makes a false "dropped" claim useless: **once it acked a mate's commit it never
reveals that mate's round-key share**, and it submits its own vector only after every
mate acked its commit. Each refusal raises `Refused` with a stable reason.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from p2pfl.identity import Identity
from p2pfl.secure.group_messages import (
    Commit,
    CommitAck,
    GroupAbort,
    GroupJoin,
    GroupMean,
    GroupMessage,
    GroupOffer,
    GroupSend,
    KeySetup,
    MaskedVector,
    MaskList,
    SetupDone,
    ShareDeal,
    Unmasking,
    UnmaskList,
)
from p2pfl.secure.keys import KeyRejected
from p2pfl.secure.masking import fixed_point, mask_encoded
from p2pfl.secure.protocol import Refused
from p2pfl.secure.round_keys import RoundKey, RoundScope, verify_round_key
from p2pfl.secure.schedule import MIN_GROUP, choose_leader, group_of, partition
from p2pfl.secure.shamir import ShamirError, Share, split


@dataclass(frozen=True, slots=True)
class MemberPolicy:
    """What a member insists on, whatever a leader announces."""

    federation: str
    min_group: int = MIN_GROUP
    dim: int = 0  # the model's parameter count; offers for another size are refused

    def __post_init__(self) -> None:
        if self.min_group < MIN_GROUP:
            raise ValueError(f"min_group must be >= {MIN_GROUP}")


# Messages bound to one group of one round (session and group index).
_Scoped = KeySetup | ShareDeal | MaskList | Commit | CommitAck | UnmaskList | GroupMean | GroupAbort

Phase = Literal["joining", "setup", "committing", "submitted", "revealed", "done", "out"]


class MemberRound:
    """One member's part in one round: join, set up, commit, mask, reveal, take the mean."""

    def __init__(
        self,
        identity: Identity,
        policy: MemberPolicy,
        round: int,
        neighbours: Mapping[str, bytes],
    ) -> None:
        """`neighbours`: peer id -> Ed25519 identity key, only of peers this node
        authenticated over its own channels and admits (its secure neighbours)."""
        self.identity = identity
        self.me = identity.peer_id
        self.policy = policy
        self.round = round
        self.neighbours = dict(neighbours)
        self.leader = choose_leader(policy.federation, round, self.me, self.neighbours)
        self.phase: Phase = "joining"
        self.group: tuple[str, ...] = ()
        self.mates: tuple[str, ...] = ()
        self.scope: RoundScope | None = None
        self.clip = 0.0
        self._key: RoundKey | None = None
        self._seed = b""
        self._mate_keys: dict[str, bytes] = {}  # mate -> round public key (verified)
        self._held: dict[str, tuple[Share, Share]] = {}  # mate -> (key share, seed share)
        self._early: dict[str, KeySetup] = {}  # setups that arrived before our offer
        self._u1: tuple[str, ...] | None = None
        self._update: np.ndarray | None = None
        self._acks: set[str] = set()
        self.acked: set[str] = set()  # mates whose commit we acked: their key share is sealed
        self.key_revealed: set[str] = set()  # mates whose key share we gave away
        self.mean: GroupMean | None = None
        self.out_reason = ""  # why we are in no group this round (phase "out")

    # ---- outgoing --------------------------------------------------------------------

    def join(self) -> list[GroupSend]:
        """Declare our choice to every neighbour (and ourselves): each leader then knows
        when all who might choose it have chosen, and needs no join timeout."""
        to = tuple(sorted({self.me, *self.neighbours}))
        return [GroupSend(to, GroupJoin(self.me, self.round, self.leader))]

    def set_update(self, update: np.ndarray) -> list[GroupSend]:
        """Our trained parameters (float32, dim); commit once the mask list is known."""
        if self._update is not None:
            raise Refused("update_set_twice")
        self._update = np.asarray(update, dtype=np.float32)
        return self._maybe_commit()

    # ---- incoming --------------------------------------------------------------------

    def on_message(self, sender: str, msg: GroupMessage) -> list[GroupSend]:
        if msg.round != self.round:
            raise Refused("wrong_round", f"{msg.round} != {self.round}")
        if isinstance(msg, GroupOffer):
            return self._on_offer(sender, msg)
        if isinstance(msg, KeySetup):
            return self._on_setup(sender, msg)
        if isinstance(msg, MaskList):
            return self._on_masklist(sender, msg)
        if isinstance(msg, ShareDeal):
            return self._on_shares(sender, msg)
        if isinstance(msg, Commit):
            return self._on_commit(sender, msg)
        if isinstance(msg, CommitAck):
            return self._on_ack(sender, msg)
        if isinstance(msg, UnmaskList):
            return self._on_unmask(sender, msg)
        if isinstance(msg, GroupMean):
            return self._on_mean(sender, msg)
        if isinstance(msg, GroupAbort):
            self._check_from_leader(sender, msg)
            if self.phase == "done":
                raise Refused("abort_after_mean")
            raise self._leave(f"group_failed: {msg.reason}")
        raise Refused("not_for_members", type(msg).__name__)

    def _on_offer(self, sender: str, msg: GroupOffer) -> list[GroupSend]:
        if sender != self.leader:
            raise Refused("not_my_leader", sender)
        if self.phase != "joining":
            raise Refused("second_offer")  # one group, hence one sum, per round
        if self.policy.dim and msg.dim != self.policy.dim:
            raise Refused("wrong_dim", f"{msg.dim} != {self.policy.dim}")
        # Everyone recomputes the leader's partition with the leader's parameters (so
        # mates agree on the groups); our own minimum is enforced on our group below.
        found = group_of(
            partition(
                self.policy.federation,
                self.round,
                self.leader,
                msg.choosers,
                msg.group_size,
                msg.min_group,
            ),
            self.me,
        )
        if found is None:
            raise self._leave("no_group", f"{len(msg.choosers)} chose {self.leader[:12]}")
        index, group = found
        if len(group) < self.policy.min_group:
            raise self._leave("group_too_small", f"{len(group)} < {self.policy.min_group}")
        strangers = [p for p in group if p != self.me and p not in self.neighbours]
        if strangers:
            raise self._leave("unauthenticated_mate", ", ".join(p[:12] for p in strangers))
        self.group = group
        self.mates = tuple(p for p in group if p != self.me)
        self.clip = msg.clip
        self.scope = RoundScope(self.policy.federation, self.round, self.leader, msg.session, index)
        self._key = RoundKey(self.identity, self.scope)
        self._seed = secrets.token_bytes(32)
        setup = KeySetup(
            self.me, self.round, msg.session, index, self._key.public, self._key.signature
        )
        sends = [GroupSend(self.mates, setup)]
        sends.append(
            GroupSend(
                (self.leader,),
                SetupDone(self.me, self.round, msg.session, index, self._key.public),
            )
        )
        self.phase = "setup"
        for mate, early in list(self._early.items()):
            del self._early[mate]
            sends += self._on_setup(mate, early)
        return sends

    def _leave(self, reason: str, detail: str = "") -> Refused:
        """We are in no group this round: say why (the node applies its policy)."""
        self.phase = "out"
        self.out_reason = reason
        return Refused(reason, detail)

    def _check_from_leader(
        self, sender: str, msg: MaskList | UnmaskList | GroupMean | GroupAbort
    ) -> None:
        if sender != self.leader:
            raise Refused("not_my_leader", sender)
        self._check_scope(msg)

    def _check_scope(self, msg: _Scoped) -> None:
        scope = self.scope
        if scope is None or msg.session != scope.session or msg.group != scope.group:
            raise Refused("wrong_group")

    def _on_setup(self, sender: str, msg: KeySetup) -> list[GroupSend]:
        if self.scope is None:
            if sender in self.neighbours and len(self._early) < 64:
                self._early[sender] = msg  # the mate heard the offer before we did
                return []
            raise Refused("no_group_yet")
        self._check_scope(msg)
        if sender not in self.mates:
            raise Refused("not_a_mate", sender)
        if sender in self._mate_keys:
            raise Refused("second_setup", sender)
        try:
            verify_round_key(self.scope, sender, self.neighbours[sender], msg.public, msg.signature)
        except KeyRejected as exc:
            raise Refused("bad_setup", str(exc)) from None
        self._mate_keys[sender] = msg.public
        return self._maybe_commit()

    def _on_masklist(self, sender: str, msg: MaskList) -> list[GroupSend]:
        self._check_from_leader(sender, msg)
        if self._u1 is not None:
            raise Refused("second_mask_list")
        u1 = msg.members
        if self.me not in u1 or not set(u1) <= set(self.group):
            raise Refused("bad_mask_list", "not a subset of the group holding us")
        if len(u1) < self.policy.min_group:
            raise Refused("group_too_small", f"{len(u1)} < {self.policy.min_group}")
        self._u1 = u1
        return self._deal_shares(u1) + self._maybe_commit()

    def _deal_shares(self, u1: tuple[str, ...]) -> list[GroupSend]:
        """Shares of our key and self seed, to the members of *our* mask list only: a
        mate the leader left out of it holds nothing it could later be asked to reveal.
        Any `min_group - 1` of them rebuild a secret, fewer say nothing."""
        assert self._key is not None and self.scope is not None
        mates = [p for p in u1 if p != self.me]
        threshold = self.policy.min_group - 1
        keys = split(self._key.secret_bytes(), threshold, len(mates))
        seeds = split(self._seed, threshold, len(mates))
        s = self.scope
        return [
            GroupSend(
                (mate,),
                ShareDeal(self.me, self.round, s.session, s.group, k.to_bytes(), e.to_bytes()),
            )
            for mate, k, e in zip(mates, keys, seeds, strict=True)
        ]

    def _on_shares(self, sender: str, msg: ShareDeal) -> list[GroupSend]:
        self._check_scope(msg)
        if sender not in self.mates or sender in self._held:
            raise Refused("unexpected_shares", sender)
        try:
            self._held[sender] = (Share.from_bytes(msg.key_share), Share.from_bytes(msg.seed_share))
        except ShamirError as exc:
            raise Refused("bad_shares", str(exc)) from None
        return []

    def _maybe_commit(self) -> list[GroupSend]:
        u1 = self._u1
        if self.phase != "setup" or u1 is None or self._update is None:
            return []
        if any(p not in self._mate_keys for p in u1 if p != self.me):
            return []  # a mate's setup is still on its way
        assert self.scope is not None
        self.phase = "committing"
        commit = Commit(self.me, self.round, self.scope.session, self.scope.group)
        return [GroupSend(tuple(p for p in u1 if p != self.me), commit)]

    def _on_commit(self, sender: str, msg: Commit) -> list[GroupSend]:
        self._check_scope(msg)
        members = self._u1 if self._u1 is not None else self.group
        if sender == self.me or sender not in members:
            raise Refused("not_a_mate", sender)
        if sender in self.key_revealed:
            raise Refused("key_share_revealed", sender)  # too late: it was declared dropped
        self.acked.add(sender)
        assert self.scope is not None
        return [
            GroupSend(
                (sender,), CommitAck(self.me, self.round, self.scope.session, self.scope.group)
            )
        ]

    def _on_ack(self, sender: str, msg: CommitAck) -> list[GroupSend]:
        self._check_scope(msg)
        u1 = self._u1
        if self.phase != "committing" or u1 is None or sender not in u1 or sender == self.me:
            raise Refused("unexpected_ack", sender)
        self._acks.add(sender)
        if not all(p in self._acks for p in u1 if p != self.me):
            return []
        # Every mate promised never to reveal our key share: now our vector may exist.
        assert self._key is not None and self.scope is not None and self._update is not None
        seeds = {p: self._key.pair_seed(p, self._mate_keys[p]) for p in u1 if p != self.me}
        encoded = fixed_point(self.clip, len(u1)).encode(self._update)
        masked = mask_encoded(encoded, self.me, seeds, self._seed, copy=False)
        self.phase = "submitted"
        vector = MaskedVector(self.me, self.round, self.scope.session, self.scope.group, masked)
        return [GroupSend((self.leader,), vector)]

    def _on_unmask(self, sender: str, msg: UnmaskList) -> list[GroupSend]:
        self._check_from_leader(sender, msg)
        if self.phase != "submitted":
            raise Refused("unmask_out_of_turn", self.phase)  # also: one answer per round
        u1, u2 = self._u1 or (), msg.members
        if self.me not in u2 or not set(u2) <= set(u1):
            raise Refused("bad_unmask_list")
        if len(u2) < self.policy.min_group:
            raise Refused("group_too_small", f"{len(u2)} < {self.policy.min_group}")
        dropped = [p for p in u1 if p not in u2]
        sealed = [p for p in dropped if p in self.acked]
        if sealed:
            # We acked their commit, so their vector may well have arrived: revealing
            # their key share would let the leader strip their pair masks.
            raise Refused("dropped_member_committed", ", ".join(p[:12] for p in sealed))
        self.key_revealed.update(dropped)
        self.phase = "revealed"
        assert self.scope is not None
        return [
            GroupSend(
                (self.leader,),
                Unmasking(
                    self.me,
                    self.round,
                    self.scope.session,
                    self.scope.group,
                    self._seed,
                    # Only shares we hold: a mate dealt to us only if we were on its list.
                    tuple(
                        (p, self._held[p][1].to_bytes())
                        for p in u2
                        if p != self.me and p in self._held
                    ),
                    tuple((p, self._held[p][0].to_bytes()) for p in dropped if p in self._held),
                ),
            )
        ]

    def _on_mean(self, sender: str, msg: GroupMean) -> list[GroupSend]:
        self._check_from_leader(sender, msg)
        if self.phase != "revealed":
            raise Refused("mean_out_of_turn", self.phase)
        if not set(msg.members) <= set(self._u1 or ()) or msg.mean.size != (
            self._update.size if self._update is not None else -1
        ):
            raise Refused("bad_mean")
        self.mean = msg
        self.phase = "done"
        return []
