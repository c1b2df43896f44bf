"""The checks behind `NodeConfig.validated()`: every field, one ConfigError naming it.

Kept apart from the config's fields and its file and flag handling (`p2pfl.config`)
because checking is most of the config's code. Like that module, this one imports only
the standard library at import time: `p2pfl status` and `--help` must stay light.
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING

from p2pfl.config import MODES, OUTER_OPTIMIZERS, PARTITIONS, ConfigError
from p2pfl.logs import LOG_FORMATS

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig


def check_config(c: NodeConfig) -> None:
    """Check every field of `c`; raise ConfigError naming the bad one."""
    _check(
        c.federation != "" and len(c.federation) <= 64,
        "federation",
        "must be a non-empty name of at most 64 characters",
    )
    _check_address(c.listen, "listen")
    for p in c.peers:
        _check_address(p, "peers")
    _check(c.max_peers >= 1, "max_peers", "must be >= 1")
    _check(0 <= c.min_peers <= c.max_peers, "min_peers", "must be between 0 and max_peers")
    for peer_id in c.allow:
        _check(
            peer_id.isalnum() and len(peer_id) <= 128,
            "allow",
            f"{peer_id!r} is not a peer id (see `p2pfl keys show`)",
        )
    _check(
        c.max_frame_size == "auto"
        or (type(c.max_frame_size) is int and 1024 <= c.max_frame_size <= 2**32 - 1),
        "max_frame_size",
        "must be 'auto' or between 1024 and 4294967295 bytes",
    )
    _check(
        c.receive_budget == "auto" or (type(c.receive_budget) is int and c.receive_budget >= 1024),
        "receive_budget",
        "must be 'auto' or at least 1024 bytes",
    )
    _check(
        not (type(c.max_frame_size) is int and type(c.receive_budget) is int)
        or c.receive_budget >= c.max_frame_size,
        "receive_budget",
        "must be at least max_frame_size (a frame has to fit)",
    )
    _check(
        c.max_inbound == "auto" or (type(c.max_inbound) is int and c.max_inbound >= 1),
        "max_inbound",
        "must be 'auto' (2 x max_peers) or >= 1",
    )
    _check(c.handshake_timeout > 0, "handshake_timeout", "must be > 0 seconds")
    _check(c.frame_timeout > 0, "frame_timeout", "must be > 0 seconds")
    _check(c.frame_min_rate >= 1, "frame_min_rate", "must be >= 1 byte per second")
    _check(c.heartbeat_interval > 0, "heartbeat_interval", "must be > 0 seconds")
    _check(
        c.heartbeat_timeout > c.heartbeat_interval,
        "heartbeat_timeout",
        "must be larger than heartbeat_interval",
    )
    data_kind = _plugin_kind(c.dataset, "dataset")
    _check(
        c.label_column is None
        or (c.label_column != "" and (data_kind == "import" or c.dataset.lower().endswith(".csv"))),
        "label_column",
        "applies to a .csv data file only (and must name a column)",
    )
    _check(
        c.classes is None or (c.classes >= 2 and data_kind != "builtin"),
        "classes",
        "must be >= 2, for a data file or a plugin (a built-in data set knows its classes)",
    )
    _check(c.nodes >= 1, "nodes", "must be >= 1")
    _check(
        0 <= c.node_index < c.nodes,
        "node_index",
        f"must be in 0..{c.nodes - 1} (nodes = {c.nodes})",
    )
    _check(
        c.partition in PARTITIONS,
        "partition",
        f"unknown partition {c.partition!r}; choose one of {', '.join(PARTITIONS)}",
    )
    _check(c.alpha > 0, "alpha", "must be > 0")
    _check(c.clusters >= 1, "clusters", "must be >= 1")
    _check(
        c.partition != "clusters" or c.clusters <= c.nodes,
        "clusters",
        f"must be in 1..{c.nodes} (nodes = {c.nodes}) for partition 'clusters'",
    )
    _plugin_kind(c.model, "model")
    _check(c.hidden >= 1, "hidden", "must be >= 1")
    _check(c.rounds >= 0, "rounds", "must be >= 0 (0 runs forever)")
    _check(c.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = never)")
    _check(c.epochs >= 1, "epochs", "must be >= 1")
    _check(c.lr > 0, "lr", "must be > 0")
    _check(c.batch_size >= 1, "batch_size", "must be >= 1")
    _check(0.0 <= c.worker_momentum < 1.0, "worker_momentum", "must be in [0, 1)")
    _check(
        c.personalize in ("", "ditto", "head"),
        "personalize",
        "must be 'ditto', 'head' or '' (off)",
    )
    if c.train_when:
        from p2pfl.node.participation import parse_conditions

        try:
            parse_conditions(c.train_when)
        except ValueError as exc:
            raise ConfigError("train_when", str(exc)) from None
    _check(
        0.0 <= c.personal_lambda < math.inf,
        "personal_lambda",
        "must be a finite number >= 0",
    )
    _check(
        0.0 < c.personal_test_fraction < 1.0,
        "personal_test_fraction",
        "must be in (0, 1)",
    )
    _check(c.personal_epochs >= 0, "personal_epochs", "must be >= 0 (0 = epochs)")
    _check(
        c.personal_lambda * c.lr < 2.0,
        "personal_lambda",
        f"x lr must be < 2 (here {c.personal_lambda * c.lr:g}): a larger pull "
        "overshoots the shared model at every step and the personal model diverges",
    )
    _check(0.0 <= c.prox_mu < math.inf, "prox_mu", "must be a finite number >= 0")
    _check(
        c.outer in OUTER_OPTIMIZERS,
        "outer",
        f"unknown outer optimizer {c.outer!r}; choose one of {', '.join(OUTER_OPTIMIZERS)}",
    )
    _check(0.0 <= c.outer_lr < math.inf, "outer_lr", "must be > 0 (or 0 for the default)")
    _check(0.0 <= c.outer_beta1 < 1.0, "outer_beta1", "must be in [0, 1)")
    _check(0.0 <= c.outer_beta2 < 1.0, "outer_beta2", "must be in [0, 1)")
    _check(0.0 < c.outer_tau < math.inf, "outer_tau", "must be a finite number > 0")
    _check(
        c.neighbours == "all" or (c.neighbours.isdigit() and int(c.neighbours) >= 1),
        "neighbours",
        f"must be 'all' or a positive integer, got {c.neighbours!r}",
    )
    _check(
        0.0 < c.quorum <= 1.0,
        "quorum",
        "must be a fraction in (0, 1] of the expected neighbours",
    )
    _check(c.round_timeout > 0, "round_timeout", "must be > 0 seconds")
    _check_mode(c)
    # The rule name and its options are checked by the aggregation registry when the
    # node starts (that module needs numpy; this one stays stdlib-only for the CLI).
    _check(c.aggregation != "", "aggregation", "must name a rule")
    _check(c.tolerate >= 0, "tolerate", "must be >= 0")
    _check_attack(c)
    _check_privacy(c)
    _check(c.group_size >= 3, "group_size", "must be >= 3")
    _check(
        3 <= c.secure_min_group <= c.group_size,
        "secure_min_group",
        f"must be in 3..group_size ({c.group_size})",
    )
    _check(
        c.secure_no_group in ("wait", "skip", "plain"),
        "secure_no_group",
        f"must be wait, skip or plain, got {c.secure_no_group!r}",
    )
    _check(
        c.secure_mates in ("auto", "neighbours", "members"),
        "secure_mates",
        f"must be auto, neighbours or members, got {c.secure_mates!r}",
    )
    _check(
        not (c.secure_aggregation and c.compression),
        "compression",
        "cannot be combined with secure_aggregation yet (group means are forwarded "
        "dense so that copies from several mates compare equal); drop one of them",
    )
    _check(
        c.compression_keyframe_every >= 0,
        "compression_keyframe_every",
        "must be >= 0 (0 = only when a peer needs one)",
    )
    _check(
        math.isfinite(c.compression_consensus) and 0 <= c.compression_consensus <= 1,
        "compression_consensus",
        f"must be in (0, 1] (the step size gamma) or 0 (off), got {c.compression_consensus}",
    )
    _check(
        math.isfinite(c.compression_consensus_keep) and 0 <= c.compression_consensus_keep <= 1,
        "compression_consensus_keep",
        f"must be in [0, 1], got {c.compression_consensus_keep}",
    )
    _check(
        not c.compression_consensus or bool(c.compression),
        "compression_consensus",
        "needs a compression pipeline (without one every copy is exact: nothing to do)",
    )
    _check(
        not c.compression_consensus or c.neighbour_count is None,
        "compression_consensus",
        "needs neighbours = all (k random neighbours get per-peer streams, one public "
        "copy each, and the step needs the one copy all neighbours hold)",
    )
    for address in c.mdns_interfaces:
        _check(
            _is_ipv4(address),
            "mdns_interfaces",
            f"{address!r} is not a unicast IPv4 interface address",
        )
    _check(
        c.log_level in ("debug", "info", "warning", "error"),
        "log_level",
        "must be one of debug, info, warning, error",
    )
    _check(
        math.isfinite(c.train_slowdown) and c.train_slowdown >= 1.0,
        "train_slowdown",
        f"must be a finite number >= 1 (1 = full speed), got {c.train_slowdown}",
    )
    _check_metrics(c)
    _check(
        c.log_format in LOG_FORMATS,
        "log_format",
        f"must be one of {', '.join(LOG_FORMATS)}",
    )


def _check_attack(c: NodeConfig) -> None:
    """The attack's own fields (its kind and options are checked when the node
    builds it, in p2pfl.learning.attacks, which needs numpy)."""
    _check(c.attack_start_round >= 0, "attack_start_round", "must be >= 0")
    for name in ("attack_honest_to", "attack_colluders"):
        _check(not getattr(c, name) or bool(c.attack), name, "needs an attack")
    if c.attack_honest_to:
        _check(
            c.attack != "label_flip",
            "attack_honest_to",
            "label_flip poisons the training itself: there is no honest model to send",
        )
        _check(
            not c.secure_aggregation,
            "attack_honest_to",
            "cannot be combined with secure_aggregation (a masked update goes to a "
            "whole group, not per neighbour)",
        )


def _check_mode(c: NodeConfig) -> None:
    _check(c.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {c.mode!r}")
    _check(
        math.isfinite(c.staleness_exponent) and c.staleness_exponent >= 0,
        "staleness_exponent",
        f"must be >= 0 (0 = no discount), got {c.staleness_exponent}",
    )
    _check(c.max_staleness >= 0, "max_staleness", "must be >= 0 versions")
    _check(c.min_inputs >= 0, "min_inputs", "must be >= 0 (0 = never wait)")
    _check(
        math.isfinite(c.mix_grace) and c.mix_grace >= 0,
        "mix_grace",
        f"must be >= 0 (a fraction of the step's training time), got {c.mix_grace}",
    )
    if c.mode != "async":
        return
    # What needs every neighbour's model of one round together cannot run without
    # rounds: masks cancel only in a sum of one round's group, and the consensus
    # step needs the public copy all neighbours hold after the same round.
    _check(
        not c.secure_aggregation,
        "mode",
        "'async' cannot run with secure aggregation (pairwise masks cancel only when "
        "a group sums the same round's updates); use mode = 'sync'",
    )
    _check(
        not c.compression_consensus,
        "mode",
        "'async' cannot run with compression_consensus (the consensus step needs the "
        "copy every neighbour holds after the same round); set it to 0",
    )


def _check_metrics(c: NodeConfig) -> None:
    """A metrics address that parses, and the library that serves it."""
    if not c.metrics_listen:
        return
    from p2pfl.node.prometheus import EXTRA_HINT, metrics_address

    try:
        metrics_address(c.metrics_listen)
    except ValueError as exc:
        raise ConfigError("metrics_listen", f"{exc} (give HOST:PORT or a port)") from None
    _check(
        importlib.util.find_spec("prometheus_client") is not None,
        "metrics_listen",
        f"the metrics endpoint needs the metrics extra: {EXTRA_HINT}",
    )


def _check_privacy(c: NodeConfig) -> None:
    """The DP fields, alone and together (the accountant, which needs the dp extra,
    derives the noise when the node starts)."""
    _check(0.0 < c.dp_delta < 1.0, "dp_delta", "must be in (0, 1), e.g. 1e-5")
    _check(0.0 < c.dp_clip < math.inf, "dp_clip", "must be a finite L2 norm > 0")
    if c.dp_epsilon is not None:
        _check(0.0 < c.dp_epsilon < math.inf, "dp_epsilon", "must be a finite budget > 0")
    if c.dp_noise is not None:
        _check(
            c.dp_noise > 0 and math.isfinite(c.dp_noise),
            "dp_noise",
            f"must be a finite noise multiplier > 0 (0 adds no noise: a round would "
            f"spend infinite epsilon{'' if c.dp_epsilon is None else ' of any budget'}; "
            "leave dp_noise out to derive it from dp_epsilon and rounds)",
        )
    _check(
        0.0 <= c.dp_sgd_clip < math.inf,
        "dp_sgd_clip",
        "must be a finite norm >= 0 (0 = off)",
    )
    _check(
        0.0 <= c.dp_sgd_noise < math.inf,
        "dp_sgd_noise",
        "must be a finite noise multiplier >= 0",
    )
    if c.dp_sgd_clip > 0:
        _check(
            c.dp_sgd_noise > 0,
            "dp_sgd_noise",
            "must be > 0 with dp_sgd_clip (clipping without noise protects no example)",
        )
    else:
        _check(
            c.dp_sgd_noise == 0,
            "dp_sgd_clip",
            "must be > 0 when dp_sgd_noise is set (the noise is scaled by the clip norm)",
        )
    if not c.privacy:
        return
    _check(
        c.dp_noise is not None or c.rounds > 0,
        "dp_epsilon",
        "the noise is derived from the budget and the planned rounds, and rounds = 0 "
        "(forever) plans none: set rounds, or dp_noise",
    )


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
