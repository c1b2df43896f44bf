"""A member's side of one secure-aggregation v2 round (sans-IO; docs/secure-aggregation.md).

The member, not the leader, decides: its leader comes from the schedule over its own
verified neighbours; it refuses a group below its own minimum or holding a mate it
cannot admit itself (a neighbour it authenticated, or, where its policy allows relayed
mates, a member whose identity key and membership proof check out); it answers one
group per round; and it keeps the one rule that makes a false "dropped" claim useless:
**once it acked a mate's commit it never reveals that mate's round-key share**, and it
submits its own vector only after every mate acked its commit. Everything a member
sends a mate goes through the leader sealed under the pair's box key (AES-GCM), so the
leader relays shares, commits and acks it can neither read nor forge. Each refusal
raises `Refused` with a stable reason.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from p2pfl.identity import Identity
from p2pfl.secure.admission import Admission
from p2pfl.secure.errors import Refused
from p2pfl.secure.group_messages import (
    GroupAbort,
    GroupJoin,
    GroupMean,
    GroupMessage,
    GroupOffer,
    GroupSend,
    MaskedVector,
    MaskList,
    Relayed,
    Sealed,
    SetupDone,
    Unmasking,
    UnmaskList,
)
from p2pfl.secure.keys import KeyRejected
from p2pfl.secure.masking import EncodeBuffers, encode_buffers, fixed_point, member_mask
from p2pfl.secure.round_keys import RoundKey, RoundScope, open_sealed, seal, verify_round_key
from p2pfl.secure.schedule import MIN_GROUP, choose_leader, group_of, partition
from p2pfl.secure.shamir import SHARE_LEN, ShamirError, Share, split


@dataclass(frozen=True, slots=True)
class MemberPolicy:
    """What a member insists on, whatever a leader announces."""

    federation: str
    min_group: int = MIN_GROUP
    dim: int = 0  # the model's parameter count; offers for another size are refused
    # Mates that are not our neighbours, admitted by identity key and membership proof
    # (relayed through the leader). False: only neighbours we authenticated ourselves.
    relayed_mates: bool = False
    admission: Admission | None = None  # None: the open federation of `federation`

    def __post_init__(self) -> None:
        if self.min_group < MIN_GROUP:
            raise ValueError(f"min_group must be >= {MIN_GROUP}")
        if self.admission is None:
            object.__setattr__(self, "admission", Admission(self.federation))


# Messages bound to one group of one round (session and group index).
_Scoped = MaskList | Relayed | UnmaskList | GroupMean | GroupAbort

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
        self._pair: dict[str, tuple[bytes, bytes]] = {}  # mate -> (mask seed, box key)
        self._held: dict[str, tuple[Share, Share]] = {}  # mate -> (key share, seed share)
        self._dim = 0
        self._mask: np.ndarray | None = None  # our whole mask, computed once U1 is known
        self._work: EncodeBuffers | None = None  # scratch to add the update into it
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
        """Our trained parameters (float32, dim); commit once the mask list is known.
        Checked now: once we commit, our mates seal our key share, so an update we then
        could not encode would fail the whole group."""
        if self._update is not None:
            raise Refused("update_set_twice")
        x = np.asarray(update, dtype=np.float32)
        if x.ndim != 1 or (self.policy.dim and x.size != self.policy.dim):
            raise self._leave("bad_update", f"shape {x.shape}")
        if not np.isfinite(x).all():
            raise self._leave("bad_update", "not finite")
        self._update = x
        return self._maybe_commit()

    # ---- incoming --------------------------------------------------------------------

    def on_message(self, sender: str, msg: GroupMessage) -> list[GroupSend]:
        if msg.round != self.round:
            raise Refused("wrong_round", f"{msg.round} != {self.round}")
        if isinstance(msg, GroupOffer):
            return self._on_offer(sender, msg)
        if isinstance(msg, MaskList):
            return self._on_masklist(sender, msg)
        if isinstance(msg, Relayed):
            return self._on_relayed(sender, msg)
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
        if not self.policy.relayed_mates:
            strangers = [p for p in group if p != self.me and p not in self.neighbours]
            if strangers:
                raise self._leave("unauthenticated_mate", ", ".join(p[:12] for p in strangers))
        self.group = group
        self.mates = tuple(p for p in group if p != self.me)
        self.clip = msg.clip
        self._dim = msg.dim
        self.scope = RoundScope(self.policy.federation, self.round, self.leader, msg.session, index)
        self._key = RoundKey(self.identity, self.scope)
        self._seed = secrets.token_bytes(32)
        assert self.policy.admission is not None
        setup = SetupDone(
            self.me,
            self.round,
            msg.session,
            index,
            self._key.public,
            self._key.signature,
            self.identity.public_bytes,
            self.policy.admission.prove(self.identity),
        )
        self.phase = "setup"
        return [GroupSend((self.leader,), setup)]

    def _leave(self, reason: str, detail: str = "") -> Refused:
        """We are in no group this round: say why (the node applies its policy)."""
        self.phase = "out"
        self.out_reason = reason
        return Refused(reason, detail)

    def _check_from_leader(self, sender: str, msg: _Scoped) -> None:
        if sender != self.leader:
            raise Refused("not_my_leader", sender)
        self._check_scope(msg)

    def _check_scope(self, msg: _Scoped) -> None:
        scope = self.scope
        if scope is None or msg.session != scope.session or msg.group != scope.group:
            raise Refused("wrong_group")

    def _on_masklist(self, sender: str, msg: MaskList) -> list[GroupSend]:
        self._check_from_leader(sender, msg)
        if self._u1 is not None or self.phase != "setup":
            raise Refused("second_mask_list")
        u1 = msg.members
        if self.me not in u1 or not set(u1) <= set(self.group):
            raise Refused("bad_mask_list", "not a subset of the group holding us")
        if len(u1) < self.policy.min_group:
            raise Refused("group_too_small", f"{len(u1)} < {self.policy.min_group}")
        assert self._key is not None and self.scope is not None
        keys: dict[str, bytes] = {}
        for peer, (public, signature, identity, proof) in zip(u1, msg.setups, strict=True):
            if peer == self.me:
                if public != self._key.public:
                    raise Refused("bad_mask_list", "our own round key was replaced")
                continue
            known = self.neighbours.get(peer)
            try:
                if known is None or known != identity:
                    # Not a neighbour (or a key that is not the one its link gave us):
                    # admitted only by proof, and only if our policy relays at all.
                    if not self.policy.relayed_mates:
                        raise KeyRejected("unauthenticated", peer[:12])
                    assert self.policy.admission is not None
                    self.policy.admission.check(peer, identity, proof)
                verify_round_key(self.scope, peer, identity, public, signature)
            except KeyRejected as exc:
                # A mate we cannot admit: we mask in no group rather than toward it.
                raise self._leave("mate_not_admitted", str(exc)) from None
            keys[peer] = public
        self._mate_keys = keys
        self._pair = {p: self._key.pair_secrets(p, k) for p, k in keys.items()}
        self._u1 = u1
        # The mask does not depend on the update: computed now (usually while we still
        # train), submitting costs one encode and one add (docs: "critical path").
        seeds = {p: self._pair[p][0] for p in keys}
        self._mask = member_mask(self._dim, self.me, seeds, self._seed)
        self._work = encode_buffers()
        return self._deal_shares(u1) + self._maybe_commit()

    def _sealed(self, to: str, kind: str, plaintext: bytes) -> GroupSend:
        """A message for mate `to`, relayed by the leader, which cannot open it."""
        s = self.scope
        assert s is not None
        box = seal(self._pair[to][1], s.box_aad(self.me, to, kind), plaintext)
        return GroupSend(
            (self.leader,), Sealed(self.me, self.round, s.session, s.group, to, kind, box)
        )

    def _deal_shares(self, u1: tuple[str, ...]) -> list[GroupSend]:
        """Shares of our key and self seed, to the members of *our* mask list only: a
        mate the leader left out of it holds nothing it could later be asked to reveal.
        Any `min_group - 1` of them rebuild a secret, fewer say nothing."""
        assert self._key is not None
        mates = [p for p in u1 if p != self.me]
        threshold = self.policy.min_group - 1
        keys = split(self._key.secret_bytes(), threshold, len(mates))
        seeds = split(self._seed, threshold, len(mates))
        return [
            self._sealed(mate, "shares", k.to_bytes() + e.to_bytes())
            for mate, k, e in zip(mates, keys, seeds, strict=True)
        ]

    def _on_relayed(self, sender: str, msg: Relayed) -> list[GroupSend]:
        """A mate's sealed message, through our leader: open it, then act on its kind."""
        self._check_from_leader(sender, msg)
        mate = msg.peer
        if self._u1 is None or mate == self.me or mate not in self._u1:
            raise Refused("not_a_mate", mate[:12])
        assert self.scope is not None
        try:
            plain = open_sealed(
                self._pair[mate][1], self.scope.box_aad(mate, self.me, msg.kind), msg.box
            )
        except KeyRejected as exc:
            raise Refused("bad_box", str(exc)) from None
        if msg.kind == "shares":
            return self._on_shares(mate, plain)
        if plain:
            raise Refused("bad_box", f"{msg.kind} carries no payload")
        if msg.kind == "commit":
            return self._on_commit(mate)
        return self._on_ack(mate)

    def _on_shares(self, mate: str, plain: bytes) -> list[GroupSend]:
        if mate in self._held or len(plain) != 2 * SHARE_LEN:
            raise Refused("unexpected_shares", mate[:12])
        try:
            key, seed = Share.from_bytes(plain[:SHARE_LEN]), Share.from_bytes(plain[SHARE_LEN:])
        except ShamirError as exc:
            raise Refused("bad_shares", str(exc)) from None
        self._held[mate] = (key, seed)
        return []

    def _maybe_commit(self) -> list[GroupSend]:
        u1 = self._u1
        if self.phase != "setup" or u1 is None or self._update is None:
            return []
        self.phase = "committing"
        return [self._sealed(p, "commit", b"") for p in u1 if p != self.me]

    def _on_commit(self, mate: str) -> list[GroupSend]:
        if mate in self.key_revealed:
            raise Refused("key_share_revealed", mate[:12])  # too late: declared dropped
        self.acked.add(mate)
        return [self._sealed(mate, "ack", b"")]

    def _on_ack(self, mate: str) -> list[GroupSend]:
        u1 = self._u1
        if self.phase != "committing" or u1 is None:
            raise Refused("unexpected_ack", mate[:12])
        self._acks.add(mate)
        if not all(p in self._acks for p in u1 if p != self.me):
            return []
        # Every mate promised never to reveal our key share: now our vector may exist.
        assert self.scope is not None and self._update is not None and self._mask is not None
        codec = fixed_point(self.clip, len(u1))
        masked = codec.encode_add(self._update, self._mask, self._work)
        self._mask = self._work = None
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
