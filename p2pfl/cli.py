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
    ConfigError,
    NodeConfig,
    flag_name,
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
    "round_timeout": "seconds to wait for neighbours' models before aggregating anyway",
    "rounds": "rounds to run (0 = forever); the node keeps serving peers afterwards",
    "dataset": "digits | synthetic",
    "partition": " | ".join(PARTITIONS),
    "model": "softmax | mlp",
    "mdns": "discover peers with mDNS on the local network",
    "mdns_interfaces": "IPv4 address of an interface for mDNS (repeatable)",
    "tolerate": "number of Byzantine neighbours the aggregation rule must tolerate",
    "aggregation_options": "KEY=VALUE option of the aggregation rule (repeatable)",
    "compression": "compression stage, in order (repeatable), e.g. topk:0.01",
    "attack": "scenario studies only: make this node malicious with this attack",
    "attack_options": "KEY=VALUE option of the attack (repeatable)",
}


def _add_node_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per NodeConfig field, generated, so flags and config files never drift."""
    p.add_argument("--config", type=Path, help="node TOML file (flags override it)")
    defaults = NodeConfig()
    for f in dataclasses.fields(NodeConfig):
        default = getattr(defaults, f.name)
        if isinstance(default, dict):
            default = ()
        help_text = _HELP.get(f.name, "")
        shown = default if not isinstance(default, tuple) else list(default)
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{help_text} (default: {shown})".strip(),
        }
        if f.name in LIST_FLAGS:
            p.add_argument(f"--{LIST_FLAGS[f.name]}", action="append", **kwargs)
        elif isinstance(default, bool):
            p.add_argument(
                f"--{flag_name(f.name)}", action=argparse.BooleanOptionalAction, **kwargs
            )
        else:
            kind = type(default) if isinstance(default, int | float) else str
            p.add_argument(f"--{flag_name(f.name)}", type=kind, metavar=f.name.upper(), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfl",
        description="Decentralized peer-to-peer federated learning (no server).",
    )
    parser.add_argument("--version", action="version", version=f"p2pfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = sub.add_parser(
        "node", help="run a node (until Ctrl-C / SIGTERM)", description="Run one p2pfl node."
    )
    _add_node_arguments(node)

    status = sub.add_parser(
        "status",
        help="show the state of a running node",
        description="Show the state of a running node.",
    )
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
    from p2pfl.scenario.cli import add_scenario_arguments

    add_scenario_arguments(
        scenario.add_subparsers(dest="scenario_command", required=True, metavar="ACTION")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    from p2pfl.identity import Identity, IdentityError

    try:
        ident = Identity.load_or_create(Path(args.data_dir).expanduser())
    except (IdentityError, OSError) as exc:
        print(f"p2pfl: {exc}", file=sys.stderr)
        return 1
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

    setup_logging(config.log_level)
    import trio

    try:
        trio.run(_node_main, config)
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        print(f"p2pfl node: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"p2pfl node: {exc}", file=sys.stderr)
        return 1
    return 0


async def _node_main(config: NodeConfig) -> None:
    import signal

    import trio

    from p2pfl.node import Node

    node = Node(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                import logging

                logging.getLogger("p2pfl.node").info(
                    "received %s: shutting down", signal.Signals(signum).name
                )
                break
        await node.stop()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    raise SystemExit(main())
