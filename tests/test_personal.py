"""Personalization (Ditto): the node's own test split, the personal model's pull towards
the shared one, and a node that reports both models on its split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.learning.personal import Ditto, local_split
from p2pfl.learning.softmax import SoftmaxRegression
from p2pfl.transport.memory import MemoryNetwork


def data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = (rng.standard_normal((n, 6)) + 2.0 * np.eye(6)[y]).astype(np.float32)
    return x, y


def test_the_local_split_is_disjoint_stratified_and_keeps_singletons_for_training() -> None:
    x, y = data()
    y[0] = 5  # a class seen once: it stays in the training part
    xf, yf, xt, yt = local_split(x, y, 0.2, seed=3)
    assert len(yf) + len(yt) == len(y) and 0.15 < len(yt) / len(y) < 0.25
    assert 5 in yf and 5 not in yt
    assert set(np.unique(yt)) == set(np.unique(y)) - {5}  # every other class in the test
    rows = {tuple(r) for r in xf.tolist()}
    assert not any(tuple(r) in rows for r in xt.tolist())
    again = local_split(x, y, 0.2, seed=3)
    np.testing.assert_array_equal(again[3], yt)  # the same seed, the same split
    with pytest.raises(ValueError):
        local_split(x, y, 1.0, seed=0)


def test_lambda_sets_how_far_the_personal_model_strays_from_the_shared_one() -> None:
    x, y = data()
    shared = SoftmaxRegression(6, 4, seed=0).get_params()
    distances = []
    for lam in (0.0, 1.0, 8.0):  # lambda x lr < 2: the pull itself stays stable
        ditto = Ditto(
            SoftmaxRegression(6, 4, seed=0), SoftmaxRegression(6, 4, seed=0), x, y, lam=lam
        )
        for _ in range(3):
            ditto.step(shared, x, y, epochs=2, lr=0.1, batch_size=16, rng=np.random.default_rng(0))
        assert ditto.params is not None
        distances.append(float(np.linalg.norm(ditto.params - shared)))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.1 * distances[0]


def test_evaluation_reports_the_personal_and_the_shared_model_on_the_own_split() -> None:
    x, y = data()
    model = SoftmaxRegression(6, 4, seed=0)
    ditto = Ditto(model, SoftmaxRegression(6, 4, seed=0), x[:40], y[:40], lam=0.1)
    shared = model.get_params()
    assert set(ditto.evaluate(shared, lambda m, a, b: m.evaluate(a, b))) == {
        "local_loss",
        "local_accuracy",
    }
    ditto.step(shared, x, y, epochs=3, lr=0.1, batch_size=16, rng=np.random.default_rng(0))
    out = ditto.evaluate(shared, lambda m, a, b: m.evaluate(a, b))
    assert out["personal_accuracy"] > out["local_accuracy"]  # trained vs the untrained shared


async def test_a_node_with_ditto_reports_both_models_and_trains_on_its_split_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=3, personalize="ditto")
    plain = make_nodes(tmp_path / "plain", 3, MemoryNetwork(), rounds=1)
    await run_until_done(nodes)
    for node, same_shard in zip(nodes, plain, strict=True):
        row = node.all_rows()[-1]
        assert {"personal_accuracy", "local_accuracy", "accuracy"} <= set(row["metrics"])
        personal = node.learner.personal
        assert personal is not None and personal.rounds == 3
        # The held-out split is not trained on: the claimed samples shrink by its size.
        assert node.learner.samples + len(personal.y_test) == same_shard.learner.samples


def test_config_errors() -> None:
    for fields, field in (
        ({"personalize": "fedper"}, "personalize"),
        ({"personalize": "ditto", "personal_lambda": -1.0}, "personal_lambda"),
        ({"personalize": "ditto", "personal_test_fraction": 0.0}, "personal_test_fraction"),
        ({"personalize": "ditto", "personal_lambda": 50.0, "lr": 0.05}, "personal_lambda"),
    ):
        with pytest.raises(ConfigError) as info:
            NodeConfig(**fields).validated()  # type: ignore[arg-type]
        assert info.value.field == field


def test_a_personal_head_trains_the_output_layer_on_the_shared_body() -> None:
    from p2pfl.learning.mlp import MLP

    x, y = data()
    shared_model = MLP(6, 4, seed=1, hidden=8)
    shared = shared_model.get_params()
    ditto = Ditto(MLP(6, 4, seed=1, hidden=8), MLP(6, 4, seed=1, hidden=8), x, y, part="head")
    assert ditto.head == slice(6 * 8 + 8, shared.size)  # W2 and b2 of the MLP's layout
    for round_ in range(3):
        body_moved = shared.copy()
        body_moved[: 6 * 8] += np.float32(0.01 * round_)  # the federation moved the body
        ditto.step(body_moved, x, y, epochs=2, lr=0.1, batch_size=16, rng=np.random.default_rng(0))
        assert ditto.params is not None
        np.testing.assert_array_equal(
            ditto.params[: ditto.head.start], body_moved[: ditto.head.start]
        )
        assert not np.array_equal(ditto.params[ditto.head], body_moved[ditto.head])
    out = ditto.evaluate(shared, lambda m, a, b: m.evaluate(a, b))
    assert out["personal_accuracy"] > out["local_accuracy"]
    with pytest.raises(ValueError, match="part"):
        Ditto(MLP(6, 4, seed=1), MLP(6, 4, seed=1), x, y, part="body")


def test_a_personal_head_needs_a_layout_of_weight_and_bias() -> None:
    class Flat(SoftmaxRegression):
        def layout(self) -> list[tuple[str, tuple[int, ...]]]:
            return [("all", (self.num_params,))]

    x, y = data()
    with pytest.raises(ValueError, match="weight and a bias"):
        Ditto(Flat(6, 4, seed=0), Flat(6, 4, seed=0), x, y, part="head")


async def test_a_node_with_a_personal_head_reports_both_models(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(
        tmp_path, 3, MemoryNetwork(), rounds=2, personalize="head", model="mlp",
        personal_epochs=2,
    )  # fmt: skip
    await run_until_done(nodes)
    for node in nodes:
        assert {"personal_accuracy", "local_accuracy"} <= set(node.all_rows()[-1]["metrics"])
        personal = node.learner.personal
        assert personal is not None and personal.head is not None and personal.rounds == 2


async def test_the_personal_model_survives_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The checkpoint carries v: a restarted node goes on from its personal model, not
    from the shared one (it was lost on every restart before)."""
    nodes = make_nodes(tmp_path, 2, MemoryNetwork(), rounds=3, personalize="ditto", epochs=2)
    await run_until_done(nodes)
    saved = [n.learner.personal.params.copy() for n in nodes]  # type: ignore[union-attr]
    assert not np.allclose(saved[0], nodes[0].machine.params)  # v is not the shared model
    again = make_nodes(tmp_path, 2, MemoryNetwork(), rounds=3, personalize="ditto", epochs=2)
    for node, v in zip(again, saved, strict=True):
        assert node.learner.personal is not None and node.learner.personal.params is not None
        np.testing.assert_array_equal(node.learner.personal.params, v)
        node.close()


def test_a_personal_model_of_another_size_is_not_restored() -> None:
    model = SoftmaxRegression(4, 3, seed=0)
    x = np.zeros((6, 4), np.float32)
    y = np.arange(6) % 3
    ditto = Ditto(model, SoftmaxRegression(4, 3, seed=0), x, y)
    ditto.restore({"ditto.v": np.ones(5, np.float32)}, model.num_params)
    assert ditto.params is None
    ditto.restore({"ditto.v": np.ones(model.num_params, np.float32)}, model.num_params)
    assert ditto.params is not None and ditto.params.shape == (model.num_params,)
