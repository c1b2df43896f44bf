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
    MODES,
    OUTER_OPTIMIZERS,
    PARTITIONS,
    ConfigError,
    NodeConfig,
    default_dataset,
    default_model,
    relative_to,
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

# ScenarioError is re-exported: callers know it as part of the schema.
from p2pfl.scenario.table import ScenarioError as ScenarioError
from p2pfl.scenario.table import Table
from p2pfl.scenario.topology import Edge, TopologyError

MAX_NODES = 1000
RESERVED_TABLES: tuple[str, ...] = ()
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RunFailed(RuntimeError):
    """A scenario run could not finish (a node died, the deadline passed); says why."""


@dataclass(frozen=True)
class TopologySpec:
    kind: str = "full"
    degree: int | None = None
    edges: tuple[Edge, ...] = ()
    cliques: int | None = None


@dataclass(frozen=True)
class DataSpec:
    """A built-in set (cut into shards by `partition`), a data file per node (`{index}`
    in its path is the node's index) or `package.module:callable` / `file.py:callable`.
    Relative paths are resolved against the scenario file's directory when it is loaded."""

    dataset: str = field(default_factory=default_dataset)
    partition: str = "iid"
    alpha: float = 0.5
    clusters: int = 2
    label_column: str | None = None  # .csv files: the label column (default: the last)
    classes: int | None = None  # data files: the class count (default: largest label + 1)


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model or `package.module:callable` / `file.py:callable`."""

    name: str = field(default_factory=default_model)
    hidden: int = 32


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    worker_momentum: float = 0.0
    prox_mu: float = 0.0
    personalize: str = ""  # "ditto" | "head": a personal model per node (heterogeneity.md)
    personal_lambda: float = 0.1
    personal_test_fraction: float = 0.2
    personal_epochs: int = 0  # the personal model's local epochs per round; 0 = epochs
    outer: str = "fedavg"
    outer_lr: float = 0.0
    outer_beta1: float = 0.9
    outer_beta2: float = 0.99
    outer_tau: float = 1e-3


@dataclass(frozen=True)
class ProtocolSpec:
    # "all" or a positive integer k (as a string, like NodeConfig.neighbours).
    neighbours: str = "all"
    quorum: float = 1.0
    round_timeout: float = 30.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 6.0
    # Connected peers each node waits for before round 0; None = all its graph
    # neighbours (its degree), so round 0 does not train on half a mesh.
    min_peers: int | None = None
    # "sync" rounds, or "async" gossip without a barrier (docs/heterogeneity.md).
    mode: str = "sync"
    staleness_exponent: float = 0.5
    max_staleness: int = 20
    min_inputs: int = 1
    mix_grace: float = 0.5


@dataclass(frozen=True)
class AggregationSpec:
    """The rule every node aggregates with; `f` is the node's `tolerate`."""

    rule: str = "mean"
    f: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompressionSpec:
    """`[compression] pipeline = [...]`: every node compresses its updates this way
    (empty = plain float32 ModelUpdate); validated with p2pfl.compression's parser."""

    pipeline: tuple[str, ...] = ()
    keyframe_every: int = 10
    consensus: float = 0.0  # the consensus step's gamma (0 = off)
    consensus_keep: float = 1.0


@dataclass(frozen=True)
class SecureSpec:
    """`[secure_aggregation] enabled = true, group_size = 3, min_group = 3, no_group =
    "wait"`: each update is masked in one group per round; the aggregation rule runs
    across the group means (docs/secure-aggregation.md)."""

    enabled: bool = False
    group_size: int = 3
    min_group: int = 3
    no_group: str = "wait"
    mates: str = "auto"


@dataclass(frozen=True)
class PrivacySpec:
    """`[privacy] epsilon = 4, delta = 1e-5, clip = 1.0, noise = ...`: node-level DP on
    every node (docs/privacy.md); on when epsilon or noise is given, and checked by the
    node's own validation (`NodeConfig._check_privacy`)."""

    epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    noise: float | None = None
    sgd_clip: float = 0.0  # example-level DP-SGD (0 = off)
    sgd_noise: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None or self.noise is not None


