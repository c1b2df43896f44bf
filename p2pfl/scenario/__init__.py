"""Local multi-node scenarios: a TOML file -> N nodes (processes or in-process) -> report.

Only the light schema is imported here; the runners pull in trio, rich and the node
lazily, so `p2pfl scenario run --help` stays fast.
"""

from p2pfl.scenario.schema import (
    RunFailed,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
)

__all__ = ["RunFailed", "Scenario", "ScenarioError", "load_scenario", "parse_scenario"]
