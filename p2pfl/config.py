"""Node configuration: one dataclass, loaded from TOML and/or command-line flags.

Every field has a default, so `p2pfl node` runs with no configuration at all. Values
are validated in one place (`NodeConfig.validated`) and every error names the field,
so a typo in a config file is reported as `config field 'round_timeout': ...`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.logs import LOG_FORMATS

DEFAULT_PORT = 7470
DEFAULT_DATA_DIR = Path("~/.p2pfl")
MODES = ("sync", "async")  # the round protocol (NodeConfig.mode)


class ConfigError(ValueError):
    """A configuration value is wrong; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"config field '{field_name}': {message}")
        self.field = field_name


PARTITIONS = ("iid", "dirichlet", "clusters")
"""How a training set can be split across nodes (`p2pfl.learning.partition`)."""

OUTER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""What a node does with its round's aggregate (`p2pfl.learning.outer`); fedavg adopts it."""


def default_dataset() -> str:
    """The registry's first data set (`p2pfl.learning.DATASET_NAMES`), read lazily: the
    registry imports numpy, and this module stays stdlib-only for a fast CLI."""
    from p2pfl.learning import DATASET_NAMES

    return DATASET_NAMES[0]


def default_model() -> str:
    """The registry's first model (`p2pfl.learning.MODEL_NAMES`), read lazily."""
    from p2pfl.learning import MODEL_NAMES

    return MODEL_NAMES[0]


