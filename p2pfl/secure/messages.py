"""Payloads of the secure-aggregation exchange, shaped like `p2pfl.wire.messages` types.

Each class has `TYPE`, `sender` and `round` first, then plain fields (str, int, float,
bytes, tuples of those, one uint32 ndarray), so the wire codec can carry them like any
other message. `__post_init__` checks shape and ranges (ValueError), so a decoded
message that exists is structurally sound; protocol.py checks meaning (right session,
group, attempt, membership).

Flow for one aggregator A and round r (M = a member of one of A's groups):
    every node -> neighbours  SecureKey      once per session and on reconnect
    A -> participants         GroupAnnounce  groups + relayed signed keys
    M -> A                    MaskedUpdate   masked fixed-point update (attempt 0)
    A -> survivors            GroupRetry     only if some member timed out: attempt+1
    M -> A                    MaskedUpdate   (for the retry attempt)
    A -> attempt members      UnmaskRequest  once every vector of the attempt arrived
    M -> A                    MaskReveal     the self-mask seed of that attempt
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pfl.secure.keys import ANNOUNCEMENT_LEN
from p2pfl.secure.masking import MAX_CLIP, MIN_CLIP, SEED_LEN

SESSION_LEN = 16
MAX_PARTICIPANTS = 1024
MAX_ATTEMPTS = 16
MAX_GROUPS = MAX_PARTICIPANTS // 3
MAX_DIM = 2**28
MAX_ID_LEN = 128
MAX_ROUND = 2**31  # exclusive, as for every round on the wire (p2pfl.wire.codec)


def _check_id(name: str, value: object) -> None:
    if type(value) is not str or not 0 < len(value) <= MAX_ID_LEN or not value.isprintable():
        raise ValueError(f"{name}: not a peer id")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value < high:
        raise ValueError(f"{name}: expected int in [{low}, {high}), got {value!r}")


def _check_bytes(name: str, value: object, length: int) -> None:
    if type(value) is not bytes or len(value) != length:
        raise ValueError(f"{name}: expected {length} bytes")


def _check_ids(name: str, ids: object, low: int, high: int) -> None:
    """A tuple of `low`..`high` sorted, distinct peer ids."""
    if type(ids) is not tuple or not low <= len(ids) <= high:
        raise ValueError(f"{name}: expected a tuple of {low}..{high} peer ids")
    for i, m in enumerate(ids):
        _check_id(f"{name}[{i}]", m)
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise ValueError(f"{name}: must be sorted and distinct")


def _check_members(name: str, members: object) -> None:
    """Sorted, distinct peer ids, at least 3 (no valid group is smaller)."""
    _check_ids(name, members, 3, MAX_PARTICIPANTS)


@dataclass(frozen=True, slots=True)
class _GroupHeader:
    """Fields shared by the per-group messages (after sender and round)."""

    sender: str
    round: int
    session: bytes
    group: int
    attempt: int

    def __post_init__(self) -> None:
        _check_id("sender", self.sender)
        _check_int("round", self.round, 0, MAX_ROUND)
        _check_bytes("session", self.session, SESSION_LEN)
        _check_int("group", self.group, 0, MAX_GROUPS)
        _check_int("attempt", self.attempt, 0, MAX_ATTEMPTS)


@dataclass(frozen=True, slots=True)
class SecureKey:
    """A node's signed X25519 announcement (`KeyAnnouncement.to_bytes`, 137 bytes)."""

    TYPE = "sa_key"
    sender: str
    round: int
    key: bytes

    def __post_init__(self) -> None:
        _check_id("sender", self.sender)
        _check_int("round", self.round, 0, MAX_ROUND)
        _check_bytes("key", self.key, ANNOUNCEMENT_LEN)


