"""The round schedule of secure aggregation v2 (issue 14): members choose, leaders cannot steer."""

from __future__ import annotations

import random

import pytest

from p2pfl.secure.schedule import (
    choose_leader,
    coverage,
    group_of,
    group_sizes,
    partition,
    score,
)

FED = "fed"
IDS = [f"peer{i:02d}" for i in range(20)]


def test_the_leader_is_the_smallest_score_in_the_closed_neighbourhood() -> None:
    me, neighbours = IDS[0], IDS[1:7]
    leader = choose_leader(FED, 5, me, neighbours)
    assert leader == min([me, *neighbours], key=lambda p: score(FED, 5, p))
    # The choice depends only on the member's own view: order and duplicates do not matter.
    assert choose_leader(FED, 5, me, list(reversed(neighbours)) + neighbours[:2]) == leader
    # A node with no secure neighbours leads itself.
    assert choose_leader(FED, 5, me, []) == me


def test_leaders_change_from_round_to_round_and_between_federations() -> None:
    leaders = {choose_leader(FED, r, IDS[0], IDS[1:]) for r in range(40)}
    assert len(leaders) > 10
    assert any(
        choose_leader(FED, r, IDS[0], IDS[1:]) != choose_leader("other", r, IDS[0], IDS[1:])
        for r in range(5)
    )


@pytest.mark.parametrize(
    ("n", "g", "m", "expected"),
    [
        (2, 4, 3, []),
        (3, 4, 3, [3]),
        (5, 4, 3, [5]),
        (6, 4, 3, [3, 3]),
        (9, 4, 3, [3, 3, 3]),
        (10, 4, 3, [4, 3, 3]),
        (20, 4, 3, [4, 4, 4, 4, 4]),
        (7, 4, 4, [7]),
        (8, 5, 4, [4, 4]),
    ],
)
def test_group_sizes_are_balanced_and_never_below_the_minimum(
    n: int, g: int, m: int, expected: list[int]
) -> None:
    assert group_sizes(n, g, m) == expected
    assert sum(expected) in (0, n)


def test_group_sizes_reject_a_minimum_below_three_or_above_the_size() -> None:
    with pytest.raises(ValueError):
        group_sizes(10, 4, 2)
    with pytest.raises(ValueError):
        group_sizes(10, 3, 4)


def test_partition_is_a_deterministic_function_of_the_chooser_list() -> None:
    choosers = IDS[:11]
    groups = partition(FED, 3, IDS[0], choosers, 4)
    assert sorted(p for g in groups for p in g) == sorted(choosers)
    assert all(len(g) >= 3 and list(g) == sorted(g) for g in groups)
    # Same inputs, same groups, whatever order the leader lists them in.
    assert partition(FED, 3, IDS[0], list(reversed(choosers)), 4) == groups
    # Another round or another leader reshuffles who sits with whom.
    assert partition(FED, 4, IDS[0], choosers, 4) != groups
    assert partition(FED, 3, IDS[1], choosers, 4) != groups
    with pytest.raises(ValueError, match="duplicate"):
        partition(FED, 3, IDS[0], [*choosers, choosers[0]], 4)


def test_group_of_finds_a_members_group() -> None:
    groups = partition(FED, 1, IDS[0], IDS[:9], 3)
    index, members = group_of(groups, IDS[4]) or (None, ())
    assert index is not None and IDS[4] in members
    assert group_of(groups, "stranger") is None


def _regular(n: int, d: int, rng: random.Random) -> dict[str, set[str]]:
    while True:
        stubs = [i for i in range(n) for _ in range(d)]
        rng.shuffle(stubs)
        edges = {(min(a, b), max(a, b)) for a, b in zip(stubs[::2], stubs[1::2], strict=True)}
        if len(edges) == n * d // 2 and all(a != b for a, b in edges):
            graph: dict[str, set[str]] = {IDS[i]: set() for i in range(n)}
            for a, b in edges:
                graph[IDS[a]].add(IDS[b])
                graph[IDS[b]].add(IDS[a])
            return graph


def test_every_node_of_a_full_mesh_is_in_exactly_one_group_each_round() -> None:
    graph = {p: set(IDS) - {p} for p in IDS}
    for r in range(10):
        groups = coverage(FED, r, graph, 4)
        assert all(g is not None for g in groups.values())
        distinct = {g for g in groups.values() if g is not None}
        assert sum(len(g) for g in distinct) == len(IDS)  # one sum per update


def test_on_a_sparse_graph_groups_are_disjoint_and_some_nodes_sit_out() -> None:
    graph = _regular(20, 4, random.Random(7))
    grouped = []
    for r in range(30):
        groups = coverage(FED, r, graph, 4)
        distinct = {g for g in groups.values() if g is not None}
        members = [p for g in distinct for p in g]
        assert len(members) == len(set(members))  # disjoint: each update in one sum
        assert all(len(g) >= 3 for g in distinct)
        grouped.append(len(members) / len(IDS))
    # Measured, not promised: a 4-regular graph groups most but not all nodes.
    assert 0.4 < sum(grouped) / len(grouped) < 1.0
