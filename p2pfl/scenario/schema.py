"""Scenario files: a TOML description of a whole local federation, validated up front.

A scenario is read once, checked completely, and turned into per-node `NodeConfig`
values by `Scenario.node_config_values`, which both runners (real processes and
in-process) share, so the two modes can never drift apart. Every error is a
`ScenarioError` whose message starts with the dotted path of the offending key
(`topology.degree: must be < nodes (8)`), because the user fixes a file, not a stack.

The schema is meant to grow: table names that later versions will use are reserved
(`RESERVED_TABLES`); an empty one is accepted, a filled one is refused as "not
supported yet" instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.config import (
    ConfigError,
    NodeConfig,
)
from p2pfl.scenario import topology
from p2pfl.scenario.attack_spec import AttackSpec as AttackSpec
from p2pfl.scenario.attack_spec import parse_attacks
from p2pfl.scenario.faults import (
    FaultEvent,
    fault_plan_nodes,
    parse_faults,
    plan_path,
    slow_factors,
)
from p2pfl.scenario.participation_spec import ParticipationSpec, parse_participation
from p2pfl.scenario.sections import (
    AggregationSpec,
    CompressionSpec,
    DataSpec,
    ModelSpec,
    PrivacySpec,
    ProtocolSpec,
    RaySpec,
    SecureSpec,
    TopologySpec,
    TrainingSpec,
    parse_aggregation,
    parse_compression,
    parse_data,
    parse_model,
    parse_privacy,
    parse_protocol,
    parse_ray,
    parse_secure,
    parse_topology,
    parse_training,
)

# ScenarioError is re-exported: callers know it as part of the schema.
from p2pfl.scenario.table import ScenarioError as ScenarioError
from p2pfl.scenario.table import Table
from p2pfl.scenario.topology import Edge, TopologyError

MAX_NODES = 1000
RESERVED_TABLES: tuple[str, ...] = ()
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RunFailed(RuntimeError):
    """A scenario run could not finish (a node died, the deadline passed); says why."""

    @classmethod
    def overdue(
        cls, deadline_s: float, completed: Mapping[str, int], rounds: int, logs: str
    ) -> RunFailed:
        """The deadline passed: which nodes were still short of `rounds`, and where
        their logs are."""
        behind = ", ".join(f"{name}={c}" for name, c in completed.items() if c < rounds)
        return cls(
            f"timed out after {deadline_s:.0f} s with nodes still running "
            f"(rounds completed: {behind}); see {logs}"
        )


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: int
    rounds: int = 10
    seed: int = 0
    topology: TopologySpec = field(default_factory=TopologySpec)
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    protocol: ProtocolSpec = field(default_factory=ProtocolSpec)
    # "bootstrap": every node gets its neighbours' addresses as --peer flags.
    # "mdns": no --peer at all; nodes find each other with mDNS on 127.0.0.1 (real
    # processes only: the in-memory transport has no multicast, so it keeps bootstrap).
    discovery: str = "bootstrap"
    # [[attack]] (or one [attack] table): disjoint sets of malicious nodes.
    attacks: tuple[AttackSpec, ...] = ()
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    # [[faults]]: crashes/restarts (process runner) and network faults (plan files).
    faults: tuple[FaultEvent, ...] = ()
    secure: SecureSpec = field(default_factory=SecureSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    # Every node's checkpoint_every; None = by mode: 1 for real processes (crash and
    # restart faults resume from checkpoints), 0 (none) in-process, where no node can
    # crash alone and 1000 nodes' checkpoints cost more than their training.
    checkpoint_every: int | None = None
    ray: RaySpec = field(default_factory=RaySpec)
    # [[participation]]: nodes that train only under device conditions (--train-when).
    participation: tuple[ParticipationSpec, ...] = ()

    @property
    def attack(self) -> AttackSpec:
        """The scenario's one attack (an empty spec without any); with several
        `[[attack]]` tables there is no single one: use `attacks` or `attack_of`."""
        if len(self.attacks) > 1:
            raise ValueError(f"{len(self.attacks)} attacks in this scenario: use .attacks")
        return self.attacks[0] if self.attacks else AttackSpec()

    @property
    def attackers(self) -> tuple[int, ...]:
        """Every malicious node, sorted."""
        return tuple(sorted(i for a in self.attacks for i in a.nodes))

    def attack_of(self, index: int) -> AttackSpec | None:
        """The attack node `index` runs (None: an honest node)."""
        return next((a for a in self.attacks if index in a.nodes), None)

    def role(self, index: int) -> str:
        """ "malicious" for every attack's nodes (for the whole run, also before their
        start_round), else "honest"."""
        return "honest" if self.attack_of(index) is None else "malicious"

    def _robust_values(self, index: int, addresses: Sequence[str]) -> dict[str, Any]:
        """Aggregation and attack fields of one node (only those that differ from the
        defaults, so plain scenarios produce the same flags as before). Nodes are named
        to an attacker by listen address: known before any node has an identity, the
        same for processes and in-memory nodes."""
        agg = self.aggregation
        out: dict[str, Any] = {}
        if (agg.rule, agg.f, agg.options) != ("auto", 0, {}):
            out.update(aggregation=agg.rule, tolerate=agg.f, aggregation_options=dict(agg.options))
        attack = self.attack_of(index)
        if attack is not None:
            out.update(attack=attack.kind, attack_options=dict(attack.options))
            if attack.start_round:
                out["attack_start_round"] = attack.start_round
            if attack.honest_to:
                out["attack_honest_to"] = tuple(addresses[j] for j in attack.honest_to)
            colluders = tuple(addresses[j] for j in self.attackers if j != index)
            if colluders:
                out["attack_colluders"] = colluders
        return out

    def edges(self) -> list[Edge]:
        """The undirected edge list of this scenario's graph (deterministic from `seed`)."""
        t = self.topology
        try:
            return topology.edges(
                t.kind,
                self.nodes,
                degree=t.degree,
                edges=t.edges,
                cliques=t.cliques,
                seed=self.seed,
            )
        except TopologyError as exc:
            path = "nodes" if exc.field == "nodes" else f"topology.{exc.field}"
            raise ScenarioError(path, str(exc)) from None

    def node_config_values(
        self, addresses: Sequence[str], data_dirs: Sequence[Path]
    ) -> list[dict[str, Any]]:
        """NodeConfig field values for every node, given each node's address and data dir.

        Every node dials all its graph neighbours (both ends dial; the node keeps one
        connection per pair, so whichever side comes up last still connects). Full meshes
        keep peer exchange on; other graphs turn it off so the topology stays exactly
        what the file says.
        """
        if len(addresses) != self.nodes or len(data_dirs) != self.nodes:
            raise ValueError("need one address and one data dir per node")
        adj = topology.adjacency(self.nodes, self.edges())
        faulty = set(fault_plan_nodes(self.faults, self.nodes))
        slow = slow_factors(self.faults)
        when = {i: spec.when for spec in self.participation for i in spec.nodes}
        full = self.topology.kind == "full"
        mdns = self.discovery == "mdns" and not any(a.startswith("mem:") for a in addresses)
        in_process = any(a.startswith("mem:") for a in addresses)
        every = self.checkpoint_every
        return [
            {
                "data_dir": Path(data_dirs[i]),
                "checkpoint_every": (0 if in_process else 1) if every is None else every,
                "listen": addresses[i],
                "peers": () if mdns else tuple(addresses[j] for j in adj[i]),
                "peer_exchange": full,
                "mdns": mdns,
                **(_mdns_values(addresses) if mdns else {}),
                # Start round 1 only once the whole neighbourhood is connected, so early
                # rounds are not wasted on half a graph (and nobody times out waiting).
                "min_peers": (
                    len(adj[i]) if self.protocol.min_peers is None else self.protocol.min_peers
                ),
                "max_peers": max(64, self.nodes),
                "heartbeat_interval": self.protocol.heartbeat_interval,
                "heartbeat_timeout": self.protocol.heartbeat_timeout,
                "dataset": self.data.dataset,
                **({"label_column": self.data.label_column} if self.data.label_column else {}),
                **({"classes": self.data.classes} if self.data.classes is not None else {}),
                "nodes": self.nodes,
                "node_index": i,
                "partition": self.data.partition,
                "alpha": self.data.alpha,
                "clusters": self.data.clusters,
                "data_seed": self.seed,
                "model": self.model.name,
                "hidden": self.model.hidden,
                "model_seed": self.seed,
                "rounds": self.rounds,
                "epochs": self.training.epochs,
                "lr": self.training.lr,
                "batch_size": self.training.batch_size,
                "worker_momentum": self.training.worker_momentum,
                "prox_mu": self.training.prox_mu,
                "personalize": self.training.personalize,
                "personal_lambda": self.training.personal_lambda,
                "personal_test_fraction": self.training.personal_test_fraction,
                "personal_epochs": self.training.personal_epochs,
                "outer": self.training.outer,
                "outer_lr": self.training.outer_lr,
                "outer_beta1": self.training.outer_beta1,
                "outer_beta2": self.training.outer_beta2,
                "outer_tau": self.training.outer_tau,
                "neighbours": self.protocol.neighbours,
                "quorum": self.protocol.quorum,
                "round_timeout": self.protocol.round_timeout,
                "mode": self.protocol.mode,
                "staleness_exponent": self.protocol.staleness_exponent,
                "max_staleness": self.protocol.max_staleness,
                "min_inputs": self.protocol.min_inputs,
                "mix_grace": self.protocol.mix_grace,
                "seed": node_seed(self.seed, i),
                **self._robust_values(i, addresses),
                **(
                    {
                        "compression": self.compression.pipeline,
                        "compression_keyframe_every": self.compression.keyframe_every,
                        "compression_consensus": self.compression.consensus,
                        "compression_consensus_keep": self.compression.consensus_keep,
                    }
                    if self.compression.pipeline
                    else {}
                ),
                **(
                    {
                        "secure_aggregation": True,
                        "group_size": self.secure.group_size,
                        "secure_min_group": self.secure.min_group,
                        "secure_no_group": self.secure.no_group,
                        "secure_mates": self.secure.mates,
                    }
                    if self.secure.enabled
                    else {}
                ),
                **(
                    {
                        "dp_epsilon": self.privacy.epsilon,
                        "dp_delta": self.privacy.delta,
                        "dp_clip": self.privacy.clip,
                        "dp_noise": self.privacy.noise,
                    }
                    if self.privacy.enabled
                    else {}
                ),
                **(
                    {
                        "dp_sgd_clip": self.privacy.sgd_clip,
                        "dp_sgd_noise": self.privacy.sgd_noise,
                        "dp_delta": self.privacy.delta,
                    }
                    if self.privacy.sgd_clip > 0 or self.privacy.sgd_noise > 0
                    else {}
                ),
                **({"faults": plan_path(data_dirs[i])} if i in faulty else {}),
                **({"train_slowdown": slow[i]} if i in slow else {}),
                **({"train_when": when[i]} if i in when else {}),
            }
            for i in range(self.nodes)
        ]

    def deadline_seconds(self) -> float:
        """Generous bound on a whole run: every round may time out, plus start-up slack."""
        faults = len(self.faults) * (self.protocol.round_timeout + 30.0)  # restarts, heals
        return self.rounds * (self.protocol.round_timeout + 15.0) + 60.0 + self.nodes * 0.5 + faults

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["topology"]["edges"] = [list(e) for e in self.topology.edges]
        return d


