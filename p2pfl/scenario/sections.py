"""The tables of a scenario file, each parsed into its spec: `[topology]`, `[data]`,
`[model]`, `[training]`, `[protocol]`, `[aggregation]`, `[compression]`,
`[secure_aggregation]`, `[privacy]` and `[ray]`.

Split from `schema.py`, which puts the specs together into a `Scenario` and turns it
into each node's configuration: one table's rules are read here, whole; how the
tables must agree with each other stays in `schema.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.config import (
    MODES,
    OUTER_OPTIMIZERS,
    PARTITIONS,
    default_dataset,
    default_model,
    relative_to,
)
from p2pfl.scenario import topology
from p2pfl.scenario.table import ScenarioError, Table
from p2pfl.scenario.topology import Edge


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
    """The rule every node aggregates with; `f` is the node's `tolerate` ("auto": the
    mean with f = 0, the recommended robust rule otherwise)."""

    rule: str = "auto"
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
    """`[ray] num_cpus = 1, memory = "512MiB"`: what every node's Ray actor reserves,
    and where its node may listen and whether its data dir is kept
    (`p2pfl scenario run --ray`, docs/scenarios.md); ignored by the other runners, so
    one file runs unchanged everywhere. Ray schedules by these reservations only: a
    node still uses what it uses."""

    num_cpus: float = 1.0
    memory: int | None = None  # bytes; None = no memory reservation
    # `ports = "7000-7099"`: the nodes listen only on these (inclusive), so a firewall
    # between the machines opens this range instead of the whole ephemeral one.
    # None = any free port (the kernel's ephemeral range).
    ports: tuple[int, int] | None = None
    # `keep_remote = true`: never delete the data dirs of nodes on other machines (by
    # default they are removed after a successful run, once their files are copied).
    keep_remote: bool = False


def parse_topology(t: Table, nodes: int) -> TopologySpec:
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


def parse_data(t: Table, base: Path) -> DataSpec:
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


def parse_model(t: Table, base: Path) -> ModelSpec:
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


def parse_training(t: Table) -> TrainingSpec:
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


def parse_protocol(t: Table, nodes: int) -> ProtocolSpec:
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


def parse_aggregation(t: Table, attackers: int) -> AggregationSpec:
    """`[aggregation] rule = "...", f = 2, <rule options>`; f defaults to the number of
    attackers declared in [attack] (0 without one)."""
    from p2pfl.aggregation import RULE_CHOICES, make_rule

    rule = t.get_str("rule", "auto", choices=RULE_CHOICES)
    f = t.get_int("f", attackers, minimum=0)
    options = {k: t.raw(k) for k in t.present() if k not in ("rule", "f")}
    for key, value in options.items():
        try:
            make_rule(rule, f=f, options={key: value})
        except ValueError as exc:
            raise ScenarioError(f"aggregation.{key}", str(exc)) from None
    t.finish()
    return AggregationSpec(rule, f, options)


def parse_secure(t: Table) -> SecureSpec:
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


def parse_privacy(t: Table) -> PrivacySpec:
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


def parse_ray(t: Table) -> RaySpec:
    """`[ray] num_cpus` (> 0, fractions allowed: Ray packs that many nodes per core),
    `memory` (bytes, or a string such as "512MiB" or "1.5GB"), `ports` (a range such as
    "7000-7099", see `parse_port_range`) and `keep_remote` (a bool)."""
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
    ports = parse_port_range(t.raw("ports"))
    keep_remote = t.raw("keep_remote")
    if keep_remote is None:
        keep_remote = False
    elif not isinstance(keep_remote, bool):
        raise ScenarioError("ray.keep_remote", f"expected true or false, got {keep_remote!r}")
    t.finish()
    return RaySpec(num_cpus, memory, ports, keep_remote)


_PORT_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
PORT_MIN, PORT_MAX = 1024, 65535  # no privileged ports: the nodes do not run as root


def parse_port_range(raw: Any) -> tuple[int, int] | None:
    """`[ray] ports = "7000-7099"` (inclusive) into (7000, 7099); None when absent.

    Whether the range is wide enough cannot be known here (how many nodes land on one
    machine is Ray's choice at run time): the runner says so, naming the machine, when
    one of them finds too few free ports in it."""
    if raw is None:
        return None
    m = _PORT_RANGE_RE.match(raw) if isinstance(raw, str) else None
    if m is None:
        raise ScenarioError("ray.ports", f'expected a range such as "7000-7099", got {raw!r}')
    low, high = int(m.group(1)), int(m.group(2))
    if low > high:
        raise ScenarioError("ray.ports", f"the range {low}-{high} is empty (low > high)")
    if low < PORT_MIN or high > PORT_MAX:
        raise ScenarioError(
            "ray.ports", f"the range {low}-{high} must lie within {PORT_MIN}-{PORT_MAX}"
        )
    return low, high


def parse_compression(t: Table) -> CompressionSpec:
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
