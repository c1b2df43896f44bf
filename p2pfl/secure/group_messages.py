"""Payloads of secure aggregation v2 (docs/secure-aggregation.md), checked on construction.

Flow for leader L, member v and v's mates in group G (round r):
    v -> L       GroupJoin    v chose L by the schedule
    L -> v       GroupOffer   the chooser list; v recomputes the partition
    v -> L       SetupDone    v's signed round key, identity key, membership proof
    L -> v       MaskList     U1 and every member's setup: who masks toward whom
    v -> L -> u  Sealed/Relayed, sealed with the pair's box key (the leader relays):
                   shares   Shamir shares (key secret, self seed), to U1 mates only
                   commit   v is about to submit its vector ...
                   ack      ... and the mate will never reveal v's key share
    v -> L       MaskedVector the masked fixed-point update
    L -> v       UnmaskList   U2: whose vectors arrived
    v -> L       Unmasking    own self seed, self-seed shares of U2, key shares of U1 \\ U2
    L -> v       GroupMean    the decoded mean of U2, which v forwards to its neighbours
    L -> v       GroupAbort   the group failed this round (v stops waiting for a mean)

Between neighbours, outside any group:
    v -> peer    IdentityKey  v's Ed25519 identity key, once per link (its hash is v's id)
    v -> peer    Abstain      v sends no model this round (no group; its policy)

`__post_init__` checks types, sizes and ranges (ValueError), so a message that exists
is structurally sound; the state machines check meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from p2pfl.secure.admission import PROOF_LEN
from p2pfl.secure.masking import MAX_CLIP, MIN_CLIP, SEED_LEN
from p2pfl.secure.messages import (
    MAX_DIM,
    MAX_PARTICIPANTS,
    MAX_ROUND,
    SESSION_LEN,
    _check_bytes,
    _check_id,
    _check_ids,
    _check_int,
)
from p2pfl.secure.round_keys import BOX_OVERHEAD, KEY_LEN, SIGNATURE_LEN
from p2pfl.secure.shamir import SHARE_LEN

MAX_GROUP = 64
MAX_REASON_LEN = 64
IDENTITY_KEY_LEN = 32


def _check_reason(value: object) -> None:
    if type(value) is not str or not 0 < len(value) <= MAX_REASON_LEN or not value.isascii():
        raise ValueError(f"reason: expected 1..{MAX_REASON_LEN} ASCII characters")


def _check_shares(name: str, shares: object) -> None:
    if type(shares) is not tuple or len(shares) > MAX_GROUP:
        raise ValueError(f"{name}: expected a tuple of at most {MAX_GROUP} (peer, share)")
    for i, item in enumerate(shares):
        if type(item) is not tuple or len(item) != 2:
            raise ValueError(f"{name}[{i}]: expected (peer, share)")
        _check_id(f"{name}[{i}].peer", item[0])
        _check_bytes(f"{name}[{i}].share", item[1], SHARE_LEN)
    peers = [p for p, _ in shares]
    if len(set(peers)) != len(peers):
        raise ValueError(f"{name}: one share per peer")


@dataclass(frozen=True, slots=True)
class _Header:
    sender: str
    round: int

    def __post_init__(self) -> None:
        _check_id("sender", self.sender)
        _check_int("round", self.round, 0, MAX_ROUND)


@dataclass(frozen=True, slots=True)
class GroupJoin(_Header):
    TYPE = "sa2_join"
    leader: str  # whom the member chose (so a misrouted join is refused, not counted)

    def __post_init__(self) -> None:
        _Header.__post_init__(self)
        _check_id("leader", self.leader)


@dataclass(frozen=True, slots=True)
class GroupOffer(_Header):
    TYPE = "sa2_offer"
    session: bytes
    choosers: tuple[str, ...]
    group_size: int
    min_group: int
    clip: float
    dim: int

    def __post_init__(self) -> None:
        _Header.__post_init__(self)
        _check_bytes("session", self.session, SESSION_LEN)
        _check_ids("choosers", self.choosers, 1, MAX_PARTICIPANTS)
        _check_int("min_group", self.min_group, 3, MAX_GROUP + 1)
        _check_int("group_size", self.group_size, self.min_group, MAX_GROUP + 1)
        if type(self.clip) is not float or not (
            math.isfinite(self.clip) and MIN_CLIP <= self.clip <= MAX_CLIP
        ):
            raise ValueError("clip: out of range")
        _check_int("dim", self.dim, 1, MAX_DIM + 1)


@dataclass(frozen=True, slots=True)
class _GroupHeader(_Header):
    session: bytes
    group: int

    def __post_init__(self) -> None:
        _Header.__post_init__(self)
        _check_bytes("session", self.session, SESSION_LEN)
        _check_int("group", self.group, 0, MAX_PARTICIPANTS)


@dataclass(frozen=True, slots=True)
class SetupDone(_GroupHeader):
    """The member's round key, signed with its identity key, and what lets a mate that
    is not its neighbour admit it: the identity key and its membership proof."""

    TYPE = "sa2_ready"
    public: bytes
    signature: bytes
    identity: bytes
    proof: bytes

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_setup(self.public, self.signature, self.identity, self.proof)


def _check_setup(public: object, signature: object, identity: object, proof: object) -> None:
    _check_bytes("public", public, KEY_LEN)
    _check_bytes("signature", signature, SIGNATURE_LEN)
    _check_bytes("identity", identity, IDENTITY_KEY_LEN)
    _check_bytes("proof", proof, PROOF_LEN)


@dataclass(frozen=True, slots=True)
class MaskList(_GroupHeader):
    """U1 and each member's setup (public, signature, identity, proof), aligned: every
    member checks every mate's setup itself; the leader only relays them."""

    TYPE = "sa2_masklist"
    members: tuple[str, ...]
    setups: tuple[tuple[bytes, bytes, bytes, bytes], ...]

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_ids("members", self.members, 3, MAX_GROUP)
        if type(self.setups) is not tuple or len(self.setups) != len(self.members):
            raise ValueError("setups: one per member")
        for item in self.setups:
            if type(item) is not tuple or len(item) != 4:
                raise ValueError("setups: (public, signature, identity, proof) each")
            _check_setup(*item)


