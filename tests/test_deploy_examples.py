"""The deployment examples stay runnable: the node file validates and the systemd unit's
command line is one `p2pfl node` accepts (docs/deploy.md)."""

from __future__ import annotations

import shlex
from pathlib import Path

from p2pfl.cli import build_parser
from p2pfl.config import NodeConfig, load_config_file

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"


def test_the_example_node_file_validates() -> None:
    config = NodeConfig(**load_config_file(DEPLOY / "node.toml")).validated()
    assert config.allow and config.peers and config.metrics_listen.startswith("127.0.0.1:")
    assert config.mdns_interfaces == ("192.168.1.20",)


def test_the_units_command_line_parses() -> None:
    unit = (DEPLOY / "p2pfl-node.service").read_text()
    joined = unit.replace("\\\n", " ")
    exec_start = next(line for line in joined.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[0].endswith("/p2pfl") and argv[1] == "node"
    args = build_parser().parse_args(argv[1:])
    assert args.log_format == "json" and str(args.data_dir) == "/var/lib/p2pfl"
    assert "DynamicUser=yes" in unit and "StateDirectory=p2pfl" in unit
