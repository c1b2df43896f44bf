"""`[attack]` / `[[attack]]` tables of a scenario: which nodes attack, how and when.

Split from `schema.py` because resolving attacks is its own job: node sets drawn from
the seed around explicit lists and every `honest_to`, options completed per attack
(ALIE's z, the tailored attack's copies) so every runner and process sees the same
assignment.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from p2pfl.scenario.table import ScenarioError, Table


@dataclass(frozen=True)
class AttackSpec:
    """One attack assignment: which nodes, what they do, from when, and to whom not.

    `nodes` is resolved at parse time (a `fraction` becomes indices drawn from the
    scenario seed) and `options` are complete (ALIE's z and the tailored attack's
    copies are computed here from the node and attacker counts), so every runner and
    every process sees the same attack. The nodes are honest before `start_round`, and
    always send their honest model to the `honest_to` nodes.
    """

    kind: str = ""
    nodes: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    start_round: int = 0
    honest_to: tuple[int, ...] = ()


_ATTACK_KEYS = ("kind", "nodes", "fraction", "start_round", "honest_to")


@dataclass(frozen=True)
class _AttackDraft:
    """One attack table read, before fractions are drawn (they depend on the others)."""

    path: str
    kind: str
    nodes: tuple[int, ...] | None  # an explicit list, or None: `count` drawn
    count: int
    options: dict[str, Any]
    start_round: int
    honest_to: tuple[int, ...]


def parse_attacks(raw: Any, nodes: int, seed: int, rounds: int) -> tuple[AttackSpec, ...]:
    """`[attack]` (one table) or `[[attack]]` (several), each `kind = "...", nodes =
    [i, ...] | fraction = 0.2, start_round = 0, honest_to = [j, ...], <attack options>`.

    Node sets are disjoint. Explicit lists are taken first; fractions are then drawn
    from the scenario seed, in file order, among the nodes still honest and named in
    no `honest_to` (a study names those to keep them honest), so a fraction never
    collides with a list and a single `[attack]` table draws the same nodes as it
    always did.
    """
    if raw is None or raw == {} or raw == []:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    paths = [f"attack[{i}]" for i in range(len(items))] if isinstance(raw, list) else ["attack"]
    drafts = [
        _read_attack(Table(item, path), path, nodes, rounds)
        for item, path in zip(items, paths, strict=True)
    ]
    taken: dict[int, str] = {}  # node -> the attack that has it
    for d in drafts:
        for i in d.nodes or ():
            if i in taken:
                raise ScenarioError(
                    f"{d.path}.nodes", f"node {i} is already an attacker in {taken[i]}"
                )
            taken[i] = d.path
    spared = {j for d in drafts for j in d.honest_to}
    rng = random.Random(f"p2pfl-scenario-attack:{seed}")
    chosen: list[tuple[int, ...]] = []
    for d in drafts:
        if d.nodes is not None:
            chosen.append(d.nodes)
            continue
        free = [i for i in range(nodes) if i not in taken and i not in spared]
        if d.count > len(free):
            raise ScenarioError(
                f"{d.path}.fraction",
                f"needs {d.count} nodes, but only {len(free)} are neither attackers already "
                "nor named in an honest_to",
            )
        picked = tuple(sorted(rng.sample(free, d.count)))
        taken.update(dict.fromkeys(picked, d.path))
        chosen.append(picked)
    if len(taken) >= nodes:
        last = drafts[-1]
        key = "nodes" if last.nodes is not None else "fraction"
        raise ScenarioError(f"{last.path}.{key}", "at least one node must stay honest")
    return tuple(_finish_attack(d, c, nodes) for d, c in zip(drafts, chosen, strict=True))


def _read_attack(t: Table, path: str, nodes: int, rounds: int) -> _AttackDraft:
    from p2pfl.learning.attacks import ATTACK_NAMES, make_attack

    kind = t.get_str("kind", "", choices=ATTACK_NAMES)
    if not kind:
        raise ScenarioError(f"{path}.kind", "is required (one of " + ", ".join(ATTACK_NAMES) + ")")
    if t.has("nodes") == t.has("fraction"):
        raise ScenarioError(path, "give exactly one of nodes = [indices] or fraction = 0.2")
    explicit: tuple[int, ...] | None = None
    count = 0
    if t.has("nodes"):
        explicit = _index_list(t.raw("nodes"), f"{path}.nodes", nodes)
        count = len(explicit)
        if count >= nodes:
            raise ScenarioError(f"{path}.nodes", "at least one node must stay honest")
    else:
        fraction = t.get_float("fraction", 0.0, positive=True)
        count = math.floor(fraction * nodes + 0.5)
        if not 1 <= count < nodes:
            raise ScenarioError(f"{path}.fraction", f"makes {count} of {nodes} nodes malicious")
    start_round = t.get_int("start_round", 0, minimum=0)
    if start_round >= rounds:
        raise ScenarioError(
            f"{path}.start_round", f"must be < rounds ({rounds}), or the attack never starts"
        )
    honest_to: tuple[int, ...] = ()
    if t.has("honest_to"):
        honest_to = _index_list(t.raw("honest_to"), f"{path}.honest_to", nodes)
        if kind == "label_flip":
            raise ScenarioError(
                f"{path}.honest_to",
                "label_flip poisons the training itself: there is no honest model to send",
            )
        own = sorted(set(honest_to) & set(explicit or ()))
        if own:
            raise ScenarioError(f"{path}.honest_to", f"lists the attack's own node {own[0]}")
    options = {k: t.raw(k) for k in t.present() if k not in _ATTACK_KEYS}
    for key, value in options.items():
        try:
            make_attack(kind, options={key: value})
        except ValueError as exc:
            raise ScenarioError(f"{path}.{key}", str(exc)) from None
    t.finish()
    return _AttackDraft(path, kind, explicit, count, options, start_round, honest_to)


def _index_list(raw: Any, path: str, nodes: int) -> tuple[int, ...]:
    ok = isinstance(raw, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < nodes for v in raw
    )
    if not ok or not raw or len(set(raw)) != len(raw):
        raise ScenarioError(path, f"expected distinct indices in 0..{nodes - 1}")
    return tuple(sorted(raw))


def _finish_attack(d: _AttackDraft, chosen: tuple[int, ...], nodes: int) -> AttackSpec:
    """The options every node of the attack gets, complete: ALIE's z and the tailored
    attack's copies count this attack's nodes (the ones sending the same vector)."""
    from p2pfl.learning.attacks import alie_z

    options = dict(d.options)
    if d.kind == "alie" and "z" not in options:
        options["z"] = round(alie_z(nodes, len(chosen)), 6)
    if d.kind == "tailored" and "copies" not in options:
        options["copies"] = len(chosen)
    return AttackSpec(d.kind, chosen, options, d.start_round, d.honest_to)