@dataclass(frozen=True)
class RaySpec:
    """`[ray] num_cpus = 1, memory = "512MiB"`: what every node's Ray actor reserves
    (`p2pfl scenario run --ray`, docs/scenarios.md); ignored by the other runners, so
    one file runs unchanged everywhere. Ray schedules by these reservations only: a
    node still uses what it uses."""

    num_cpus: float = 1.0
    memory: int | None = None  # bytes; None = no memory reservation


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
        if (agg.rule, agg.f, agg.options) != ("mean", 0, {}):
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
    topo = _parse_topology(top.table("topology"), nodes)
    data_spec = _parse_data(top.table("data"), base)
    model = _parse_model(top.table("model"), base)
    training = _parse_training(top.table("training"))
    protocol = _parse_protocol(top.table("protocol"), nodes)
    discovery = top.get_str("discovery", "bootstrap", choices=("bootstrap", "mdns"))
    if discovery == "mdns" and topo.kind != "full":
        raise ScenarioError(
            "discovery",
            "'mdns' finds every node, so it needs topology.kind = 'full' (use 'bootstrap')",
        )
    attacks = parse_attacks(top.raw("attack"), nodes, seed, rounds)
    aggregation = _parse_aggregation(top.table("aggregation"), sum(len(a.nodes) for a in attacks))
    compression = _parse_compression(top.table("compression"))
    faults = parse_faults(top.raw("faults"), nodes, rounds)
    secure = _parse_secure(top.table("secure_aggregation"))
    if top.has("dp") and top.has("privacy"):
        raise ScenarioError("dp", "[dp] is another name for [privacy]: give one of them")
    privacy = _parse_privacy(top.table("dp" if top.has("dp") else "privacy"))
    checkpoint_every = (
        top.get_int("checkpoint_every", 0, minimum=0) if top.has("checkpoint_every") else None
    )
    ray = _parse_ray(top.table("ray"))
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


def _parse_topology(t: Table, nodes: int) -> TopologySpec:
    kind = t.get_str("kind", "full", choices=topology.KINDS)
    degree: int | None = None
    if t.has("degree"):
        if kind != "kregular":
            raise ScenarioError("topology.degree", "only used with kind = 'kregular'")
        degree = t.get_int("degree", None, minimum=1)
        if degree >= nodes:
            raise ScenarioError("topology.degree", f"must be < nodes ({nodes})")
    elif kind == "kregular":
        raise ScenarioError("topology.degree", "is required for kind = 'kregular'")
    pairs: tuple[Edge, ...] = ()
    if t.has("edges"):
        if kind != "edges":
            raise ScenarioError("topology.edges", "only used with kind = 'edges'")
        pairs = _edge_list(t.raw("edges"))
    elif kind == "edges":
        raise ScenarioError("topology.edges", "is required for kind = 'edges' (a list of [i, j])")
    cliques: int | None = None
    if t.has("cliques"):
        if kind != "cliques":
            raise ScenarioError("topology.cliques", "only used with kind = 'cliques'")
        cliques = t.get_int("cliques", None, minimum=1)
        if cliques > nodes:
            raise ScenarioError("topology.cliques", f"must be <= nodes ({nodes})")
    elif kind == "cliques":
        raise ScenarioError("topology.cliques", "is required for kind = 'cliques'")
    t.finish()
    return TopologySpec(kind, degree, pairs, cliques)


def _edge_list(value: Any) -> tuple[Edge, ...]:
    if not isinstance(value, list):
        raise ScenarioError("topology.edges", f"expected a list of [i, j] pairs, got {value!r}")
    out: list[Edge] = []
    for pos, pair in enumerate(value):
        ok = (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        )
        if not ok:
            raise ScenarioError(f"topology.edges[{pos}]", f"expected [i, j] integers, got {pair!r}")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _parse_data(t: Table, base: Path) -> DataSpec:
    label_column = t.get_str("label_column", "") or None
    classes = t.get_int("classes", 0, minimum=2) if t.has("classes") else None
    spec = DataSpec(
        dataset=_plugin_spec(t, "dataset", base),
        partition=t.get_str("partition", "iid", choices=PARTITIONS),
        alpha=t.get_float("alpha", 0.5, positive=True),
        clusters=t.get_int("clusters", 2, minimum=1),
        label_column=label_column,
        classes=classes,
    )
    t.finish()
    return spec


