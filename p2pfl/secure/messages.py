"""Field checks and bounds shared by the secure-aggregation messages (group_messages.py).

Each check raises ValueError naming the field, so a message whose `__post_init__` ran is
structurally sound; `p2pfl.secure.wire` turns the error into the wire's typed one.
"""

from __future__ import annotations

import itertools

SESSION_LEN = 16
MAX_PARTICIPANTS = 1024
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
