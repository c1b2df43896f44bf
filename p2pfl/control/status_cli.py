"""`p2pfl status`: ask the local node for its status and print it.

Imports stay stdlib-only at module level (rich is loaded only to draw a table), so `--json`
answers in roughly interpreter start-up time; trio, numpy and zeroconf are never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from p2pfl.control.client import DEFAULT_DATA_DIR, ControlError, query, socket_path_for

if TYPE_CHECKING:
    from rich.console import Console


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `p2pfl status` (the lead's cli.py owns the subcommand itself)."""
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"data dir of the node to ask (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help="control socket to use instead of DATA_DIR/control.sock",
    )
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="read a stopped node's data dir (identity, checkpoint, metrics.jsonl) instead "
        "of asking a running node",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="refresh in place until Ctrl-C (with --json: one JSON line per refresh; "
        "when stdout is not a terminal: one line per change)",
    )
    parser.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="refresh period for --watch (default 1.0)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=3.0,
        metavar="SECONDS",
        help="how long to wait for the node's answer (default 3.0)",
    )


def socket_path(args: argparse.Namespace) -> Path:
    """--socket wins over --data-dir."""
    explicit = getattr(args, "socket", None)
    if explicit:
        return Path(explicit).expanduser()
    return socket_path_for(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR)


def _console(file: TextIO | None = None) -> Console:
    from rich.console import Console

    return Console(file=file)


def watch_status(
    path: Path,
    *,
    interval: float,
    timeout: float,
    as_json: bool,
    sleep: Callable[[float], Any] = time.sleep,
    out: TextIO | None = None,
    lines: bool | None = None,
) -> int:
    """Poll forever, redrawing in place; an unreachable node is shown, not fatal. 0 on Ctrl-C.

    `sleep` and `out` exist so tests can stop the loop and read what was drawn. `lines`:
    one line per change instead of a redrawn screen; by default when stdout is not a
    terminal (a pipe, a file, a service's journal).
    """
    stream = out if out is not None else sys.stdout
    try:
        if as_json:
            while True:
                try:
                    stream.write(json.dumps(query(path, "status", timeout)) + "\n")
                    stream.flush()
                except ControlError as exc:
                    print(f"p2pfl status: {exc}", file=sys.stderr, flush=True)
                sleep(interval)
        if lines if lines is not None else out is None and not stream.isatty():
            return _watch_lines(path, interval=interval, timeout=timeout, sleep=sleep, out=stream)
        from rich.live import Live

        from p2pfl.control.render import render_error, render_status

        with Live(console=_console(stream), auto_refresh=False) as live:
            while True:
                try:
                    view = render_status(query(path, "status", timeout))
                except ControlError as exc:
                    view = render_error(str(exc))
                live.update(view, refresh=True)
                sleep(interval)
    except KeyboardInterrupt:
        return 0


def _watch_lines(
    path: Path, *, interval: float, timeout: float, sleep: Callable[[float], Any], out: TextIO
) -> int:
    """`--watch` into a pipe or a file: one line when something changed (a redrawn screen
    would be escape codes nobody reads), each stamped with the local time."""
    from p2pfl.control.render import status_line

    last = None
    while True:
        try:
            line = status_line(query(path, "status", timeout))
        except ControlError as exc:
            line = f"unreachable: {exc}"
        if line != last:
            out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
            out.flush()
            last = line
        sleep(interval)


def run_offline(args: argparse.Namespace) -> int:
    """`--offline`: 0 with the stopped node's status, 1 when the dir holds no node."""
    from p2pfl.control.offline import offline_status

    data_dir = Path(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR).expanduser()
    try:
        result = offline_status(data_dir)
    except ValueError as exc:
        print(f"p2pfl status: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    from p2pfl.control.render import render_status

    _console().print(render_status(result))
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Exit code 0 when the node answered, 1 (message on stderr) when it did not."""
    if getattr(args, "offline", False):
        return run_offline(args)
    path = socket_path(args)
    timeout = float(getattr(args, "timeout", 3.0))
    as_json = bool(getattr(args, "json", False))
    if getattr(args, "watch", False):
        interval = float(getattr(args, "interval", 1.0))
        return watch_status(path, interval=interval, timeout=timeout, as_json=as_json)
    try:
        result = query(path, "status", timeout)
    except ControlError as exc:
        print(f"p2pfl status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    from p2pfl.control.render import render_status

    _console().print(render_status(result))
    return 0


__all__ = ["add_status_arguments", "run_offline", "run_status", "socket_path", "watch_status"]
