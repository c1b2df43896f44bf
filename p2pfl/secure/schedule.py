"""Who sums with whom in a round: a schedule no single node controls and every member checks.

Issue 14: when each aggregator grouped its own neighbours, an update entered a different
secure sum at every neighbour, so colluding aggregators could pool their sums and solve
for single updates, and an aggregator could seat a victim among identities it minted.
Here each update enters exactly one sum per round, and the member, not an aggregator,
decides which:

1. **Leader.** Node v picks its round-r leader itself: the node with the smallest
   `score(federation, r, id)` among v and its secure neighbours (peers whose keys v
   received over its own authenticated channels and that pass its own admission
   policy). Scores are a hash of public values, so no node steers the choice; a node
   that grinds identities for a low score only wins rounds it cannot predict far ahead
   (see docs/secure-aggregation.md for that limit).
2. **Groups.** The leader splits the nodes that chose it (its "choosers") into groups
   with `partition`: order by a second hash that also binds the leader, cut into
   balanced groups of `min_group..` members. Every member recomputes the partition from
   the chooser list the leader sends, so the leader's only freedom is that list; a
   member still refuses a group smaller than its own minimum or with a mate it cannot
   authenticate itself.

Pure functions of public inputs; no I/O.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

from p2pfl.secure.keys import _lp

MIN_GROUP = 3
_LEADER_DOMAIN = b"p2pfl/secure/leader/v2\x00"
_ORDER_DOMAIN = b"p2pfl/secure/partition/v2\x00"


def score(federation: str, round: int, peer_id: str) -> bytes:
    """A node's leader score for a round (smaller leads): public, unpredictable per round."""
    return hashlib.sha256(
        _LEADER_DOMAIN + _lp(federation.encode()) + struct.pack(">Q", round) + _lp(peer_id.encode())
    ).digest()


def choose_leader(federation: str, round: int, me: str, neighbours: Iterable[str]) -> str:
    """The leader `me` joins in `round`: the smallest score among itself and `neighbours`.

    `neighbours` must be the caller's own verified secure neighbours; the choice is then
    the caller's alone (a neighbour cannot claim to be anyone's leader).
    """
    return min({me, *neighbours}, key=lambda p: (score(federation, round, p), p))


def group_sizes(n: int, group_size: int, min_group: int = MIN_GROUP) -> list[int]:
    """Balanced sizes for n choosers: about n / group_size groups, none below `min_group`.

    m = min(ceil(n / g), floor(n / min_group)) groups whose sizes differ by at most one
    (so at most max(g, 2 min_group - 1) members each); fewer than `min_group` choosers
    give no group.
    """
    if min_group < MIN_GROUP:
        raise ValueError(f"min_group must be >= {MIN_GROUP}, got {min_group}")
    if group_size < min_group:
        raise ValueError(f"group_size ({group_size}) must be >= min_group ({min_group})")
    if n < min_group:
        return []
    m = min(-(-n // group_size), n // min_group)
    base, extra = divmod(n, m)
    return [base + 1] * extra + [base] * (m - extra)


def partition(
    federation: str,
    round: int,
    leader: str,
    choosers: Sequence[str],
    group_size: int,
    min_group: int = MIN_GROUP,
) -> tuple[tuple[str, ...], ...]:
    """The leader's groups for this round; each group's members in peer-id order.

    Deterministic in its inputs, so a member checks the leader's grouping by recomputing
    it from the announced chooser list. `choosers` must be distinct (the leader itself is
    one of them when it chose itself).
    """
    ids = sorted(choosers)
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate choosers")
    prefix = (
        _ORDER_DOMAIN + _lp(federation.encode()) + struct.pack(">Q", round) + _lp(leader.encode())
    )
    order = sorted(ids, key=lambda p: hashlib.sha256(prefix + _lp(p.encode())).digest())
    groups = []
    start = 0
    for size in group_sizes(len(ids), group_size, min_group):
        groups.append(tuple(sorted(order[start : start + size])))
        start += size
    return tuple(groups)


def group_of(groups: Iterable[tuple[str, ...]], peer: str) -> tuple[int, tuple[str, ...]] | None:
    """(index, members) of the group holding `peer`, or None."""
    for index, members in enumerate(groups):
        if peer in members:
            return index, members
    return None


def coverage(
    federation: str,
    round: int,
    graph: dict[str, set[str]],
    group_size: int,
    min_group: int = MIN_GROUP,
) -> dict[str, tuple[str, ...] | None]:
    """Every node's group in one round of a known graph (None: no group). For studies
    and tests: a real node never sees the whole graph."""
    choosers: dict[str, list[str]] = {}
    for node, neighbours in graph.items():
        choosers.setdefault(choose_leader(federation, round, node, neighbours), []).append(node)
    out: dict[str, tuple[str, ...] | None] = dict.fromkeys(graph)
    for leader, members in choosers.items():
        for group in partition(federation, round, leader, members, group_size, min_group):
            for peer in group:
                out[peer] = group
    return out
