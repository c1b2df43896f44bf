"""`[[participation]]` tables of a scenario: which nodes train only under conditions.

Each table gives some nodes (default: all) the device conditions of `--train-when`
(`ac_power`, `cpu_below:P`, `hours:H1-H2`; docs/heterogeneity.md), so a study can
watch a federation in which some devices sit rounds out. The conditions are checked
here with the node's own parser, so a typo fails before any node starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pfl.scenario.table import ScenarioError, Table


@dataclass(frozen=True)
class ParticipationSpec:
    nodes: tuple[int, ...]
    when: tuple[str, ...]


def parse_participation(raw: Any, nodes: int) -> tuple[ParticipationSpec, ...]:
    from p2pfl.node.participation import parse_conditions

    if raw is None:
        return ()
    items = [raw] if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ScenarioError("participation", "expected [[participation]] tables")
    specs: list[ParticipationSpec] = []
    seen: set[int] = set()
    for i, item in enumerate(items):
        where = f"participation[{i}]"
        if not isinstance(item, dict):
            raise ScenarioError(where, "expected a table with nodes and when")
        t = Table(item, where)
        members = _nodes(t, where, nodes)
        when = t.raw("when")
        if not isinstance(when, list) or not when or not all(isinstance(w, str) for w in when):
            raise ScenarioError(
                f"{where}.when", 'expected a non-empty list such as ["cpu_below:50"]'
            )
        try:
            parse_conditions(when)
        except ValueError as exc:
            raise ScenarioError(f"{where}.when", str(exc)) from None
        t.finish()
        twice = seen.intersection(members)
        if twice:
            raise ScenarioError(
                f"{where}.nodes", f"node {min(twice)} is already in an earlier [[participation]]"
            )
        seen.update(members)
        specs.append(ParticipationSpec(members, tuple(when)))
    return tuple(specs)


def _nodes(t: Table, where: str, nodes: int) -> tuple[int, ...]:
    if not t.has("nodes"):
        return tuple(range(nodes))
    raw = t.raw("nodes")
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in raw)
    ):
        raise ScenarioError(f"{where}.nodes", f"expected a list of node indices, got {raw!r}")
    bad = [n for n in raw if not 0 <= n < nodes]
    if bad:
        raise ScenarioError(f"{where}.nodes", f"node {bad[0]} is not in 0..{nodes - 1}")
    return tuple(sorted(set(raw)))
