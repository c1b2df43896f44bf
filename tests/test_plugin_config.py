"""Models and data sets by name in NodeConfig, node TOML files and `p2pfl node` flags.

A built-in name, a .npz/.csv file or an import string is accepted wherever a model or
data set is named; the names come from the registry (p2pfl.learning), relative files in
a TOML file are relative to it, and a bad one costs `p2pfl node` one line and exit 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from p2pfl.cli import build_parser
from p2pfl.config import (
    ConfigError,
    NodeConfig,
    build_config,
    coerce,
    load_config_file,
    relative_to,
    to_flags,
)
from p2pfl.control.client import ControlError, query
from p2pfl.learning import DATASET_NAMES, MODEL_NAMES
from p2pfl.learning.plugins import resolve_data

ROOT = Path(__file__).resolve().parent.parent

MODEL_PY = """
from p2pfl.learning import MODEL_NAMES, build_model

def build(config):
    # 4 features, 3 classes: the shape of the test's data file.
    return build_model(MODEL_NAMES[0], 4, 3, seed=config.model_seed)
"""


def write_npz(path: Path, *, n: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 4)).astype(np.float32) + y[:, None]
    np.savez(path, x=x, y=y)
    return path


def test_defaults_and_builtins_come_from_the_registry() -> None:
    cfg = NodeConfig()
    assert cfg.model == MODEL_NAMES[0] and cfg.dataset == DATASET_NAMES[0]
    for name in MODEL_NAMES:
        NodeConfig(model=name).validated()
    for name in DATASET_NAMES:
        NodeConfig(dataset=name).validated()


@pytest.mark.parametrize(
    "values",
    [
        {"model": "my_model.py:build"},
        {"model": "some.package.module:make_model"},
        {"dataset": "mine.npz"},
        {"dataset": "shards/node-{index}.csv", "label_column": "label", "classes": 10},
        {"dataset": "pkg.data:load", "classes": 3, "label_column": "y"},
    ],
)
def test_plugin_and_file_specs_validate_without_importing_or_reading(
    values: dict[str, object],
) -> None:
    # Neither the module nor the file exists: config validation only checks the form.
    NodeConfig(**values).validated()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "field", "needle"),
    [
        ({"model": "cnn"}, "model", ", ".join(MODEL_NAMES)),
        ({"model": "model.py"}, "model", "path/to/file.py:callable"),
        ({"dataset": "mnist"}, "dataset", ", ".join(DATASET_NAMES)),
        ({"dataset": "data.txt"}, "dataset", ".npz or .csv"),
        ({"dataset": "x.npz", "label_column": "y"}, "label_column", ".csv"),
        ({"dataset": "x.csv", "label_column": ""}, "label_column", "column"),
        ({"classes": 10}, "classes", "built-in"),
        ({"dataset": "x.npz", "classes": 1}, "classes", ">= 2"),
    ],
)
def test_bad_specs_name_the_field_and_the_builtins(
    values: dict[str, object], field: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(**values).validated()  # type: ignore[arg-type]
    assert info.value.field == field
    assert needle in str(info.value)


def test_coerce_reads_the_new_fields_from_flags_and_toml() -> None:
    assert coerce({"classes": "5", "label_column": "label"}) == {
        "classes": 5,
        "label_column": "label",
    }
    assert coerce({"classes": 5})["classes"] == 5
    with pytest.raises(ConfigError, match="'classes'"):
        coerce({"classes": "five"})
    with pytest.raises(ConfigError, match="'model'"):
        coerce({"model": 3})


def test_data_flag_and_its_old_name(tmp_path: Path) -> None:
    parser = build_parser()
    for flag in ("--data", "--dataset"):
        args = parser.parse_args(["node", flag, "mine.npz", "--classes", "4"])
        assert args.dataset == "mine.npz"
    # The process runner's flags use the new name and round-trip through the parser.
    argv = to_flags({"dataset": "a.csv", "label_column": "y", "classes": 3, "model": "m:f"})
    assert argv[:2] == ["--data", "a.csv"]
    ns = vars(parser.parse_args(["node", *argv]))
    cfg = build_config(
        {}, coerce({k: ns[k] for k in ("dataset", "label_column", "classes", "model")})
    )
    assert (cfg.dataset, cfg.label_column, cfg.classes, cfg.model) == ("a.csv", "y", 3, "m:f")


def test_help_lists_the_registry_names() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["node"].format_help()  # type: ignore[union-attr]
    for name in (*MODEL_NAMES, *DATASET_NAMES):
        assert name in text
    assert "<models>" not in text and "<default model>" not in text


def test_toml_relative_files_are_relative_to_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    toml = conf_dir / "node.toml"
    toml.write_text('dataset = "data/node-{index}.npz"\nmodel = "plugins/m.py:build"\n')
    monkeypatch.chdir(tmp_path)  # another cwd than the file's
    values = load_config_file(toml)
    assert values["dataset"] == str(conf_dir.resolve() / "data" / "node-{index}.npz")
    assert values["model"] == str(conf_dir.resolve() / "plugins" / "m.py") + ":build"
    # Names stay names; absolute paths stay as they are.
    toml.write_text(f'dataset = "{DATASET_NAMES[-1]}"\nmodel = "pkg.mod:build"\n')
    assert load_config_file(toml) == {"dataset": DATASET_NAMES[-1], "model": "pkg.mod:build"}
    assert relative_to("/abs/x.csv", conf_dir) == "/abs/x.csv"


def test_resolve_data_uses_label_column_and_classes(tmp_path: Path) -> None:
    csv = tmp_path / "mine.csv"
    rows = ["label,a,b"] + [f"{i % 3},{i},{-i}" for i in range(30)]
    csv.write_text("\n".join(rows) + "\n")
    cfg = NodeConfig(dataset=str(csv), label_column="label", classes=5).validated()
    data = resolve_data(cfg.dataset, cfg)
    assert data.n_classes == 5 and data.n_features == 2
    # The label column is not a feature: each row's features are (i, -i).
    assert np.all(data.x_train[:, 0] == -data.x_train[:, 1])
    assert set(data.y_train.tolist()) <= {0, 1, 2}


def node_cmd(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "p2pfl",
        "node",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--min-peers",
        "0",
        "--rounds",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d / "missing.npz", "no such file"),
        (lambda d: (d / "junk.npz").write_text("no zip") and d / "junk.npz", "not a zip archive"),
        (lambda d: (np.savez(d / "nox.npz", y=np.arange(4)), d / "nox.npz")[1], "missing array"),
    ],
)
def test_bad_data_file_is_one_line_and_exit_2(tmp_path: Path, make: object, needle: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    proc = subprocess.run(
        node_cmd(tmp_path, "--data", str(path)), capture_output=True, text=True, timeout=60
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("p2pfl node: config field 'dataset'") and needle in lines[0]
    assert str(path) in lines[0]


def test_plugin_that_raises_or_returns_the_wrong_type_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    plugin = tmp_path / "bad.py"
    plugin.write_text(
        "def boom(config):\n    raise RuntimeError('no GPU here')\n\n"
        "def nothing(config):\n    return 42\n"
    )
    for attr, needle in (("boom", "no GPU here"), ("nothing", "int")):
        proc = subprocess.run(
            node_cmd(tmp_path, "--model", f"{plugin}:{attr}"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "config field 'model'" in lines[0] and needle in lines[0]


def test_node_runs_a_round_with_a_model_file_and_a_data_file(tmp_path: Path) -> None:
    (tmp_path / "my_model.py").write_text(MODEL_PY)
    write_npz(tmp_path / "mine.npz")
    # Relative to the node's cwd, as a user types them.
    # A solo node waits a round timeout for peers that may still connect: keep it short.
    cmd = node_cmd(
        tmp_path, "--model", "my_model.py:build", "--data", "mine.npz", "--round-timeout", "2"
    )
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        status = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = query(tmp_path / "data" / "control.sock")
            except ControlError:
                status = None
            if status is not None and status["round"]["phase"] == "done":
                break
            time.sleep(0.2)
        assert status is not None and status["round"]["phase"] == "done", (
            tmp_path / "node.log"
        ).read_text()
        assert status["round"]["current"] == 1
        row = status["history"][-1]
        assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["loss"])
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "node.log").read_text()


@pytest.mark.parametrize("doc", ["docs/cli.md", "docs/scenarios.md"])
def test_docs_name_every_builtin(doc: str) -> None:
    text = (ROOT / doc).read_text()
    for name in (*MODEL_NAMES, *DATASET_NAMES):
        assert f"`{name}`" in text or f'"{name}"' in text, (doc, name)
