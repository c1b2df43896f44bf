"""Operator mistakes end `p2pfl node` with ONE line on stderr and a documented exit code.

Real processes on loopback, mDNS off. Logging runs at `warning`, so the only line on
stderr is the one that says what went wrong and what to do (docs/cli.md, "Exit codes").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfl.cli import EXIT_CODES
from p2pfl.control.client import ControlError, query
from p2pfl.scenario.processes import free_ports

NODE = [sys.executable, "-m", "p2pfl", "node", "--no-mdns", "--dataset", "synthetic"]
TIMEOUT = 60


def node_argv(data_dir: Path, port: int | str, *extra: str) -> list[str]:
    listen = port if isinstance(port, str) else f"127.0.0.1:{port}"
    return [
        *NODE,
        "--data-dir",
        str(data_dir),
        "--listen",
        listen,
        "--log-level",
        "warning",
        *extra,
    ]


def run(argv: list[str], **kwargs: object) -> tuple[int, list[str]]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload]
    return proc.returncode, proc.stderr.splitlines()


def assert_one_line(lines: list[str], *needles: str) -> str:
    text = "\n".join(lines)
    assert "Traceback" not in text and "ExceptionGroup" not in text, text
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], text
    return lines[0]


@pytest.fixture
def running_node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    data = tmp_path / "busy"
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [*node_argv(data, port, "--log-level", "info"), "--rounds", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                query(data / "control.sock")
                break
            except ControlError:
                assert time.monotonic() < deadline, "node did not start"
                time.sleep(0.2)
        yield proc, data
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_the_exit_code_table_is_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    section = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for cause, code in EXIT_CODES.items():
        assert f"| `{code}` |" in section, cause
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, lines = run(node_argv(tmp_path / "d", port))
    line = assert_one_line(lines, f"127.0.0.1:{port}", "--listen")
    assert "in use" in line
    assert code == EXIT_CODES["cannot_bind"]


def test_listen_address_not_on_this_host(tmp_path: Path) -> None:
    code, lines = run(node_argv(tmp_path / "d", "192.0.2.1:7470"))
    assert_one_line(lines, "192.0.2.1:7470", "--listen")
    assert code == EXIT_CODES["cannot_bind"]


def test_data_dir_in_use_by_a_running_node_then_sigterm_exits_0(
    running_node: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, data = running_node
    (port,) = free_ports(1)
    code, lines = run(node_argv(data, port))
    assert_one_line(lines, str(data), "in use", f"pid {proc.pid}", "--data-dir")
    assert code == EXIT_CODES["data_dir_in_use"]
    # The loser touched nothing: the running node still answers on its socket.
    assert query(data / "control.sock")["node"]["pid"] == proc.pid

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "SIGTERM" in err
    assert not (data / "control.sock").exists()


def test_sigint_exits_0_after_a_clean_goodbye(
    running_node: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, data = running_node
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "SIGINT" in err
    assert not (data / "control.sock").exists()


# As if the install were damaged: the digits shipped as package data are gone.
BREAK_DIGITS = (
    "import sys, pathlib\n"
    "from p2pfl.learning import datasets\n"
    "datasets.DIGITS_FILE = pathlib.Path('/nonexistent/p2pfl/digits.npz')\n"
    "from p2pfl.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_unreadable_dataset_names_the_file(tmp_path: Path) -> None:
    data = tmp_path / "d"
    (port,) = free_ports(1)
    argv = node_argv(data, port, "--dataset", "digits")
    code, lines = run([sys.executable, "-c", BREAK_DIGITS, *argv[3:]])
    assert_one_line(lines, "/nonexistent/p2pfl/digits.npz cannot be read")
    assert code == EXIT_CODES["usage"]
    assert not data.exists()  # checked before anything is created


def test_data_dir_too_long_for_the_control_socket(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 120)
    (port,) = free_ports(1)
    code, lines = run(node_argv(data, port))
    assert_one_line(lines, "shorter --data-dir")
    assert code == EXIT_CODES["data_dir_unusable"]
    assert not data.exists()


def test_group_writable_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    data.chmod(0o775)
    (port,) = free_ports(1)
    code, lines = run(node_argv(data, port))
    assert_one_line(lines, str(data), f"chmod 700 {data}")
    assert code == EXIT_CODES["data_dir_unusable"]
    assert os.listdir(data) == []  # no identity.key, no lock


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.write_text("x")
    (port,) = free_ports(1)
    code, lines = run(node_argv(data, port))
    assert_one_line(lines, str(data), "not a directory")
    assert code == EXIT_CODES["data_dir_unusable"]


def test_corrupt_identity_key(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    (data / "identity.key").write_text("garbage")
    (data / "identity.key").chmod(0o600)
    (port,) = free_ports(1)
    code, lines = run(node_argv(data, port))
    assert_one_line(lines, "identity.key")
    assert code == EXIT_CODES["data_dir_unusable"]


def can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


def in_private_mount(setup: str, argv: list[str]) -> tuple[int, list[str]]:
    """Run argv inside a mount namespace of its own after `setup` (a shell snippet)."""
    script = f'set -e; mount --make-rprivate /; {setup}; exec "$@"'
    return run(["unshare", "-m", "sh", "-c", script, "sh", *argv])


def test_read_only_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    (port,) = free_ports(1)
    argv = node_argv(data, port)
    if can_unshare_mounts():
        code, lines = in_private_mount(
            f"mount --bind {data} {data}; mount -o remount,ro,bind {data}", argv
        )
    elif os.geteuid() != 0:
        data.chmod(0o500)
        code, lines = run(argv)
    else:
        pytest.skip("root without mount namespaces cannot make a read-only dir")
    assert_one_line(lines, str(data))
    assert "read-only" in lines[0] or "not writable" in lines[0]
    assert code == EXIT_CODES["data_dir_unusable"]


@pytest.mark.skipif(not can_unshare_mounts(), reason="needs root and mount namespaces")
def test_disk_full_while_writing_a_checkpoint(tmp_path: Path) -> None:
    """A 16 KiB tmpfs holds the key and the lock, not a checkpoint of the MLP."""
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    (port,) = free_ports(1)
    argv = node_argv(
        data,
        port,
        "--dataset",
        "synthetic",
        "--model",
        "mlp",
        "--hidden",
        "64",
        "--min-peers",
        "0",
        "--rounds",
        "2",
        "--round-timeout",
        "0.5",  # alone: the round ends on its timeout
    )
    code, lines = in_private_mount(f"mount -t tmpfs -o size=16k,mode=0700 p2pfl-full {data}", argv)
    line = assert_one_line(lines, "disk full", "checkpoint")
    assert "free" in line
    assert code == EXIT_CODES["disk_full"]