def _mdns_values(addresses: Sequence[str]) -> dict[str, Any]:
    """mDNS on loopback only, in a federation of this run alone: two scenarios (or a
    user's own nodes) on the same host must never discover each other."""
    run = hashlib.sha256("|".join(addresses).encode()).hexdigest()[:16]
    return {"mdns_interfaces": ("127.0.0.1",), "federation": f"scenario-{run}"}


def node_seed(seed: int, index: int) -> int:
    """Independent per-node seed (shuffling, neighbour sampling) derived from the scenario's."""
    digest = hashlib.sha256(f"p2pfl-scenario:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def node_identity_seed(seed: int, index: int) -> bytes:
    """32-byte seed for in-process identities: reproducible, distinct per node and scenario."""
    return hashlib.sha256(f"p2pfl-scenario-identity:{seed}:{index}".encode()).digest()


def load_scenario(path: Path | str) -> Scenario:
    """Read and fully validate a scenario file; the name defaults to the file's stem."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ScenarioError("", f"scenario file {p} does not exist") from None
    except IsADirectoryError:
        raise ScenarioError("", f"{p} is a directory, not a scenario file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("", f"{p} is not valid TOML: {exc}") from None
    return parse_scenario(data, default_name=p.stem, base_dir=p.parent)


def parse_scenario(
    data: Mapping[str, Any], *, default_name: str = "scenario", base_dir: Path | None = None
) -> Scenario:
    """Validate a decoded TOML document into a Scenario (raises ScenarioError).

    Relative data files and `file.py:callable` specs are made absolute against
    `base_dir` (the scenario file's directory; default: the current directory), so
    every node finds them whatever its working directory."""
    base = Path.cwd() if base_dir is None else base_dir
    top = Table(data, "")
    name = top.get_str("name", default_name)
    if not _NAME_RE.match(name):
        raise ScenarioError(
            "name", "must be 1-64 letters, digits, '.', '_' or '-' (it names the output folder)"
        )
    nodes = top.get_int("nodes", None, minimum=2)
    if nodes > MAX_NODES:
        raise ScenarioError("nodes", f"must be <= {MAX_NODES}")
    rounds = top.get_int("rounds", 10, minimum=1)
    seed = top.get_int("seed", 0, minimum=0)
    topo = parse_topology(top.table("topology"), nodes)
    data_spec = parse_data(top.table("data"), base)
    model = parse_model(top.table("model"), base)
    training = parse_training(top.table("training"))
    protocol = parse_protocol(top.table("protocol"), nodes)
    discovery = top.get_str("discovery", "bootstrap", choices=("bootstrap", "mdns"))
    if discovery == "mdns" and topo.kind != "full":
        raise ScenarioError(
            "discovery",
            "'mdns' finds every node, so it needs topology.kind = 'full' (use 'bootstrap')",
        )
    attacks = parse_attacks(top.raw("attack"), nodes, seed, rounds)
    aggregation = parse_aggregation(top.table("aggregation"), sum(len(a.nodes) for a in attacks))
    compression = parse_compression(top.table("compression"))
    faults = parse_faults(top.raw("faults"), nodes, rounds)
    secure = parse_secure(top.table("secure_aggregation"))
    if top.has("dp") and top.has("privacy"):
        raise ScenarioError("dp", "[dp] is another name for [privacy]: give one of them")
    privacy = parse_privacy(top.table("dp" if top.has("dp") else "privacy"))
    checkpoint_every = (
        top.get_int("checkpoint_every", 0, minimum=0) if top.has("checkpoint_every") else None
    )
    ray = parse_ray(top.table("ray"))
    participation = parse_participation(top.raw("participation"), nodes)
    for reserved in RESERVED_TABLES:
        if top.raw(reserved) not in (None, {}, []):
            raise ScenarioError(reserved, "not supported yet (reserved for a later version)")
    top.finish()
    scenario = Scenario(
        name, nodes, rounds, seed, topo, data_spec, model, training, protocol, discovery,
        attacks, aggregation, compression, faults, secure, privacy, checkpoint_every, ray,
        participation,
    )  # fmt: skip
    edges = scenario.edges()  # builds and checks the graph (connected, k-regular, ...)
    _check_min_peers(scenario, edges)
    _cross_check(scenario)
    _check_files(scenario)
    return scenario


# Where each NodeConfig field comes from, to translate its errors back to the file.
_CONFIG_FIELD_PATHS = {
    "dataset": "data.dataset", "partition": "data.partition", "alpha": "data.alpha",
    "clusters": "data.clusters", "label_column": "data.label_column", "classes": "data.classes",
    "model": "model.name", "hidden": "model.hidden", "epochs": "training.epochs",
    "lr": "training.lr", "batch_size": "training.batch_size", "rounds": "rounds",
    "worker_momentum": "training.worker_momentum", "prox_mu": "training.prox_mu",
    "personalize": "training.personalize", "personal_lambda": "training.personal_lambda",
    "personal_test_fraction": "training.personal_test_fraction",
    "personal_epochs": "training.personal_epochs",
    "outer": "training.outer", "outer_lr": "training.outer_lr",
    "outer_beta1": "training.outer_beta1", "outer_beta2": "training.outer_beta2",
    "outer_tau": "training.outer_tau",
    "nodes": "nodes", "neighbours": "protocol.neighbours", "quorum": "protocol.quorum",
    "round_timeout": "protocol.round_timeout", "mode": "protocol.mode",
    "staleness_exponent": "protocol.staleness_exponent",
    "max_staleness": "protocol.max_staleness", "min_inputs": "protocol.min_inputs",
    "mix_grace": "protocol.mix_grace",
    "heartbeat_interval": "protocol.heartbeat_interval",
    "heartbeat_timeout": "protocol.heartbeat_timeout", "min_peers": "protocol.min_peers",
    "aggregation": "aggregation.rule", "tolerate": "aggregation.f",
    "aggregation_options": "aggregation", "attack": "attack.kind",
    "attack_options": "attack", "attack_start_round": "attack.start_round",
    "attack_honest_to": "attack.honest_to", "attack_colluders": "attack",
    "compression": "compression.pipeline", "compression_consensus": "compression.consensus",
    "compression_consensus_keep": "compression.consensus_keep",
    "dp_epsilon": "privacy.epsilon", "dp_delta": "privacy.delta", "dp_clip": "privacy.clip",
    "dp_noise": "privacy.noise", "dp_sgd_clip": "privacy.sgd_clip",
    "dp_sgd_noise": "privacy.sgd_noise", "secure_aggregation": "secure_aggregation.enabled",
}  # fmt: skip


def _check_min_peers(scenario: Scenario, edges: Sequence[Edge]) -> None:
    """`[protocol] min_peers` above a node's degree would keep that node before round 0
    for ever (only its neighbours dial it), so it is bounded by the smallest degree."""
    wanted = scenario.protocol.min_peers
    if wanted is None:
        return
    smallest = min(len(n) for n in topology.adjacency(scenario.nodes, list(edges)))
    if wanted > smallest:
        raise ScenarioError(
            "protocol.min_peers", f"must be in 0..{smallest} (the smallest node degree)"
        )


def _cross_check(scenario: Scenario) -> None:
    """Run the node's own validation too, so a scenario never starts nodes that refuse it."""
    addrs = [f"127.0.0.1:{10000 + i}" for i in range(scenario.nodes)]
    dirs = [Path(".")] * scenario.nodes
    all_values = scenario.node_config_values(addrs, dirs)
    # Node 0, and a node of each attack too (attack fields exist only there).
    checked = [all_values[0], *(all_values[a.nodes[0]] for a in scenario.attacks)]
    try:
        for values in checked:
            NodeConfig(**values).validated()
    except ConfigError as exc:
        path = _CONFIG_FIELD_PATHS.get(exc.field, exc.field)
        message = str(exc).split(": ", 1)[-1]
        raise ScenarioError(path, message) from None


def _check_files(scenario: Scenario) -> None:
    """Every node's data file and every plugin file exist, before any node starts (a
    node would otherwise fail alone, rounds later in a big run). Their contents are
    checked by each node when it loads them."""
    from p2pfl.learning.files import is_data_file
    from p2pfl.learning.plugins import is_import_spec

    specs = (("data.dataset", scenario.data.dataset), ("model.name", scenario.model.name))
    for path, spec in specs:
        if is_data_file(spec) and path == "data.dataset":
            for i in range(scenario.nodes):
                file = Path(spec.replace("{index}", str(i)))
                if not file.is_file():
                    raise ScenarioError(path, f"no such data file {file} (node {i})")
                if "{index}" not in spec:
                    break
        elif is_import_spec(spec) and spec.rpartition(":")[0].endswith(".py"):
            file = Path(spec.rpartition(":")[0])
            if not file.is_file():
                raise ScenarioError(path, f"no such file {file} (in {spec!r})")
