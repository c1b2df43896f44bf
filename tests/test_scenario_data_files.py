"""Scenario files with each node's own data file (`{index}`) and a model from a file.

Relative paths are the scenario file's, whatever the runner's cwd; a missing file for
any node is a validation error naming the key and the node, before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pfl.cli import main
from p2pfl.learning import DATASET_NAMES, MODEL_NAMES
from p2pfl.scenario import ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent

MODEL_PY = """
from p2pfl.learning import MODEL_NAMES, build_model

def build(config):
    return build_model(MODEL_NAMES[0], 4, 3, seed=config.model_seed)
"""

SCENARIO = """
nodes = 3
rounds = 2
[data]
dataset = "shards/node-{{index}}.npz"
{data_extra}
[model]
name = "{model}"
[protocol]
round_timeout = 10.0
heartbeat_interval = 0.2
heartbeat_timeout = 2.0
"""


def write_shards(folder: Path, nodes: int, *, skip: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(nodes):
        if i == skip:
            continue
        rng = np.random.default_rng(i)
        y = np.arange(40 + 10 * i) % 3
        x = rng.normal(scale=0.3, size=(y.size, 4)).astype(np.float32) + y[:, None]
        np.savez(folder / f"node-{i}.npz", x=x, y=y)


def make_scenario(
    root: Path,
    *,
    model: str = "plugin/model.py:build",
    data_extra: str = "",
    skip: int | None = None,
) -> Path:
    write_shards(root / "shards", 3, skip=skip)
    (root / "plugin").mkdir(parents=True, exist_ok=True)
    (root / "plugin" / "model.py").write_text(MODEL_PY)
    path = root / "scenario.toml"
    path.write_text(SCENARIO.format(model=model, data_extra=data_extra))
    return path


def test_relative_paths_are_the_scenario_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_scenario(tmp_path / "study")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sc = load_scenario(path)
    base = (tmp_path / "study").resolve()
    assert sc.data.dataset == str(base / "shards" / "node-{index}.npz")
    assert sc.model.name == str(base / "plugin" / "model.py") + ":build"
    values = sc.node_config_values([f"mem:n{i}" for i in range(3)], [tmp_path] * 3)
    # Every node gets the same template and its own index: the node fills it in.
    assert {v["dataset"] for v in values} == {sc.data.dataset}
    assert [v["node_index"] for v in values] == [0, 1, 2]


def test_import_strings_and_builtins_stay_as_they_are(tmp_path: Path) -> None:
    sc = parse_scenario(
        {"nodes": 2, "model": {"name": "p2pfl.learning.model:build_model"}}, base_dir=tmp_path
    )
    assert sc.model.name == "p2pfl.learning.model:build_model"
    assert (
        sc.data.dataset == DATASET_NAMES[0]
        and MODEL_NAMES[0] == parse_scenario({"nodes": 2}).model.name
    )
    for name in DATASET_NAMES:
        assert parse_scenario({"nodes": 2, "data": {"dataset": name}}).data.dataset == name


def test_missing_shard_of_one_node_is_named_up_front(tmp_path: Path) -> None:
    path = make_scenario(tmp_path, skip=2)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.path == "data.dataset"
    assert "node-2.npz" in str(info.value) and "(node 2)" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "where", "needle"),
    [
        ({"model": "plugin/nope.py:build"}, "model.name", "no such file"),
        ({"model": "cnn"}, "model.name", ", ".join(MODEL_NAMES)),
        ({"data_extra": 'label_column = "y"'}, "data.label_column", ".csv"),
        ({"data_extra": "classes = 1"}, "data.classes", ">= 2"),
    ],
)
def test_scenario_errors_name_the_key(
    tmp_path: Path, kwargs: dict[str, str], where: str, needle: str
) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(make_scenario(tmp_path, **kwargs))
    assert info.value.path == where and needle in str(info.value)


def test_classes_reach_every_node(tmp_path: Path) -> None:
    sc = load_scenario(make_scenario(tmp_path, data_extra="classes = 5"))
    values = sc.node_config_values([f"mem:n{i}" for i in range(3)], [tmp_path] * 3)
    assert all(v["classes"] == 5 for v in values)
    plain = parse_scenario({"nodes": 2})
    assert "classes" not in plain.node_config_values(["mem:a", "mem:b"], [tmp_path] * 2)[0]


def test_in_process_scenario_on_per_node_files_reaches_its_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_scenario(tmp_path / "study")
    monkeypatch.chdir(tmp_path)  # not the scenario's directory
    out = tmp_path / "out"
    code = main(["scenario", "run", str(path), "--in-process", "--json", "--out", str(out)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["final"]["rounds_completed_min"] == 2
    for i in range(3):
        assert len(metrics["nodes"][f"n{i}"]["rounds"]) == 2
    assert doc["ok"] is True


def test_each_node_loads_its_own_file(tmp_path: Path) -> None:
    from p2pfl.scenario.inprocess import build_nodes

    sc = load_scenario(make_scenario(tmp_path / "study", data_extra="classes = 4"))
    nodes = build_nodes(sc, tmp_path / "out")
    for i, node in enumerate(nodes):
        assert node.data.y_train.size + node.data.y_test.size == 40 + 10 * i
        assert node.data.n_classes == 4


def test_in_process_bad_shard_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_scenario(tmp_path)
    np.savez(tmp_path / "shards" / "node-1.npz", x=np.zeros((5, 4)), y=np.full(5, np.nan))
    code = main(["scenario", "run", str(path), "--in-process", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert "node n1" in err[0] and "node-1.npz" in err[0] and "non-integer labels" in err[0]


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.toml")), ids=lambda p: p.name)
def test_every_bundled_scenario_still_validates(path: Path) -> None:
    load_scenario(path)


def test_torch_example_scenario_validates_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sc = load_scenario(ROOT / "examples" / "torch_cnn" / "scenario.toml")
    assert sc.model.name == str(ROOT / "examples" / "torch_cnn" / "model.py") + ":build"