SEALED_KINDS = ("shares", "commit", "ack")
MAX_BOX = 2 * SHARE_LEN + BOX_OVERHEAD


@dataclass(frozen=True, slots=True)
class _SealedBase(_GroupHeader):
    peer: str
    kind: str
    box: bytes

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_id("peer", self.peer)
        if self.kind not in SEALED_KINDS:
            raise ValueError(f"kind: one of {', '.join(SEALED_KINDS)}")
        if type(self.box) is not bytes or not BOX_OVERHEAD <= len(self.box) <= MAX_BOX:
            raise ValueError("box: bad length")


@dataclass(frozen=True, slots=True)
class Sealed(_SealedBase):
    """Member -> leader: a message for mate `peer`, AES-GCM under the pair's box key
    (shares of our key and seed, a commit, or an ack). The leader only relays it."""

    TYPE = "sa2_sealed"


@dataclass(frozen=True, slots=True)
class Relayed(_SealedBase):
    """Leader -> member: a sealed message from mate `peer`."""

    TYPE = "sa2_relayed"


@dataclass(frozen=True, slots=True)
class MaskedVector(_GroupHeader):
    TYPE = "sa2_masked"
    masked: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        m = self.masked
        if not isinstance(m, np.ndarray) or m.dtype != np.uint32 or m.ndim != 1:
            raise ValueError("masked: expected a 1-d uint32 array")
        if not 1 <= m.size <= MAX_DIM:
            raise ValueError("masked: bad length")


@dataclass(frozen=True, slots=True)
class UnmaskList(_GroupHeader):
    TYPE = "sa2_unmask"
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_ids("members", self.members, 3, MAX_GROUP)


@dataclass(frozen=True, slots=True)
class Unmasking(_GroupHeader):
    TYPE = "sa2_reveal"
    seed: bytes
    seed_shares: tuple[tuple[str, bytes], ...]  # self-seed shares of U2 mates
    key_shares: tuple[tuple[str, bytes], ...]  # round-key shares of U1 \ U2 mates

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_bytes("seed", self.seed, SEED_LEN)
        _check_shares("seed_shares", self.seed_shares)
        _check_shares("key_shares", self.key_shares)
        if {p for p, _ in self.seed_shares} & {p for p, _ in self.key_shares}:
            raise ValueError("never both shares for the same peer")


@dataclass(frozen=True, slots=True)
class GroupMean(_GroupHeader):
    TYPE = "sa2_mean"
    members: tuple[str, ...]
    mean: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_ids("members", self.members, 3, MAX_GROUP)
        m = self.mean
        if not isinstance(m, np.ndarray) or m.dtype != np.float32 or m.ndim != 1:
            raise ValueError("mean: expected a 1-d float32 array")
        if not 1 <= m.size <= MAX_DIM or not np.isfinite(m).all():
            raise ValueError("mean: bad length or non-finite values")


@dataclass(frozen=True, slots=True)
class GroupAbort(_GroupHeader):
    """The leader failed the group (too few set up, vectors or reveals): members stop
    waiting for its mean and apply their no-group policy at once."""

    TYPE = "sa2_abort"
    reason: str

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_reason(self.reason)


@dataclass(frozen=True, slots=True)
class IdentityKey(_Header):
    """The sender's Ed25519 identity key, sent once on each new link. Its hash must be
    the sender's peer id, which the link authenticated (TLS), so the key is the one the
    sender signs its round keys with: how a member checks a mate's setup."""

    TYPE = "sa2_id"
    public: bytes

    def __post_init__(self) -> None:
        _Header.__post_init__(self)
        _check_bytes("public", self.public, IDENTITY_KEY_LEN)


@dataclass(frozen=True, slots=True)
class Abstain(_Header):
    """The sender contributes no model for `round` (it is in no group and its policy
    withholds its update), so its neighbours stop waiting for one."""

    TYPE = "sa2_none"
    reason: str

    def __post_init__(self) -> None:
        _Header.__post_init__(self)
        _check_reason(self.reason)


GroupMessage = (
    GroupJoin
    | GroupOffer
    | SetupDone
    | MaskList
    | Sealed
    | Relayed
    | MaskedVector
    | UnmaskList
    | Unmasking
    | GroupMean
    | GroupAbort
    | IdentityKey
    | Abstain
)

GROUP_MESSAGE_TYPES: dict[str, type[GroupMessage]] = {
    cls.TYPE: cls
    for cls in (
        GroupJoin,
        GroupOffer,
        SetupDone,
        MaskList,
        Sealed,
        Relayed,
        MaskedVector,
        UnmaskList,
        Unmasking,
        GroupMean,
        GroupAbort,
        IdentityKey,
        Abstain,
    )
}
# The array field of each kind that carries one, and the dtype it must have.
TENSOR_FIELDS: dict[str, tuple[str, np.dtype]] = {
    MaskedVector.TYPE: ("masked", np.dtype(np.uint32)),
    GroupMean.TYPE: ("mean", np.dtype(np.float32)),
}


@dataclass(frozen=True, slots=True)
class GroupSend:
    """Send `message` to each peer in `to` (a peer may be the sender itself)."""

    to: tuple[str, ...]
    message: GroupMessage
