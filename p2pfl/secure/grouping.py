"""Deterministic, verifiable split of an aggregator's neighbours into groups.

Every member recomputes the grouping from the announcement (federation, round,
aggregator id, participant ids) and refuses one that differs, so the aggregator cannot
hand-pick who sits with whom: the order is a hash of those inputs, not its choice.

Sizes: m = min(ceil(n / g), floor(n / 3)) groups with sizes differing by at most one.
Every group has at least 3 members (the floor(n / 3) cap merges the leftovers) and at
most max(g, 5) (5 only when n = 5 and g < 5: five neighbours cannot form two groups of 3).
Fewer than 3 participants give no group at all.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from p2pfl.secure import schedule
from p2pfl.secure.keys import _lp

MIN_GROUP = schedule.MIN_GROUP
_DOMAIN = b"p2pfl/secure/grouping/v1\x00"


def group_sizes(n: int, group_size: int) -> list[int]:
    """Sizes of the groups for n participants and target size g (empty if n < 3)."""
    return schedule.group_sizes(n, group_size, MIN_GROUP)


def max_group_size(group_size: int) -> int:
    return max(group_size, 5)


def make_groups(
    federation: str, round: int, aggregator: str, participants: Sequence[str], group_size: int
) -> tuple[tuple[str, ...], ...]:
    """The groups for this round; each group's members in peer id order.

    `participants` must be distinct and must not contain the aggregator.
    """
    ids = sorted(participants)
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate participants")
    if aggregator in ids:
        raise ValueError("the aggregator cannot be one of its own participants")
    prefix = (
        _DOMAIN + _lp(federation.encode()) + struct.pack(">Q", round) + _lp(aggregator.encode())
    )
    order = sorted(ids, key=lambda p: hashlib.sha256(prefix + _lp(p.encode())).digest())
    groups = []
    start = 0
    for size in group_sizes(len(ids), group_size):
        groups.append(tuple(sorted(order[start : start + size])))
        start += size
    return tuple(groups)
