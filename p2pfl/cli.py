"""The `p2pfl` command line.

Top-level imports stay light (argparse and the stdlib-only config module) so that
`p2pfl status` and `--help` start fast; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pfl import __version__
from p2pfl.config import (
    DEFAULT_DATA_DIR,
    LIST_FLAGS,
    PARTITIONS,
    PLUGIN_FIELDS,
    RENAMED_FLAGS,
    ConfigError,
    NodeConfig,
    flag_name,
)
from p2pfl.fatal import (
    CannotBind,
    DataDirInUse,
    DataDirUnusable,
    DiskFull,
    FatalError,
    bind_error,
    exception_leaves,
)

EXIT_CODES = {
    "ok": 0,  # finished, or stopped by SIGINT/SIGTERM after saying goodbye
    "internal": 1,  # an unexpected error: a bug (traceback at --log-level debug)
    "usage": 2,  # bad flag, config value or file, missing optional extra
    "cannot_bind": 3,  # the --listen address cannot be bound
    "data_dir_in_use": 4,  # another running node holds the data dir
    "data_dir_unusable": 5,  # data dir unsafe, read-only, not a dir, path too long, bad key
    "disk_full": 6,  # no space left while writing the node's state
}
"""`p2pfl node` / `p2pfl keys` exit codes, one per cause (docs/cli.md, "Exit codes")."""

_FATAL_CODES: tuple[tuple[type[FatalError], str], ...] = (
    (CannotBind, "cannot_bind"),
    (DataDirInUse, "data_dir_in_use"),
    (DiskFull, "disk_full"),
    (DataDirUnusable, "data_dir_unusable"),
)

# Flags whose names differ from the config field, or that repeat.
_HELP = {
    "data_dir": "directory for identity key, checkpoints, metrics and control socket",
    "listen": "HOST:PORT to accept peers on (port 0 picks a free one)",
    "peers": "bootstrap peer HOST:PORT (repeatable)",
    "allow": "admit only this peer id (repeatable; default: any peer that proves its id)",
    "secret_file": "file holding the federation secret (keeps other nodes out at TLS)",
    "min_peers": "connected peers to wait for before the first round",
    "federation": "federation name; nodes of other federations are refused",
    "peer_exchange": "learn peers of peers",
    "neighbours": "'all' or k random neighbours per round",
    "quorum": "fraction of expected neighbours to wait for before aggregating",
    "mode": "sync (rounds with a quorum) or async (no barrier: each step mixes what "
    "arrived, weighted by staleness; docs/heterogeneity.md)",
    "staleness_exponent": "async: an input lagging s versions weighs (1 + s) ** -a",
    "max_staleness": "async: inputs lagging more versions than this are not mixed",
    "min_inputs": "async: neighbours' models a step waits for before mixing (at least "
    "2 x --tolerate; at most --round-timeout; 0 = never wait)",
    "mix_grace": "async: once --min-inputs are in, wait this fraction of our own training "
    "time more for the other neighbours (stragglers miss it)",
    "round_timeout": "seconds to wait for neighbours' models before aggregating anyway",
    "rounds": "rounds to run (0 = forever); the node keeps serving peers afterwards",
    "worker_momentum": "send start + an exponential average (beta) of the round updates, "
    "0 = off (docs/robustness.md)",
    "prox_mu": "FedProx: add mu/2 ||w - w_start||^2 to local training, 0 = off "
    "(docs/optimizers.md)",
    "outer": "what the node does with its round's aggregate: fedavg (adopt it), fedavgm, "
    "fedadam, fedyogi or fedadagrad (docs/optimizers.md)",
    "outer_lr": "outer optimizer's learning rate, 0 = its default",
    "outer_beta1": "fedavgm: server momentum; fedadam/fedyogi/fedadagrad: first-moment decay",
    "outer_beta2": "fedadam/fedyogi: second-moment decay",
    "outer_tau": "fedadam/fedyogi/fedadagrad: adaptivity floor tau (> 0)",
    "dataset": (
        "a built-in data set (<datasets>) cut into this node's shard, your own .npz/.csv "
        "file, package.module:callable or path/to/file.py:callable"
    ),
    "label_column": ".csv data: the label column (default: the last one)",
    "classes": "data files: the federation's class count (default: largest label + 1)",
    "partition": " | ".join(PARTITIONS),
    "model": (
        "a built-in model (<models>), package.module:callable or path/to/file.py:callable "
        "(called with the node's config, returns a Model)"
    ),
    "mdns": "discover peers with mDNS on the local network",
    "mdns_interfaces": "IPv4 address of an interface for mDNS (repeatable)",
    "aggregation": "aggregation rule: auto (the mean at --tolerate 0, else centred clipping "
    "with spread=2, reject=1.5), mean, median, trimmed_mean, krum, multi_krum, "
    "geometric_median, centered_clipping, self_centered_clipping, clipped_gossip",
    "tolerate": "number of Byzantine neighbours the aggregation rule must tolerate",
    "aggregation_options": "KEY=VALUE option of the aggregation rule (repeatable)",
    "compression": "compression stage, in order (repeatable), e.g. topk:0.01",
    "attack": "scenario studies only: make this node malicious with this attack",
    "attack_options": "KEY=VALUE option of the attack (repeatable)",
    "attack_start_round": "studies: honest before this round, malicious from it on",
    "attack_honest_to": "studies: peer id or listen address that gets this attacker's "
    "honest model (repeatable)",
    "attack_colluders": "studies: peer id or listen address of an accomplice, left out of "
    "what the attack overhears (repeatable)",
    "secure_aggregation": "mask each update in one small group per round; neighbours see "
    "only group means (docs/secure-aggregation.md)",
    "group_size": "secure aggregation: target group size (>= 3)",
    "secure_min_group": "secure aggregation: the smallest group this node masks in",
    "secure_no_group": "secure aggregation without a group: wait, skip or plain",
    "secure_mates": "secure aggregation mates: auto, neighbours or members (relayed)",
    "log_format": "text (readable lines) or json (one object per line; docs/operations.md)",
    "dp_epsilon": "differential privacy: the node's epsilon budget; it stops contributing "
    "updates once spent (docs/privacy.md; needs p2pfl[dp])",
    "dp_delta": "differential privacy: the delta that epsilon is reported at",
    "dp_clip": "differential privacy: L2 norm each round's update is clipped to",
    "dp_noise": "differential privacy: noise multiplier (std / clip); default: derived "
    "from --dp-epsilon and --rounds",
    "checkpoint_every": "write a checkpoint every k-th round and after the last (0 = never); "
    "a crash loses at most k-1 rounds, caught up from peers",
    "train_when": "train only when this holds: ac_power, cpu_below:PERCENT, hours:H1-H2 "
    "(repeatable, all must hold; needs p2pfl[device] for the first two)",
    "personalize": "personalization: 'ditto' keeps a personal model beside the shared one, "
    "'head' only a personal output layer on the shared body",
    "personal_lambda": "Ditto's pull of the personal model towards the shared one",
    "personal_test_fraction": "share of this node's data held out to test both models",
    "personal_epochs": "local epochs of the personal model per round (0 = --epochs)",
    "metrics_listen": "serve Prometheus metrics on HOST:PORT (a bare port: loopback); "
    "needs p2pfl[metrics]",
    "dp_sgd_clip": "example-level DP-SGD: per-example gradient clip norm (0 = off)",
    "dp_sgd_noise": "example-level DP-SGD: noise multiplier of each minibatch gradient",
}


class _NodeHelpFormatter(argparse.HelpFormatter):
    """Fills in the registry's model and data set names (p2pfl.learning) only when help is
    shown: the registry imports numpy, which `p2pfl status` should not pay for."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text is None or "<" not in text:
            return text
        from p2pfl.config import default_dataset, default_model
        from p2pfl.learning import DATASET_NAMES, MODEL_NAMES

        return (
            text.replace("<datasets>", ", ".join(DATASET_NAMES))
            .replace("<models>", ", ".join(MODEL_NAMES))
            .replace("<default dataset>", default_dataset())
            .replace("<default model>", default_model())
        )