def _parse_model(t: Table, base: Path) -> ModelSpec:
    spec = ModelSpec(
        name=_plugin_spec(t, "name", base),
        hidden=t.get_int("hidden", 32, minimum=1),
    )
    t.finish()
    return spec


def _plugin_spec(t: Table, key: str, base: Path) -> str:
    """A model or data set string, checked by its form against the registry
    (p2pfl.learning); a relative file in it is made absolute against `base`."""
    from p2pfl.learning import DATASET_NAMES, MODEL_NAMES
    from p2pfl.learning.plugins import PluginError, kind_of

    data = key == "dataset"
    value = t.get_str(key, default_dataset() if data else default_model())
    names = DATASET_NAMES if data else MODEL_NAMES
    try:
        kind_of(value, names)
    except PluginError:
        files = ", a .npz or .csv file" if data else ""
        raise ScenarioError(
            t._key(key),
            f"unknown value {value!r}; use a built-in ({', '.join(names)}){files}, "
            "'package.module:callable' or 'path/to/file.py:callable'",
        ) from None
    return relative_to(value, base)


def _parse_training(t: Table) -> TrainingSpec:
    spec = TrainingSpec(
        epochs=t.get_int("epochs", 1, minimum=1),
        lr=t.get_float("lr", 0.05, positive=True),
        batch_size=t.get_int("batch_size", 32, minimum=1),
        worker_momentum=t.get_float("worker_momentum", 0.0),
        prox_mu=t.get_float("prox_mu", 0.0),
        personalize=t.get_str("personalize", "", choices=("", "ditto", "head")),
        personal_lambda=t.get_float("personal_lambda", 0.1),
        personal_test_fraction=t.get_float("personal_test_fraction", 0.2),
        personal_epochs=t.get_int("personal_epochs", 0, minimum=0),
        outer=t.get_str("outer", "fedavg", choices=OUTER_OPTIMIZERS),
        outer_lr=t.get_float("outer_lr", 0.0),
        outer_beta1=t.get_float("outer_beta1", 0.9),
        outer_beta2=t.get_float("outer_beta2", 0.99),
        outer_tau=t.get_float("outer_tau", 1e-3, positive=True),
    )
    t.finish()
    return spec


def _parse_protocol(t: Table, nodes: int) -> ProtocolSpec:
    neighbours = "all"
    if t.has("neighbours"):
        raw = t.raw("neighbours")
        if raw != "all":
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ScenarioError(
                    "protocol.neighbours", f'expected "all" or an integer, got {raw!r}'
                )
            if not 1 <= raw < nodes:
                raise ScenarioError("protocol.neighbours", f'must be in 1..{nodes - 1} or "all"')
            neighbours = str(raw)
    quorum = t.get_float("quorum", 1.0, positive=True)
    if quorum > 1.0:
        raise ScenarioError("protocol.quorum", "must be a fraction in (0, 1]")
    spec = ProtocolSpec(
        neighbours=neighbours,
        quorum=quorum,
        round_timeout=t.get_float("round_timeout", 30.0, positive=True),
        heartbeat_interval=t.get_float("heartbeat_interval", 1.0, positive=True),
        heartbeat_timeout=t.get_float("heartbeat_timeout", 6.0, positive=True),
        min_peers=t.get_int("min_peers", 0, minimum=0) if t.has("min_peers") else None,
        mode=t.get_str("mode", "sync", choices=MODES),
        staleness_exponent=t.get_float("staleness_exponent", 0.5),
        max_staleness=t.get_int("max_staleness", 20, minimum=0),
        min_inputs=t.get_int("min_inputs", 1, minimum=0),
        mix_grace=t.get_float("mix_grace", 0.5),
    )
    if spec.staleness_exponent < 0:
        raise ScenarioError("protocol.staleness_exponent", "must be >= 0 (0 = no discount)")
    if spec.mix_grace < 0:
        raise ScenarioError("protocol.mix_grace", "must be >= 0 (a fraction of training time)")
    if spec.heartbeat_timeout <= spec.heartbeat_interval:
        raise ScenarioError("protocol.heartbeat_timeout", "must be larger than heartbeat_interval")
    t.finish()
    return spec


