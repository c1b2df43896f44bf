"""Does secure aggregation cost robustness? Honest accuracy, plain robust vs secure + robust.

Run: nice python benchmarks/secure_robustness.py [--rounds 15] [--jobs 2] [--only mesh,sparse]
     [--out benchmarks/results/secure_robustness.json]

Setup: `scenarios/secure-robust.toml` (20 nodes, full mesh, digits iid, softmax, 2 local
epochs, seed 0) and `scenarios/secure-robust-sparse.toml` (the same on a random 6-regular
graph, with `no_group = "skip"` and `mates = "members"`), read from the files and varied:

- topology (`--only`): `mesh` (full mesh, secure options as shipped: no_group = "wait",
  mates = "auto") and `sparse` (6-regular, no_group = "skip", mates = "members");
- attack (columns): no attacker; sign-flip (scale 4, the attack's default) with 10% (2)
  and 20% (4) attackers; and sign-flip scaled x10 (scale 10) at 10% and 20%;
- rule: trimmed mean, coordinate-wise median, centred clipping, each declaring
  f = the number of attackers (f = 2 in the no-attack column: the shipped 10% setup
  run without an attack, i.e. what robustness costs when nobody attacks);
- mode: `plain` (secure aggregation off) and `secure g3` / `secure g4` (group_size 3 or 4,
  min_group 3): every node masks its update in one group per round and the robust rule
  runs over its own model plus the distinct group means it received.

Each cell is one `--in-process` scenario run (the real Node code on the in-memory
transport). Measured per cell: the honest nodes' mean and minimum final test accuracy;
for secure cells the share of node-rounds spent in a group, from every node's `secure`
status (rounds_grouped / (rounds_grouped + rounds_out)), and why the others were out;
node-rounds that ended on the round timeout; aggregations where the rule had too few
inputs for its f and fell back to the median (all nodes, attackers included); wall time.
A cell whose run fails is recorded with its error instead of numbers.

Writes benchmarks/results/secure_robustness.json (commit, command, platform, every cell)
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _cells import chosen, counting_fallbacks, run_cell_in_process, run_grid

import p2pfl

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "secure_robustness.json"
TOPOLOGIES = {
    "mesh": ROOT / "scenarios" / "secure-robust.toml",
    "sparse": ROOT / "scenarios" / "secure-robust-sparse.toml",
}
# (label, attacker fraction, sign-flip scale or None for the attack's default)
ATTACKS: tuple[tuple[str, float, float | None], ...] = (
    ("none", 0.0, None),
    ("sf10", 0.1, None),
    ("sf10x10", 0.1, 10.0),
    ("sf20", 0.2, None),
    ("sf20x10", 0.2, 10.0),
)
ATTACK_TITLES = {
    "none": "0%",
    "sf10": "10% sign-flip",
    "sf10x10": "10% sign-flip x10",
    "sf20": "20% sign-flip",
    "sf20x10": "20% sign-flip x10",
}
RULES = ("trimmed_mean", "median", "centered_clipping")
MODES = ("plain", "secure g3", "secure g4")
NO_ATTACK_F = 2  # the shipped scenario's f, kept when nobody attacks

Cell = tuple[str, str, str, str, int]  # topology, attack label, rule, mode, rounds


def scenario_doc(topo: str, attack: str, rule: str, mode: str, rounds: int) -> dict[str, Any]:
    doc: dict[str, Any] = tomllib.loads(TOPOLOGIES[topo].read_text())
    _, fraction, scale = next(a for a in ATTACKS if a[0] == attack)
    nodes = int(doc["nodes"])
    attackers = round(fraction * nodes)
    doc["name"] = f"{topo}-{attack}-{rule}-{mode.replace(' ', '-')}"
    doc["rounds"] = rounds
    doc["aggregation"] = {"rule": rule, "f": attackers if attackers else NO_ATTACK_F}
    doc.pop("attack", None)
    if attackers:
        doc["attack"] = {"kind": "sign_flip", "fraction": fraction}
        if scale is not None:
            doc["attack"]["scale"] = scale
    secure = dict(doc.get("secure_aggregation", {}))
    if mode == "plain":
        secure = {"enabled": False}
    else:
        secure.update(enabled=True, group_size=int(mode.removeprefix("secure g")), min_group=3)
    doc["secure_aggregation"] = secure
    return doc


def run_cell(cell: Cell) -> dict[str, Any]:
    topo, attack, rule, mode, rounds = cell
    doc = scenario_doc(topo, attack, rule, mode, rounds)
    out: dict[str, Any] = {
        "topology": topo,
        "attack": attack,
        "rule": rule,
        "mode": mode,
        "rounds": rounds,
        "f": doc["aggregation"]["f"],
        "attack_spec": doc.get("attack"),
        "secure_spec": doc["secure_aggregation"],
    }
    started = time.monotonic()
    try:
        # Every aggregation that fell back, not only each node's first (a warning).
        with counting_fallbacks(every=True) as fallbacks:
            _, metrics, wall = run_cell_in_process(doc, base_dir=ROOT / "scenarios")
    except Exception as exc:  # one failed cell must not lose the grid
        out.update(error=f"{type(exc).__name__}: {exc}", wall_seconds=time.monotonic() - started)
        return out
    final = metrics["summary"]["final"]
    nodes = metrics["nodes"]
    node_rounds = sum(len(rec["rounds"]) for rec in nodes.values())
    out.update(
        honest_accuracy_mean=final["accuracy_mean"],
        honest_accuracy_min=final["accuracy_min"],
        malicious=metrics["summary"]["malicious_nodes"],
        rounds_completed_min=final["rounds_completed_min"],
        node_rounds=node_rounds,
        timed_out_node_rounds=sum(
            1 for rec in nodes.values() for row in rec["rounds"] if row.get("timed_out")
        ),
        fallback_aggregations=fallbacks.count,
        wall_seconds=round(wall, 2),
    )
    statuses = {n: rec["secure"] for n, rec in nodes.items() if rec.get("secure")}
    if statuses:
        grouped = sum(int(s.get("rounds_grouped", 0)) for s in statuses.values())
        outside = sum(int(s.get("rounds_out", 0)) for s in statuses.values())
        reasons: dict[str, int] = {}
        for s in statuses.values():
            for k, v in (s.get("out_reasons") or {}).items():
                reasons[k] = reasons.get(k, 0) + int(v)
        honest = [n for n, rec in nodes.items() if rec["role"] == "honest" and n in statuses]
        h_grouped = sum(int(statuses[n].get("rounds_grouped", 0)) for n in honest)
        h_out = sum(int(statuses[n].get("rounds_out", 0)) for n in honest)
        out["secure"] = {
            "rounds_grouped": grouped,
            "rounds_out": outside,
            "grouped_share": grouped / (grouped + outside) if grouped + outside else None,
            "honest_grouped_share": h_grouped / (h_grouped + h_out) if h_grouped + h_out else None,
            "out_reasons": reasons,
            "grouped_share_min_node": min(
                (
                    int(s["rounds_grouped"]) / (int(s["rounds_grouped"]) + int(s["rounds_out"]))
                    for s in statuses.values()
                    if int(s.get("rounds_grouped", 0)) + int(s.get("rounds_out", 0))
                ),
                default=None,
            ),
        }
    return out


def cells(topos: list[str], rounds: int) -> list[Cell]:
    return [
        (topo, attack, rule, mode, rounds)
        for topo in topos
        for attack, _, _ in ATTACKS
        for rule in RULES
        for mode in MODES
    ]


def _key(r: dict[str, Any]) -> Cell:
    return (r["topology"], r["attack"], r["rule"], r["mode"], r["rounds"])


def _progress(r: dict[str, Any]) -> str:
    if "error" in r:
        detail = f"FAILED {r['error']}"
    else:
        share = r.get("secure", {}).get("grouped_share")
        detail = (
            f"acc={_pct(r['honest_accuracy_mean'])} min={_pct(r['honest_accuracy_min'])}"
            f" grouped={_pct(share)} timeouts={r['timed_out_node_rounds']}"
            f" fallbacks={r['fallback_aggregations']}"
        )
    return (
        f"{r['topology']:6} {r['attack']:8} {r['rule']:17} "
        f"{r['mode']:9} {detail} {r['wall_seconds']:.1f}s"
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _table(
    results: list[dict[str, Any]],
    topo: str,
    modes: tuple[str, ...],
    cell: Callable[[dict[str, Any]], str],
) -> str:
    """A markdown table of rule x mode rows and attack columns; `cell` renders one run
    (a missing run is an empty cell, a row with no run at all is left out)."""
    rows = {_key(r)[1:4]: r for r in results if r["topology"] == topo}
    attacks = [a for a, _, _ in ATTACKS if any(k[0] == a for k in rows)]
    lines = [
        "| rule | mode | " + " | ".join(ATTACK_TITLES[a] for a in attacks) + " |",
        "|---|---|" + "---:|" * len(attacks),
    ]
    for rule in RULES:
        for mode in modes:
            found = [rows.get((a, rule, mode)) for a in attacks]
            texts = ["" if r is None else cell(r) for r in found]
            if any(texts):
                lines.append(f"| {rule} | {mode} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _accuracy_cell(r: dict[str, Any]) -> str:
    if "error" in r:
        return "FAILED"
    t = f"{_pct(r['honest_accuracy_mean'])} ({_pct(r['honest_accuracy_min'])})"
    if r["timed_out_node_rounds"]:
        t += f" T{r['timed_out_node_rounds']}"
    if r["fallback_aggregations"]:
        share = r["fallback_aggregations"] / max(r["node_rounds"], 1)
        t += f" *{100 * share:.0f}%"
    return t


def _grouping_cell(r: dict[str, Any]) -> str:
    if "error" in r or "secure" not in r:
        return "-"
    s = r["secure"]
    return f"{_pct(s['grouped_share'])} (min {_pct(s['grouped_share_min_node'])})"


def accuracy_table(results: list[dict[str, Any]], topo: str) -> str:
    return _table(results, topo, MODES, _accuracy_cell)


def grouping_table(results: list[dict[str, Any]], topo: str) -> str:
    return _table(results, topo, MODES[1:], _grouping_cell)


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "p2pfl"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty(p2pfl)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--only", default=",".join(TOPOLOGIES), help="comma-separated topologies (mesh, sparse)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    topos = chosen(parser, args.only, TOPOLOGIES, "topologies")
    todo = cells(topos, args.rounds)
    started = time.monotonic()
    results = run_grid(run_cell, todo, args.jobs, _progress)
    total = time.monotonic() - started
    results.sort(key=lambda r: todo.index(_key(r)))
    doc = {
        "commit": _git_commit(),
        "p2pfl_imported_from": str(Path(p2pfl.__file__).resolve().parent),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "platform": {
            "python": platform.python_version(),
            "system": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "jobs": args.jobs,
            "niceness": os.nice(0),
        },
        "rounds": args.rounds,
        "wall_seconds": round(total, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for topo in topos:
        print(
            f"\n### {topo}: honest nodes' final accuracy, mean (min), % "
            f"({args.rounds} rounds; T<n> = node-rounds that timed out, "
            "*N% = share of node-rounds whose rule had too few inputs for its f and used the "
            "median)\n"
        )
        print(accuracy_table(results, topo))
        print(f"\n### {topo}: share of node-rounds in a secure group, all nodes (min node), %\n")
        print(grouping_table(results, topo))
    print(f"\n{len(todo)} runs in {total:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