def _add_node_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per NodeConfig field, generated, so flags and config files never drift."""
    p.add_argument("--config", type=Path, help="node TOML file (flags override it)")
    for f in dataclasses.fields(NodeConfig):
        if f.name in PLUGIN_FIELDS:  # the registry's default, named when help is shown
            default: Any = f"<default {'dataset' if f.name == 'dataset' else 'model'}>"
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = ()  # the option tables (dict factories)
        help_text = _HELP.get(f.name, "")
        shown = default if not isinstance(default, tuple) else list(default)
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": (help_text if default is None else f"{help_text} (default: {shown})").strip(),
        }
        if f.name in LIST_FLAGS:
            p.add_argument(f"--{LIST_FLAGS[f.name]}", action="append", **kwargs)
        elif isinstance(default, bool):
            p.add_argument(
                f"--{flag_name(f.name)}", action=argparse.BooleanOptionalAction, **kwargs
            )
        else:
            kind = type(default) if isinstance(default, int | float) else str
            names = [f"--{flag_name(f.name)}"]
            if f.name in RENAMED_FLAGS:
                names.append(f"--{f.name.replace('_', '-')}")  # the old name keeps working
            metavar = "SPEC" if f.name in PLUGIN_FIELDS else f.name.upper()
            p.add_argument(*names, type=kind, metavar=metavar, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `only` set to the command about to run, that
    command's arguments and the others' names and help lines: their modules (the
    scenario schema, the status client) then stay unimported, which keeps a node's RSS
    and start-up down (docs/architecture.md, "Node footprint")."""
    parser = argparse.ArgumentParser(
        prog="p2pfl",
        description="Decentralized peer-to-peer federated learning (no server).",
    )
    parser.add_argument("--version", action="version", version=f"p2pfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = sub.add_parser(
        "node",
        help="run a node (until Ctrl-C / SIGTERM)",
        description="Run one p2pfl node.",
        formatter_class=_NodeHelpFormatter,
    )
    _add_node_arguments(node)

    status = sub.add_parser(
        "status",
        help="show the state of a running node",
        description="Show the state of a running node.",
    )
    if only in (None, "status"):
        from p2pfl.control.status_cli import add_status_arguments

        add_status_arguments(status)

    keys = sub.add_parser("keys", help="identity keys", description="Identity keys.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    show = keys_sub.add_parser(
        "show",
        help="print this node's peer id (creates the key)",
        description="Print the peer id of the key in DATA_DIR.",
    )
    show.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    show.add_argument("--json", action="store_true", help="machine-readable output")

    scenario = sub.add_parser(
        "scenario",
        help="run local multi-node scenarios",
        description="Run local multi-node scenarios.",
    )
    if only in (None, "scenario"):
        from p2pfl.scenario.cli import add_scenario_arguments

        add_scenario_arguments(
            scenario.add_subparsers(dest="scenario_command", required=True, metavar="ACTION")
        )
    return parser


