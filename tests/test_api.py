"""The public Python API: `p2pfl.run_node`, `p2pfl.open_node`, the lazy exports.

Real nodes on 127.0.0.1 (TLS over TCP, mDNS off) with the synthetic data set and tiny
rounds; the blocking form also in a subprocess, to stop it with SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import p2pfl
from p2pfl.api import make_config
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.fatal import CannotBind, DataDirInUse
from p2pfl.learning.datasets import Dataset

LOCAL: dict[str, Any] = {"listen": "127.0.0.1:0", "mdns": False, "data": "synthetic"}


def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Poll a condition of a real process (a guard against hanging, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the package's exports ----------------------------------------------------------------


def test_import_p2pfl_stays_light_and_exports_load_on_use() -> None:
    code = (
        "import sys, p2pfl\n"
        "heavy = [m for m in ('trio', 'numpy', 'zeroconf', 'cryptography') if m in sys.modules]\n"
        "print(heavy, p2pfl.__version__, p2pfl.PROTOCOL_VERSION)\n"
        "names = {'run_node', 'open_node', 'Node', 'NodeConfig', 'Model', 'Dataset'}\n"
        "assert names <= set(dir(p2pfl))\n"
        "from p2pfl import Node, run_node\n"
        "import p2pfl.api, p2pfl.node\n"
        "assert run_node is p2pfl.api.run_node and Node is p2pfl.node.Node\n"
        "print('trio' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = f"[] {p2pfl.__version__} {p2pfl.PROTOCOL_VERSION}"
    assert out.stdout.split("\n")[:2] == [expected, "True"], out.stderr


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'run_nodes'"):
        p2pfl.run_nodes  # noqa: B018


def test_exports_are_the_documented_objects() -> None:
    from p2pfl.learning.model import Model

    assert p2pfl.NodeConfig is NodeConfig and p2pfl.Model is Model
    assert p2pfl.Dataset is Dataset and p2pfl.ConfigError is ConfigError
    assert set(p2pfl.__all__) >= {"run_node", "open_node", "Node", "__version__"}


# --- configuration ------------------------------------------------------------------------


def test_config_from_each_form_with_keyword_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('[node]\nrounds = 7\nlisten = "127.0.0.1:0"\nfederation = "lab"\n')
    base = NodeConfig(rounds=7, listen="127.0.0.1:0", federation="lab")
    for form in (base, {"rounds": 7, "listen": "127.0.0.1:0", "federation": "lab"}, toml):
        cfg = make_config(form, peers=["127.0.0.1:9"], quorum=0.5)
        assert (cfg.rounds, cfg.federation, cfg.quorum) == (7, "lab", 0.5)
        assert cfg.peers == ("127.0.0.1:9",)  # a list becomes the config's tuple
    assert make_config(data_dir="~/x").data_dir == Path("~/x").expanduser()
    assert make_config(None) == make_config()


def test_spec_strings_go_into_the_config_objects_do_not() -> None:
    cfg = make_config(model="my_model.py:build", data="device-{index}.npz", classes=3)
    assert (cfg.model, cfg.dataset, cfg.classes) == ("my_model.py:build", "device-{index}.npz", 3)
    default = NodeConfig()
    cfg = make_config(model=lambda c: None, data=None)  # type: ignore[arg-type,return-value]
    assert (cfg.model, cfg.dataset) == (default.model, default.dataset)


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"rounds": "5"}, "rounds", "integer"),
        ({"quorum": 1.5}, "quorum", "fraction"),
        ({"roundz": 3}, "roundz", "unknown field"),
        ({"model": 3}, "model", "got int"),
        ({"model": "softmaxx"}, "model", "unknown model"),
        ({"data": (np.zeros((2, 2)), np.zeros(2))}, "dataset", "p2pfl.Dataset"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(
    kwargs: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(**kwargs)
    assert info.value.field == field
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_dataset_with_mismatched_arrays_is_refused_before_the_node_starts() -> None:
    x = np.zeros((10, 3), np.float32)
    y = np.zeros(10, np.int64)
    bad = [
        (Dataset("d", x, y[:9], x, y, n_classes=2), "x_train has 10 samples but y_train has 9"),
        (Dataset("d", x, y, x[:, :2], y, n_classes=2), "x_test samples have shape (2,)"),
        (Dataset("d", x[:0], y[:0], x, y, n_classes=2), "x_train has no samples"),
    ]
    for data, words in bad:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            make_config(data=data)


def test_a_bare_torch_module_gets_a_hint() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="TorchModel"):
        make_config(model=torch.nn.Linear(2, 2))


def test_a_config_that_is_none_of_the_forms_is_refused() -> None:
    with pytest.raises(ConfigError, match="got int"):
        make_config(3)  # type: ignore[arg-type]


# --- open_node: the async form ---------------------------------------------------------------


async def test_two_nodes_learn_and_leaving_the_block_says_goodbye(tmp_path: Path) -> None:
    async with p2pfl.open_node(
        data_dir=tmp_path / "a", nodes=2, node_index=0, min_peers=1, rounds=3, **LOCAL
    ) as a:
        assert a.listen_addresses and a.listen_addresses[0].startswith("127.0.0.1:")
        assert not a.listen_addresses[0].endswith(":0")
        async with p2pfl.open_node(
            data_dir=tmp_path / "b",
            peers=a.listen_addresses,
            nodes=2,
            node_index=1,
            min_peers=1,
            rounds=3,
            **LOCAL,
        ) as b:
            with trio.fail_after(120):
                await a.done.wait()
                await b.done.wait()
            assert [r["round"] for r in b.history] == [0, 1, 2]
            assert all(r["peers_heard"] == 1 for r in b.history)
            assert b.history[-1]["accuracy"] > 0.6  # synthetic: ~0.9 when it learns
            b_id = b.id
        # b's block ended: b said goodbye, and a knows it left (not that it was lost).
        with trio.fail_after(30):
            while True:
                peers = {p["id"]: p for p in a.status()["peers"]}
                if peers.get(b_id, {}).get("state") == "left":
                    break
                await trio.sleep(0.05)
    # Both data dirs are released: a node can open them again (and resumes there).
    async with p2pfl.open_node(
        data_dir=tmp_path / "b", nodes=2, node_index=1, min_peers=1, rounds=3, **LOCAL
    ) as again:
        assert len(again.history) == 3


async def test_an_error_in_the_block_comes_out_as_itself(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with p2pfl.open_node(data_dir=tmp_path / "a", min_peers=5, **LOCAL):
            raise KeyError("mine")
    # and the node was stopped: its data dir is free again
    async with p2pfl.open_node(data_dir=tmp_path / "a", min_peers=5, **LOCAL) as node:
        assert node.status()["round"]["current"] == 0


async def test_cancelling_the_block_stops_the_node(tmp_path: Path) -> None:
    with trio.move_on_after(0.5) as scope:
        async with p2pfl.open_node(data_dir=tmp_path / "a", min_peers=5, **LOCAL):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    async with p2pfl.open_node(data_dir=tmp_path / "a", min_peers=5, **LOCAL):
        pass


async def test_a_port_in_use_is_cannot_bind_not_an_exception_group(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CannotBind, match="address already in use"):
            async with p2pfl.open_node(
                data_dir=tmp_path / "a", **{**LOCAL, "listen": f"127.0.0.1:{port}"}
            ):
                pass  # pragma: no cover


async def test_a_data_dir_in_use_is_the_fatal_error_itself(tmp_path: Path) -> None:
    async with p2pfl.open_node(data_dir=tmp_path / "a", min_peers=5, **LOCAL):
        with pytest.raises(DataDirInUse):
            async with p2pfl.open_node(data_dir=tmp_path / "a", min_peers=5, **LOCAL):
                pass  # pragma: no cover


async def test_a_plugin_that_fails_is_a_config_error(tmp_path: Path) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text("def build(config):\n    raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError, match="no GPU here"):
        async with p2pfl.open_node(
            data_dir=tmp_path / "a", **{**LOCAL, "model": f"{plugin}:build"}
        ):
            pass  # pragma: no cover


# --- run_node: the blocking form ----------------------------------------------------------


def test_run_node_returns_the_history_when_the_rounds_are_done(tmp_path: Path) -> None:
    # A lone node ends each round on its (short) timeout.
    history = p2pfl.run_node(
        data_dir=tmp_path / "a", min_peers=0, rounds=2, round_timeout=0.2, **LOCAL
    )
    assert [row["round"] for row in history] == [0, 1]
    assert all(row["timed_out"] and "metrics" in row for row in history)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]


def test_run_node_in_a_thread_needs_no_signals(tmp_path: Path) -> None:
    result: list[Any] = []
    worker = threading.Thread(
        target=lambda: result.append(
            p2pfl.run_node(
                NodeConfig(data_dir=tmp_path / "a", rounds=1, round_timeout=0.2, min_peers=0),
                **LOCAL,
            )
        )
    )
    worker.start()
    worker.join(120)
    assert not worker.is_alive()
    assert [row["round"] for row in result[0]] == [0]


def test_run_node_raises_config_errors_unwrapped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        p2pfl.run_node(data_dir=tmp_path / "a", **{**LOCAL, "data": str(tmp_path / "x.npz")})
    assert not (tmp_path / "a").exists()  # refused before the data dir was made


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_run_node_cleanly_with_the_rounds_so_far(
    tmp_path: Path, signum: signal.Signals
) -> None:
    script = (
        "import sys, p2pfl\n"
        "history = p2pfl.run_node(data_dir=sys.argv[1], listen='127.0.0.1:0', mdns=False,\n"
        "    data='synthetic', min_peers=0, rounds=0, round_timeout=0.2)\n"
        "print('returned', [row['round'] for row in history][:2])\n"
    )
    data_dir = tmp_path / "a"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = data_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, "2 rounds")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "returned [0, 1]", err
    assert "Traceback" not in err
