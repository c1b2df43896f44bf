"""Scenario topologies: who is wired to whom, as an undirected edge list.

Pure functions, deterministic for a given seed, so a scenario file always yields the
same graph. Every graph is checked before use (no self loops, indices in range,
connected): a disconnected federation never converges, and that should be a clear
error at load time rather than a mysteriously bad accuracy plot.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence

KINDS = ("full", "ring", "kregular", "cliques", "edges")
_REGULAR_ATTEMPTS = 200

Edge = tuple[int, int]


class TopologyError(ValueError):
    """The requested topology cannot be built; `field` names the scenario key at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def edges(
    kind: str,
    n: int,
    *,
    degree: int | None = None,
    edges: Sequence[Sequence[int]] | None = None,
    cliques: int | None = None,
    seed: int = 0,
) -> list[Edge]:
    """Return the sorted, de-duplicated undirected edges (i < j) of the requested graph."""
    if n < 1:
        raise TopologyError("nodes", "must be >= 1")
    if kind == "full":
        result = [(i, j) for i in range(n) for j in range(i + 1, n)]
    elif kind == "ring":
        result = _ring(n)
    elif kind == "kregular":
        result = _kregular(n, degree, seed)
    elif kind == "cliques":
        result = _cliques(n, cliques)
    elif kind == "edges":
        result = _explicit(n, edges)
    else:
        raise TopologyError("kind", f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not is_connected(n, result):
        raise TopologyError(
            "edges" if kind == "edges" else "kind",
            f"the {kind} graph on {n} nodes is not connected",
        )
    return result


def _ring(n: int) -> list[Edge]:
    if n == 1:
        return []
    return sorted({_norm(i, (i + 1) % n) for i in range(n)})


def blocks(n: int, k: int) -> list[range]:
    """Nodes 0..n-1 cut into k contiguous blocks, sizes differing by at most one (the
    first n % k one larger): the same cut as the `clusters` data partition, so a
    community of the graph is a cluster of labels."""
    size, extra = divmod(n, k)
    out, start = [], 0
    for b in range(k):
        stop = start + size + (b < extra)
        out.append(range(start, stop))
        start = stop
    return out


def _cliques(n: int, k: int | None) -> list[Edge]:
    """k cliques on contiguous node blocks, each joined to the next by one edge (its
    last node to the next block's first): k = 2 is the dumbbell, the sparsest honest
    cut a robust rule can face."""
    if k is None:
        raise TopologyError("cliques", "is required for kind = 'cliques'")
    if not 1 <= k <= n:
        raise TopologyError("cliques", f"must be in 1..{n} (nodes)")
    parts = blocks(n, k)
    result = {_norm(i, j) for part in parts for i in part for j in part if i < j}
    result |= {_norm(a[-1], b[0]) for a, b in itertools.pairwise(parts)}
    return sorted(result)


def _kregular(n: int, degree: int | None, seed: int) -> list[Edge]:
    if degree is None:
        raise TopologyError("degree", "is required for kind = 'kregular'")
    if not 1 <= degree < n:
        raise TopologyError("degree", f"must be >= 1 and < nodes ({n})")
    if n * degree % 2:
        raise TopologyError("degree", f"nodes * degree must be even (got {n} * {degree})")
    if degree == 1 and n > 2:
        raise TopologyError("degree", "a 1-regular graph on more than 2 nodes is never connected")
    rng = random.Random(seed)
    for _ in range(_REGULAR_ATTEMPTS):
        found = _try_regular(n, degree, rng)
        if found is not None and is_connected(n, found):
            return sorted(found)
    raise TopologyError(
        "degree", f"no connected {degree}-regular graph on {n} nodes found; try another seed"
    )


def _try_regular(n: int, k: int, rng: random.Random) -> set[Edge] | None:
    """One attempt of the pairing model (Steger-Wormald variant): pair random stubs,
    keep the pairs that make a new simple edge, re-pair the rest; give up when stuck."""
    found: set[Edge] = set()
    stubs = [v for v in range(n) for _ in range(k)]
    while stubs:
        rng.shuffle(stubs)
        leftover: list[int] = []
        for u, v in zip(stubs[::2], stubs[1::2], strict=True):
            e = _norm(u, v)
            if u != v and e not in found:
                found.add(e)
            else:
                leftover += [u, v]
        if leftover and not _pairable(leftover, found):
            return None
        stubs = leftover
    return found


def _pairable(stubs: list[int], found: set[Edge]) -> bool:
    distinct = sorted(set(stubs))
    return any(_norm(u, v) not in found for i, u in enumerate(distinct) for v in distinct[i + 1 :])


def _explicit(n: int, given: Sequence[Sequence[int]] | None) -> list[Edge]:
    if given is None or len(given) == 0:
        if n == 1:
            return []
        raise TopologyError("edges", "is required (a list of [i, j] pairs) for kind = 'edges'")
    out: set[Edge] = set()
    for pos, pair in enumerate(given):
        if len(pair) != 2:
            raise TopologyError(f"edges[{pos}]", f"must be a pair [i, j], got {list(pair)}")
        i, j = pair
        if not (0 <= i < n and 0 <= j < n):
            raise TopologyError(f"edges[{pos}]", f"node index out of range 0..{n - 1}: [{i}, {j}]")
        if i == j:
            raise TopologyError(f"edges[{pos}]", f"self loop [{i}, {j}]")
        out.add(_norm(i, j))
    return sorted(out)


def _norm(i: int, j: int) -> Edge:
    return (i, j) if i < j else (j, i)


def adjacency(n: int, edge_list: Iterable[Edge]) -> list[list[int]]:
    """Sorted neighbour lists, index = node."""
    adj: list[set[int]] = [set() for _ in range(n)]
    for i, j in edge_list:
        adj[i].add(j)
        adj[j].add(i)
    return [sorted(s) for s in adj]


def neighbours_of(edge_list: Iterable[Edge], i: int) -> list[int]:
    """Sorted neighbours of node i."""
    return sorted({j if a == i else a for a, j in edge_list if i in (a, j)})


def is_connected(n: int, edge_list: Iterable[Edge]) -> bool:
    if n <= 1:
        return True
    adj = adjacency(n, edge_list)
    seen = {0}
    stack = [0]
    while stack:
        for j in adj[stack.pop()]:
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return len(seen) == n