def _command(argv: Sequence[str]) -> str:
    """The subcommand in `argv` ("" if none): the top level has only options without
    values (--help, --version), so it is the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=_command(argv)).parse_args(argv)
    if args.command == "node":
        return _run_node(args)
    if args.command == "status":
        from p2pfl.control.status_cli import run_status

        return run_status(args)
    if args.command == "keys":
        return _keys_show(args)
    if args.command == "scenario":
        from p2pfl.scenario.cli import run_scenario_cli

        code: int = run_scenario_cli(args)
        return code
    return 2


def _keys_show(args: argparse.Namespace) -> int:
    from p2pfl.identity import Identity

    try:
        ident = Identity.load_or_create(Path(args.data_dir).expanduser())
    except Exception as exc:
        return _report("p2pfl keys", exc)
    if args.json:
        print(json.dumps({"peer_id": ident.peer_id, "public_key": ident.public_bytes.hex()}))
    else:
        print(ident.peer_id)
    return 0


def _run_node(args: argparse.Namespace) -> int:
    from p2pfl.config import build_config, coerce, load_config_file

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        file_values = load_config_file(args.config) if args.config else {}
        config = build_config(file_values, coerce(flags, source="command line"))
    except ConfigError as exc:
        print(f"p2pfl node: {exc}", file=sys.stderr)
        return 2
    from p2pfl.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    import signal

    import trio

    # Until the node's own signal receiver is up, SIGTERM stops start-up like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        trio.run(_node_main, config)
    except KeyboardInterrupt:
        return EXIT_CODES["ok"]  # stopped before the node started: nobody to say bye to
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        return _report("p2pfl node", exc)
    return EXIT_CODES["ok"]


async def _node_main(config: NodeConfig) -> None:
    import logging
    import signal

    import trio

    from p2pfl.logs import event
    from p2pfl.node import Node

    # Opened first, so a signal during start-up is answered by a clean stop too.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        node = Node(config)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(node.run)
            except BaseException as exc:
                # The control socket and the data dir raise FatalErrors of their own; an
                # OSError left over while starting comes from binding the listen address.
                bind = bind_error(exc, config.listen)
                if bind is None:
                    raise
                raise bind from None
            async for signum in signals:
                logging.getLogger("p2pfl.node").info(
                    "received %s: shutting down",
                    signal.Signals(signum).name,
                    extra=event("node.stopping", signal=signal.Signals(signum).name),
                )
                break
            await node.stop()
            nursery.cancel_scope.cancel()


def _report(prog: str, exc: BaseException) -> int:
    """Print the one line for a failure and return its exit code (docs/cli.md)."""
    import logging

    leaves = exception_leaves(exc)
    if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return EXIT_CODES["ok"]
    for kind, cause in _FATAL_CODES:
        for leaf in leaves:
            if isinstance(leaf, kind):
                print(f"{prog}: {_one_line(leaf)}", file=sys.stderr)
                return EXIT_CODES[cause]
    for leaf in leaves:
        if isinstance(leaf, ConfigError):
            print(f"{prog}: {_one_line(leaf)}", file=sys.stderr)
            return EXIT_CODES["usage"]
    leaf = next((x for x in leaves if not isinstance(x, KeyboardInterrupt)), exc)
    logging.getLogger("p2pfl").debug("traceback of the internal error", exc_info=leaf)
    print(
        f"{prog}: internal error: {type(leaf).__name__}: {_one_line(leaf)} "
        "(a bug: please report it, with the traceback from --log-level debug)",
        file=sys.stderr,
    )
    return EXIT_CODES["internal"]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