@dataclass(frozen=True, slots=True)
class GroupAnnounce:
    """A's grouping for `round`: participants (sorted), their relayed signed keys (same
    order), the groups as index tuples, and the encoding parameters everyone must share.
    `session` is a fresh random nonce per (A, round), bound into every pair seed, so a
    restarted aggregator can never make members reuse masks."""

    TYPE = "sa_announce"
    sender: str
    round: int
    session: bytes
    group_size: int
    clip: float
    dim: int
    participants: tuple[str, ...]
    keys: tuple[bytes, ...]
    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        _check_id("sender", self.sender)
        _check_int("round", self.round, 0, MAX_ROUND)
        _check_bytes("session", self.session, SESSION_LEN)
        _check_int("group_size", self.group_size, 3, MAX_PARTICIPANTS + 1)
        if type(self.clip) is not float or not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip: expected a positive finite float")
        if not MIN_CLIP <= self.clip <= MAX_CLIP:
            raise ValueError(f"clip: must be in [{MIN_CLIP}, {MAX_CLIP}]")
        _check_int("dim", self.dim, 1, MAX_DIM + 1)
        _check_members("participants", self.participants)
        if type(self.keys) is not tuple or len(self.keys) != len(self.participants):
            raise ValueError("keys: one per participant")
        for i, k in enumerate(self.keys):
            _check_bytes(f"keys[{i}]", k, ANNOUNCEMENT_LEN)
        if type(self.groups) is not tuple or not 1 <= len(self.groups) <= MAX_GROUPS:
            raise ValueError("groups: expected a non-empty tuple")
        for i, g in enumerate(self.groups):
            if type(g) is not tuple or len(g) < 3:
                raise ValueError(f"groups[{i}]: expected a tuple of >= 3 indices")
            for j in g:
                _check_int(f"groups[{i}]", j, 0, len(self.participants))


@dataclass(frozen=True, slots=True, eq=False)
class MaskedUpdate(_GroupHeader):
    """M's masked fixed-point update for (group, attempt): uint32, shape (dim,)."""

    TYPE = "sa_masked"
    masked: np.ndarray = field(repr=False, kw_only=True)

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        a = self.masked
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.uint32:
            raise ValueError("masked: expected a 1-D uint32 array")
        if not 1 <= a.size <= MAX_DIM:
            raise ValueError("masked: size out of range")


@dataclass(frozen=True, slots=True)
class GroupRetry(_GroupHeader):
    """Some members of the previous attempt timed out: start `attempt` with `members`
    (the survivors, sorted) under fresh masks."""

    TYPE = "sa_retry"
    members: tuple[str, ...] = field(kw_only=True)

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_members("members", self.members)


@dataclass(frozen=True, slots=True)
class UnmaskRequest(_GroupHeader):
    """A holds a vector from every one of `members` for `attempt`: reveal self-masks."""

    TYPE = "sa_unmask"
    members: tuple[str, ...] = field(kw_only=True)

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_members("members", self.members)


@dataclass(frozen=True, slots=True)
class MaskReveal(_GroupHeader):
    """M's self-mask seed for (group, attempt)."""

    TYPE = "sa_reveal"
    seed: bytes = field(kw_only=True)

    def __post_init__(self) -> None:
        _GroupHeader.__post_init__(self)
        _check_bytes("seed", self.seed, SEED_LEN)


SecureMessage = SecureKey | GroupAnnounce | MaskedUpdate | GroupRetry | UnmaskRequest | MaskReveal
SECURE_MESSAGE_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (SecureKey, GroupAnnounce, MaskedUpdate, GroupRetry, UnmaskRequest, MaskReveal)
}


def wire_size(msg: SecureMessage) -> int:
    """Close upper estimate of the msgpack-encoded size (for byte counters in stats).

    Per field: key name + value + a few bytes of msgpack headers; header keys v, type.
    """
    total = 1 + 2 + 1 + 5 + 1 + len(msg.TYPE) + 1  # map header, "v": int, "type": str
    for name in msg.__dataclass_fields__:
        value = getattr(msg, name)
        total += 1 + len(name) + _value_size(value)
    return total


def _value_size(value: object) -> int:
    if isinstance(value, np.ndarray):
        return 40 + value.nbytes  # tensor map: dtype, shape, data bin
    if isinstance(value, bytes):
        return 5 + len(value)
    if isinstance(value, str):
        return 2 + len(value.encode())
    if isinstance(value, tuple):
        return 3 + sum(_value_size(v) for v in value)
    return 9  # int or float
