"""Node configuration: one dataclass, loaded from TOML and/or command-line flags.

Every field has a default, so `p2pfl node` runs with no configuration at all. Values
are validated in one place (`NodeConfig.validated`) and every error names the field,
so a typo in a config file is reported as `config field 'round_timeout': ...`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    aggregation: str = "auto"  # the mean at tolerate 0, else the recommended robust rule
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
        """Return self after checking every field; raise ConfigError naming the bad one
        (the checks are in `p2pfl.config_checks`)."""
        from p2pfl.config_checks import check_config

        check_config(self)
        return self

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