@dataclass(frozen=True)
class NodeConfig:
    # Where identity, checkpoints, metrics and the control socket live.
    data_dir: Path = DEFAULT_DATA_DIR
    # Write a checkpoint after every k-th round (and after the last); 0 = never. A crash
    # loses at most k-1 rounds, which the node catches up from its peers on restart;
    # in-process scenarios, which cannot crash a node alone, default to 0.
    checkpoint_every: int = 1
    # Network.
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    peers: tuple[str, ...] = ()
    federation: str = "default"
    # Explicit admission: empty = any peer that proves its id (within the federation);
    # otherwise only these peer ids. A federation secret file makes the TLS CA private.
    allow: tuple[str, ...] = ()
    secret_file: Path | None = None
    min_peers: int = 1
    peer_exchange: bool = True
    max_peers: int = 64
    # Resource bounds (docs/security.md): "auto" sizes the frame limit to the model
    # (twice the dense update plus headers), the receive budget to two frames (>= 16
    # MiB) and the inbound cap to 2 x max_peers; an integer overrides.
    max_frame_size: int | str = "auto"
    receive_budget: int | str = "auto"  # bytes of partial frames across all links
    max_inbound: int | str = "auto"  # accepted connections open at once
    handshake_timeout: float = 10.0  # seconds from TCP accept to an admitted peer
    frame_timeout: float = 10.0  # floor of a frame's deadline once its header arrived
    frame_min_rate: int = 64 * 1024  # bytes/s a frame must keep up beyond that floor
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 6.0
    # Discovery: mDNS on these IPv4 interface addresses (default: the listen address,
    # or every IPv4 interface when listening on 0.0.0.0).
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    # Data and model: a built-in name, a .npz/.csv file (`{index}` = node_index),
    # `package.module:callable` or `path/to/file.py:callable` (p2pfl.learning.plugins).
    dataset: str = field(default_factory=default_dataset)
    label_column: str | None = None  # .csv data: the label column (default: the last)
    classes: int | None = None  # data files: the federation's class count (default: max label + 1)
    nodes: int = 1
    node_index: int = 0
    partition: str = "iid"
    alpha: float = 0.5
    clusters: int = 2  # partition = "clusters": node blocks x class blocks
    data_seed: int = 0
    model: str = field(default_factory=default_model)
    hidden: int = 32
    model_seed: int = 0
    # Rounds.
    rounds: int = 10
    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    # Worker momentum (Karimireddy et al. 2021): the round's update that leaves the node
    # is an exponential average of its recent updates, beta in [0, 1); 0 = off.
    worker_momentum: float = 0.0
    # Personalization (docs/heterogeneity.md): "ditto" keeps a personal model beside the
    # shared one, pulled towards it with personal_lambda, evaluated on a split of this
    # node's shard (personal_test_fraction) held out from training; "" = off.
    # Device-aware participation (node/participation.py): conditions under which this
    # node trains (ac_power, cpu_below:P, hours:H1-H2); () = always.
    train_when: tuple[str, ...] = ()
    personalize: str = ""
    personal_lambda: float = 0.1
    personal_test_fraction: float = 0.2
    personal_epochs: int = 0  # local epochs of the personal model per round; 0 = epochs
    # FedProx (Li et al. 2020): local training adds mu/2 ||w - w_start||^2; 0 = off.
    prox_mu: float = 0.0
    # The outer optimizer applied to (aggregate - model before the round) (Reddi et al.
    # 2021; learning/outer.py): fedavg adopts the aggregate. outer_lr 0 = its default.
    outer: str = "fedavg"
    outer_lr: float = 0.0
    outer_beta1: float = 0.9  # fedavgm: the server momentum; adaptive: the first moment
    outer_beta2: float = 0.99
    outer_tau: float = 1e-3
    neighbours: str = "all"
    # "sync": rounds with a quorum; "async": no barrier, each step mixes what arrived,
    # weighted by staleness (docs/heterogeneity.md, p2pfl/protocol/gossip.py).
    mode: str = "sync"
    staleness_exponent: float = 0.5  # async: inputs weigh (1 + staleness) ** -a
    max_staleness: int = 20  # async: inputs lagging more versions are not mixed
    # async: neighbours' models a step waits for (FedBuff's K), round_timeout at most.
    min_inputs: int = 1
    # async: once min_inputs are in, wait this fraction of our own training time more
    # for the other neighbours (as fast as we are: they make it; stragglers do not).
    mix_grace: float = 0.5
    quorum: float = 1.0
    round_timeout: float = 30.0
    aggregation: str = "mean"
    tolerate: int = 0  # Byzantine neighbours the rule must tolerate (the "f" of the rules)
    aggregation_options: Mapping[str, Any] = field(default_factory=dict)
    # Compression pipeline for sent updates, e.g. ("delta", "topk:0.01", "quantize:8").
    compression: tuple[str, ...] = ()
    compression_keyframe_every: int = 10  # rounds between full (non-delta) updates
    # The consensus step (CHOCO-SGD) on compressed gossip: gamma in (0, 1], 0 = off;
    # keep = how much of its unsent progress x - x_hat a node keeps (docs/compression.md).
    compression_consensus: float = 0.0
    compression_consensus_keep: float = 1.0
    # Secure aggregation (pairwise masks inside groups of neighbours).
    secure_aggregation: bool = False
    group_size: int = 3  # measured: more, smaller groups resist attackers better
    secure_min_group: int = 3  # the smallest group this node masks in (its privacy floor)
    secure_no_group: str = "wait"  # without a group: "wait", "skip" or "plain"
    # Group mates: "neighbours" (authenticated over our own links), "members" (also
    # non-neighbours with a membership proof, relayed by the leader), "auto" (members
    # with a federation secret or an allow list, where a proof means something).
    secure_mates: str = "auto"
    # Node-level differential privacy (docs/privacy.md): each round's update is clipped
    # to L2 norm dp_clip and noised with N(0, (dp_noise * dp_clip)^2). dp_epsilon is the
    # budget (at dp_delta) after which the node stops contributing updates; dp_noise the
    # noise multiplier, derived from dp_epsilon and `rounds` when left out. Privacy is on
    # when either is set (None = not set). With secure aggregation it is distributed:
    # each member adds 1/secure_min_group of the noise variance (docs/privacy.md).
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_noise: float | None = None
    # Example-level DP-SGD (docs/privacy.md): per-example clip norm (0 = off) and noise
    # multiplier of every minibatch gradient; reported at dp_delta, no budget.
    dp_sgd_clip: float = 0.0
    dp_sgd_noise: float = 0.0
    # Scenario studies only: a malicious node runs a real node with this attack.
    attack: str = ""
    attack_options: Mapping[str, Any] = field(default_factory=dict)
    attack_start_round: int = 0  # honest before this round, malicious from it on
    # Peers (ids or listen addresses) that get our honest model; the others the attack's.
    attack_honest_to: tuple[str, ...] = ()
    # Fellow attackers (ids or listen addresses): left out of what the attack overhears.
    attack_colluders: tuple[str, ...] = ()
    seed: int = 0
    # Fault injection (studies and tests): a plan file applied to this node's own links.
    faults: Path | None = None
    # Straggler studies (scenario fault "slow"): local training takes this many times
    # as long; the node waits out the extra time while still serving peers. 1 = off.
    train_slowdown: float = 1.0
    # Operation.
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (docs/operations.md)
    # Prometheus endpoint "HOST:PORT" (a bare port is loopback); "" = off. Needs the
    # metrics extra (docs/operations.md).
    metrics_listen: str = ""

    @property
    def privacy(self) -> bool:
        """Node-level differential privacy is on (a budget or a noise multiplier is set)."""
        return self.dp_epsilon is not None or self.dp_noise is not None

    @property
    def neighbour_count(self) -> int | None:
        """None means "all connected peers"; otherwise k random neighbours per round."""
        return None if self.neighbours == "all" else int(self.neighbours)

    def validated(self) -> NodeConfig:
        """Return self after checking every field; raise ConfigError naming the bad one."""
        _check(
            self.federation != "" and len(self.federation) <= 64,
            "federation",
            "must be a non-empty name of at most 64 characters",
        )
        _check_address(self.listen, "listen")
        for p in self.peers:
            _check_address(p, "peers")
        _check(self.max_peers >= 1, "max_peers", "must be >= 1")
        _check(
            0 <= self.min_peers <= self.max_peers, "min_peers", "must be between 0 and max_peers"
        )
        for peer_id in self.allow:
            _check(
                peer_id.isalnum() and len(peer_id) <= 128,
                "allow",
                f"{peer_id!r} is not a peer id (see `p2pfl keys show`)",
            )
        _check(
            self.max_frame_size == "auto"
            or (type(self.max_frame_size) is int and 1024 <= self.max_frame_size <= 2**32 - 1),
            "max_frame_size",
            "must be 'auto' or between 1024 and 4294967295 bytes",
        )
        _check(
            self.receive_budget == "auto"
            or (type(self.receive_budget) is int and self.receive_budget >= 1024),
            "receive_budget",
            "must be 'auto' or at least 1024 bytes",
        )
        _check(
            not (type(self.max_frame_size) is int and type(self.receive_budget) is int)
            or self.receive_budget >= self.max_frame_size,
            "receive_budget",
            "must be at least max_frame_size (a frame has to fit)",
        )
        _check(
            self.max_inbound == "auto" or (type(self.max_inbound) is int and self.max_inbound >= 1),
            "max_inbound",
            "must be 'auto' (2 x max_peers) or >= 1",
        )
        _check(self.handshake_timeout > 0, "handshake_timeout", "must be > 0 seconds")
        _check(self.frame_timeout > 0, "frame_timeout", "must be > 0 seconds")
        _check(self.frame_min_rate >= 1, "frame_min_rate", "must be >= 1 byte per second")
        _check(self.heartbeat_interval > 0, "heartbeat_interval", "must be > 0 seconds")
        _check(
            self.heartbeat_timeout > self.heartbeat_interval,
            "heartbeat_timeout",
            "must be larger than heartbeat_interval",
        )
        data_kind = _plugin_kind(self.dataset, "dataset")
        _check(
            self.label_column is None
            or (
                self.label_column != ""
                and (data_kind == "import" or self.dataset.lower().endswith(".csv"))
            ),
            "label_column",
            "applies to a .csv data file only (and must name a column)",
        )
        _check(
            self.classes is None or (self.classes >= 2 and data_kind != "builtin"),
            "classes",
            "must be >= 2, for a data file or a plugin (a built-in data set knows its classes)",
        )
        _check(self.nodes >= 1, "nodes", "must be >= 1")
        _check(
            0 <= self.node_index < self.nodes,
            "node_index",
            f"must be in 0..{self.nodes - 1} (nodes = {self.nodes})",
        )
        _check(
            self.partition in PARTITIONS,
            "partition",
            f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}",
        )
        _check(self.alpha > 0, "alpha", "must be > 0")
        _check(self.clusters >= 1, "clusters", "must be >= 1")
        _check(
            self.partition != "clusters" or self.clusters <= self.nodes,
            "clusters",
            f"must be in 1..{self.nodes} (nodes = {self.nodes}) for partition 'clusters'",
        )
        _plugin_kind(self.model, "model")
        _check(self.hidden >= 1, "hidden", "must be >= 1")
        _check(self.rounds >= 0, "rounds", "must be >= 0 (0 runs forever)")
        _check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = never)")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(0.0 <= self.worker_momentum < 1.0, "worker_momentum", "must be in [0, 1)")
        _check(
            self.personalize in ("", "ditto", "head"),
            "personalize",
            "must be 'ditto', 'head' or '' (off)",
        )
        if self.train_when:
            from p2pfl.node.participation import parse_conditions

            try:
                parse_conditions(self.train_when)
            except ValueError as exc:
                raise ConfigError("train_when", str(exc)) from None
        _check(
            0.0 <= self.personal_lambda < math.inf,
            "personal_lambda",
            "must be a finite number >= 0",
        )
        _check(
            0.0 < self.personal_test_fraction < 1.0,
            "personal_test_fraction",
            "must be in (0, 1)",
        )
        _check(self.personal_epochs >= 0, "personal_epochs", "must be >= 0 (0 = epochs)")
        _check(
            self.personal_lambda * self.lr < 2.0,
            "personal_lambda",
            f"x lr must be < 2 (here {self.personal_lambda * self.lr:g}): a larger pull "
            "overshoots the shared model at every step and the personal model diverges",
        )
        _check(0.0 <= self.prox_mu < math.inf, "prox_mu", "must be a finite number >= 0")
        _check(
            self.outer in OUTER_OPTIMIZERS,
            "outer",
            f"unknown outer optimizer {self.outer!r}; choose one of {', '.join(OUTER_OPTIMIZERS)}",
        )
        _check(0.0 <= self.outer_lr < math.inf, "outer_lr", "must be > 0 (or 0 for the default)")
        _check(0.0 <= self.outer_beta1 < 1.0, "outer_beta1", "must be in [0, 1)")
        _check(0.0 <= self.outer_beta2 < 1.0, "outer_beta2", "must be in [0, 1)")
        _check(0.0 < self.outer_tau < math.inf, "outer_tau", "must be a finite number > 0")
        _check(
            self.neighbours == "all" or (self.neighbours.isdigit() and int(self.neighbours) >= 1),
            "neighbours",
            f"must be 'all' or a positive integer, got {self.neighbours!r}",
        )
        _check(
            0.0 < self.quorum <= 1.0,
            "quorum",
            "must be a fraction in (0, 1] of the expected neighbours",
        )
        _check(self.round_timeout > 0, "round_timeout", "must be > 0 seconds")
        self._check_mode()
        # The rule name and its options are checked by the aggregation registry when the
        # node starts (that module needs numpy; this one stays stdlib-only for the CLI).
        _check(self.aggregation != "", "aggregation", "must name a rule")
        _check(self.tolerate >= 0, "tolerate", "must be >= 0")
        self._check_attack()
        self._check_privacy()
        _check(self.group_size >= 3, "group_size", "must be >= 3")
        _check(
            3 <= self.secure_min_group <= self.group_size,
            "secure_min_group",
            f"must be in 3..group_size ({self.group_size})",
        )
        _check(
            self.secure_no_group in ("wait", "skip", "plain"),
            "secure_no_group",
            f"must be wait, skip or plain, got {self.secure_no_group!r}",
        )
        _check(
            self.secure_mates in ("auto", "neighbours", "members"),
            "secure_mates",
            f"must be auto, neighbours or members, got {self.secure_mates!r}",
        )
        _check(
            not (self.secure_aggregation and self.compression),
            "compression",
            "cannot be combined with secure_aggregation yet (group means are forwarded "
            "dense so that copies from several mates compare equal); drop one of them",
        )
        _check(
            self.compression_keyframe_every >= 0,
            "compression_keyframe_every",
            "must be >= 0 (0 = only when a peer needs one)",
        )
        _check(
            math.isfinite(self.compression_consensus) and 0 <= self.compression_consensus <= 1,
            "compression_consensus",
            f"must be in (0, 1] (the step size gamma) or 0 (off), got {self.compression_consensus}",
        )
        _check(
            math.isfinite(self.compression_consensus_keep)
            and 0 <= self.compression_consensus_keep <= 1,
            "compression_consensus_keep",
            f"must be in [0, 1], got {self.compression_consensus_keep}",
        )
        _check(
            not self.compression_consensus or bool(self.compression),
            "compression_consensus",
            "needs a compression pipeline (without one every copy is exact: nothing to do)",
        )
        _check(
            not self.compression_consensus or self.neighbour_count is None,
            "compression_consensus",
            "needs neighbours = all (k random neighbours get per-peer streams, one public "
            "copy each, and the step needs the one copy all neighbours hold)",
        )
        for address in self.mdns_interfaces:
            _check(
                _is_ipv4(address),
                "mdns_interfaces",
                f"{address!r} is not a unicast IPv4 interface address",
            )
        _check(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level",
            "must be one of debug, info, warning, error",
        )
        _check(
            math.isfinite(self.train_slowdown) and self.train_slowdown >= 1.0,
            "train_slowdown",
            f"must be a finite number >= 1 (1 = full speed), got {self.train_slowdown}",
        )
        self._check_metrics()
        _check(
            self.log_format in LOG_FORMATS,
            "log_format",
            f"must be one of {', '.join(LOG_FORMATS)}",
        )
        return self

    def _check_attack(self) -> None:
        """The attack's own fields (its kind and options are checked when the node
        builds it, in p2pfl.learning.attacks, which needs numpy)."""
        _check(self.attack_start_round >= 0, "attack_start_round", "must be >= 0")
        for name in ("attack_honest_to", "attack_colluders"):
            _check(not getattr(self, name) or bool(self.attack), name, "needs an attack")
        if self.attack_honest_to:
            _check(
                self.attack != "label_flip",
                "attack_honest_to",
                "label_flip poisons the training itself: there is no honest model to send",
            )
            _check(
                not self.secure_aggregation,
                "attack_honest_to",
                "cannot be combined with secure_aggregation (a masked update goes to a "
                "whole group, not per neighbour)",
            )

    def _check_mode(self) -> None:
        _check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(
            math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0,
            "staleness_exponent",
            f"must be >= 0 (0 = no discount), got {self.staleness_exponent}",
        )
        _check(self.max_staleness >= 0, "max_staleness", "must be >= 0 versions")
        _check(self.min_inputs >= 0, "min_inputs", "must be >= 0 (0 = never wait)")
        _check(
            math.isfinite(self.mix_grace) and self.mix_grace >= 0,
            "mix_grace",
            f"must be >= 0 (a fraction of the step's training time), got {self.mix_grace}",
        )
        if self.mode != "async":
            return
        # What needs every neighbour's model of one round together cannot run without
        # rounds: masks cancel only in a sum of one round's group, and the consensus
        # step needs the public copy all neighbours hold after the same round.
        _check(
            not self.secure_aggregation,
            "mode",
            "'async' cannot run with secure aggregation (pairwise masks cancel only when "
            "a group sums the same round's updates); use mode = 'sync'",
        )
        _check(
            not self.compression_consensus,
            "mode",
            "'async' cannot run with compression_consensus (the consensus step needs the "
            "copy every neighbour holds after the same round); set it to 0",
        )

    def _check_metrics(self) -> None:
        """A metrics address that parses, and the library that serves it."""
        if not self.metrics_listen:
            return
        from p2pfl.node.prometheus import EXTRA_HINT, metrics_address

        try:
            metrics_address(self.metrics_listen)
        except ValueError as exc:
            raise ConfigError("metrics_listen", f"{exc} (give HOST:PORT or a port)") from None
        _check(
            importlib.util.find_spec("prometheus_client") is not None,
            "metrics_listen",
            f"the metrics endpoint needs the metrics extra: {EXTRA_HINT}",
        )

    def _check_privacy(self) -> None:
        """The DP fields, alone and together (the accountant, which needs the dp extra,
        derives the noise when the node starts)."""
        _check(0.0 < self.dp_delta < 1.0, "dp_delta", "must be in (0, 1), e.g. 1e-5")
        _check(0.0 < self.dp_clip < math.inf, "dp_clip", "must be a finite L2 norm > 0")
        if self.dp_epsilon is not None:
            _check(0.0 < self.dp_epsilon < math.inf, "dp_epsilon", "must be a finite budget > 0")
        if self.dp_noise is not None:
            _check(
                self.dp_noise > 0 and math.isfinite(self.dp_noise),
                "dp_noise",
                f"must be a finite noise multiplier > 0 (0 adds no noise: a round would "
                f"spend infinite epsilon{'' if self.dp_epsilon is None else ' of any budget'}; "
                "leave dp_noise out to derive it from dp_epsilon and rounds)",
            )
        _check(
            0.0 <= self.dp_sgd_clip < math.inf,
            "dp_sgd_clip",
            "must be a finite norm >= 0 (0 = off)",
        )
        _check(
            0.0 <= self.dp_sgd_noise < math.inf,
            "dp_sgd_noise",
            "must be a finite noise multiplier >= 0",
        )
        if self.dp_sgd_clip > 0:
            _check(
                self.dp_sgd_noise > 0,
                "dp_sgd_noise",
                "must be > 0 with dp_sgd_clip (clipping without noise protects no example)",
            )
        else:
            _check(
                self.dp_sgd_noise == 0,
                "dp_sgd_clip",
                "must be > 0 when dp_sgd_noise is set (the noise is scaled by the clip norm)",
            )
        if not self.privacy:
            return
        _check(
            self.dp_noise is not None or self.rounds > 0,
            "dp_epsilon",
            "the noise is derived from the budget and the planned rounds, and rounds = 0 "
            "(forever) plans none: set rounds, or dp_noise",
        )

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