def _parse_aggregation(t: Table, attackers: int) -> AggregationSpec:
    """`[aggregation] rule = "...", f = 2, <rule options>`; f defaults to the number of
    attackers declared in [attack] (0 without one)."""
    from p2pfl.aggregation import RULE_NAMES, make_rule

    rule = t.get_str("rule", "mean", choices=RULE_NAMES)
    f = t.get_int("f", attackers, minimum=0)
    options = {k: t.raw(k) for k in t.present() if k not in ("rule", "f")}
    for key, value in options.items():
        try:
            make_rule(rule, f=f, options={key: value})
        except ValueError as exc:
            raise ScenarioError(f"aggregation.{key}", str(exc)) from None
    t.finish()
    return AggregationSpec(rule, f, options)


def _parse_secure(t: Table) -> SecureSpec:
    enabled = t.raw("enabled")
    if enabled is None:
        enabled = False
    if not isinstance(enabled, bool):
        raise ScenarioError(
            "secure_aggregation.enabled", f"expected true or false, got {enabled!r}"
        )
    group_size = t.get_int("group_size", 3, minimum=3)
    min_group = t.get_int("min_group", 3, minimum=3)
    if min_group > group_size:
        raise ScenarioError(
            "secure_aggregation.min_group", f"must be <= group_size ({group_size}), got {min_group}"
        )
    no_group = t.get_str("no_group", "wait", choices=("wait", "skip", "plain"))
    mates = t.get_str("mates", "auto", choices=("auto", "neighbours", "members"))
    t.finish()
    return SecureSpec(enabled, group_size, min_group, no_group, mates)


def _parse_privacy(t: Table) -> PrivacySpec:
    """`[privacy]`: the node fields dp_epsilon, dp_delta, dp_clip, dp_noise (their
    combinations are checked by the node's validation, through `_cross_check`)."""
    epsilon = t.get_float("epsilon", 0.0) if t.has("epsilon") else None
    noise = t.get_float("noise", 0.0) if t.has("noise") else None
    spec = PrivacySpec(
        epsilon,
        t.get_float("delta", 1e-5),
        t.get_float("clip", 1.0),
        noise,
        t.get_float("sgd_clip", 0.0),
        t.get_float("sgd_noise", 0.0),
    )
    t.finish()
    return spec


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def _parse_ray(t: Table) -> RaySpec:
    """`[ray] num_cpus` (> 0, fractions allowed: Ray packs that many nodes per core)
    and `memory` (bytes, or a string such as "512MiB" or "1.5GB")."""
    num_cpus = t.get_float("num_cpus", 1.0, positive=True)
    raw = t.raw("memory")
    memory: int | None = None
    if raw is not None:
        if isinstance(raw, int) and not isinstance(raw, bool):
            memory = raw
        elif isinstance(raw, str) and (m := _SIZE_RE.match(raw)):
            memory = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").lower()])
        else:
            raise ScenarioError(
                "ray.memory", f'expected bytes or a size such as "512MiB", got {raw!r}'
            )
        if memory <= 0:
            raise ScenarioError("ray.memory", "must be > 0")
    t.finish()
    return RaySpec(num_cpus, memory)


def _parse_compression(t: Table) -> CompressionSpec:
    """`[compression] pipeline = ["delta", "topk:0.01", "quantize:8", "zstd:3"]`."""
    from p2pfl.compression import parse_pipeline

    raw = t.raw("pipeline")
    keyframe_every = t.get_int("keyframe_every", 10, minimum=0)
    consensus = t.get_float("consensus", 0.0)
    keep = t.get_float("consensus_keep", 1.0)
    t.finish()
    if raw is None:
        if consensus:
            raise ScenarioError("compression.consensus", "needs a compression pipeline")
        return CompressionSpec()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ScenarioError(
            "compression.pipeline", f"expected a list of stage strings, got {raw!r}"
        )
    try:
        parse_pipeline(raw)
    except ValueError as exc:
        raise ScenarioError("compression.pipeline", str(exc)) from None
    return CompressionSpec(tuple(raw), keyframe_every, consensus, keep)


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