# Repeatable flags are singular on the command line (`--peer A --peer B`).
LIST_FLAGS = {
    "peers": "peer",
    "allow": "allow",
    "mdns_interfaces": "mdns-interface",
    "compression": "compression",
    "aggregation_options": "aggregation-option",
    "attack_options": "attack-option",
    "attack_honest_to": "attack-honest-to",
    "attack_colluders": "attack-colluder",
    "train_when": "train-when",
}


# Flags named other than their field; the field's own name stays an alias.
RENAMED_FLAGS = {"dataset": "data"}


def flag_name(field_name: str) -> str:
    if field_name in RENAMED_FLAGS:
        return RENAMED_FLAGS[field_name]
    return LIST_FLAGS.get(field_name, field_name.replace("_", "-"))


def to_flags(values: Mapping[str, Any]) -> list[str]:
    """`p2pfl node` flags for NodeConfig field values: the inverse of the CLI parser."""
    argv: list[str] = []
    for key, value in values.items():
        flag = "--" + flag_name(key)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag_name(key))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                argv += [flag, f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


def _plugin_kind(spec: str, name: str) -> str:
    """'builtin', 'file' or 'import', by the spec's form alone: a plugin is imported and
    a data file read only when the node starts (errors there are ConfigErrors too)."""
    from p2pfl.learning import DATASET_NAMES, MODEL_NAMES
    from p2pfl.learning.plugins import PluginError, kind_of

    try:
        return kind_of(spec, DATASET_NAMES if name == "dataset" else MODEL_NAMES)
    except PluginError as exc:
        raise ConfigError(name, str(exc)) from None


def _is_ipv4(value: str) -> bool:
    """A unicast IPv4 interface address (not 0.0.0.0, multicast or broadcast)."""
    import ipaddress

    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return not (
        ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255")
    )


def _check_address(value: str, name: str) -> None:
    """The wire's one address parser (`mem:` names are in-memory simulation addresses);
    bootstrap peers must be dialable (port 1..65535), `listen` may ask for port 0."""
    from p2pfl.wire.address import check_peer_address, is_memory_address, parse_address

    try:
        if name == "peers":
            check_peer_address(value)
        elif not is_memory_address(value):
            parse_address(value)
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def coerce(values: Mapping[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Turn loosely typed values (TOML, flags) into NodeConfig field values.

    Unknown keys and wrong types are reported with the field name; `source` says
    where they came from (a file name) so the user knows what to edit.
    """
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(raw_key, f"unknown field in {source}; known fields: {known}")
        default = _FIELDS[key].default
        try:
            out[key] = _coerce_value(key, value, default)
        except (TypeError, ValueError) as exc:
            raise ConfigError(key, f"{exc} (in {source})") from None
    return out


def _coerce_value(key: str, value: Any, default: Any) -> Any:
    if key == "data_dir":
        if not isinstance(value, str | Path):
            raise TypeError(f"expected a path string, got {type(value).__name__}")
        return Path(value).expanduser()
    if key in ("secret_file", "faults"):
        if value is None or value == "":
            return None
        if not isinstance(value, str | Path):
            raise TypeError(f"expected a path string, got {type(value).__name__}")
        return Path(value).expanduser()
    if key in ("aggregation_options", "attack_options"):
        return _options(value)
    if key in PLUGIN_FIELDS or key == "label_column":
        if key == "label_column" and (value is None or value == ""):
            return None
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if key in OPTIONAL_FLOATS:
        if value is None or value == "":
            return None
        if isinstance(value, str):
            return float(value)  # a flag; a ValueError names the text
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if key == "classes":
        if value is None or value == "":
            return None
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if key in (
        "peers",
        "allow",
        "mdns_interfaces",
        "compression",
        "attack_honest_to",
        "attack_colluders",
        "train_when",
    ):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return tuple(value)
    if key in AUTO_FIELDS:
        return _auto_int(value)
    if key == "neighbours":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError("expected 'all' or an integer")
        return str(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    return value


PLUGIN_FIELDS = ("model", "dataset")
"""Fields naming a model or data set: a built-in, a data file or a plugin."""

OPTIONAL_FLOATS = ("dp_epsilon", "dp_noise")
"""Number fields whose default, None, means "not set"."""

PRIVACY_KEYS = ("epsilon", "delta", "clip", "noise", "sgd_clip", "sgd_noise")
"""Keys of a node file's `[privacy]` table: `epsilon` is the field dp_epsilon, and so on."""

AUTO_FIELDS = ("max_frame_size", "receive_budget", "max_inbound")
"""Integer fields whose default, "auto", is derived when the node starts."""


def _auto_int(value: Any) -> int | str:
    """'auto' or an integer (a TOML integer, or digits from the command line)."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected 'auto' or an integer, got {value!r}")
    return value


def _options(value: Any) -> dict[str, Any]:
    """Options come as a TOML table or as repeated KEY=VALUE flags."""
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, list | tuple):
        items = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise TypeError(f"expected KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            items[k.strip()] = _scalar(v.strip())
    else:
        raise TypeError("expected a table of options or KEY=VALUE strings")
    for k, v in items.items():
        if isinstance(v, Mapping | list | tuple):
            raise TypeError(f"option {k!r} must be a number, string or boolean")
    return items


def _scalar(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a node TOML file (top-level keys or a `[node]` table) into field values.

    A relative data file or `file.py:callable` in `model`/`dataset` is relative to the
    TOML file's directory (the file and its data travel together; a node started by a
    service manager runs from another cwd). Other paths keep their meaning (cwd)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    if "node" in data and isinstance(data["node"], dict):
        data = {**{k: v for k, v in data.items() if k != "node"}, **data["node"]}
    data = _privacy_table(data, path)
    values = coerce(data, source=str(path))
    for key in PLUGIN_FIELDS:
        if key in values:
            values[key] = relative_to(values[key], path.parent)
    return values


def _privacy_table(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A `[privacy]` table (epsilon, delta, clip, noise) as the dp_* fields."""
    if "privacy" not in data:
        return data
    table = data["privacy"]
    if not isinstance(table, dict):
        raise ConfigError("privacy", f"must be a table in {path}")
    for key in table:
        if key not in PRIVACY_KEYS:
            raise ConfigError(
                f"privacy.{key}", f"unknown key in {path}; known: {', '.join(PRIVACY_KEYS)}"
            )
    rest = {k: v for k, v in data.items() if k != "privacy"}
    return {**rest, **{f"dp_{k}": v for k, v in table.items()}}


def relative_to(spec: str, base: Path) -> str:
    """A model/data spec with its relative file made relative to `base` (absolute).

    `pkg.mod:callable` and built-in names are names, not paths: they stay as they are.
    `{index}` placeholders survive (they are filled per node when the data is loaded).
    """
    from p2pfl.learning.files import is_data_file
    from p2pfl.learning.plugins import is_import_spec

    if is_data_file(spec):
        target, suffix = spec, ""
    elif is_import_spec(spec) and spec.rpartition(":")[0].endswith(".py"):
        target, sep, attr = spec.rpartition(":")
        suffix = sep + attr
    else:
        return spec
    path = Path(target).expanduser()
    return str(path if path.is_absolute() else base.resolve() / path) + suffix


def build_config(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> NodeConfig:
    """Defaults < config file < explicit flags; then validate."""
    merged = {**file_values, **flag_values}
    cfg = NodeConfig(**merged)
    return cfg.replace(data_dir=Path(cfg.data_dir).expanduser()).validated()
