"""personal_epochs: the personal (Ditto) model's local epochs per round, apart from the
shared model's (docs/heterogeneity.md, "Personalization")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.learning.personal import Ditto
from p2pfl.learning.softmax import SoftmaxRegression
from p2pfl.scenario import ScenarioError, parse_scenario
from p2pfl.transport.memory import MemoryNetwork


def test_personal_epochs_must_not_be_negative() -> None:
    NodeConfig(personalize="ditto", personal_epochs=0).validated()  # 0: the same as epochs
    with pytest.raises(ConfigError) as info:
        NodeConfig(personalize="ditto", personal_epochs=-1).validated()
    assert info.value.field == "personal_epochs"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("epochs", "personal_epochs", "expected"), [(1, 4, 4), (2, 0, 2), (3, 1, 1)]
)
async def test_the_personal_model_trains_personal_epochs_the_shared_one_epochs(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    epochs: int,
    personal_epochs: int,
    expected: int,
) -> None:
    nodes = make_nodes(
        tmp_path, 3, MemoryNetwork(), rounds=2, epochs=epochs,
        personalize="ditto", personal_epochs=personal_epochs,
    )  # fmt: skip
    personal_calls: list[int] = []
    shared_calls: list[int] = []

    def counting(model: Any, calls: list[int]) -> None:
        fit = model.fit

        def fit_counted(*args: Any, **kwargs: Any) -> float:
            calls.append(kwargs["epochs"])
            return float(fit(*args, **kwargs))

        model.fit = fit_counted

    for node in nodes:
        assert node.learner.personal is not None
        counting(node.learner.personal.model, personal_calls)
        counting(node.learner.model, shared_calls)
    await run_until_done(nodes)
    assert personal_calls == [expected] * 6  # 3 nodes x 2 rounds
    assert shared_calls and set(shared_calls) == {epochs}
    assert all(node.learner.personal.rounds == 2 for node in nodes)  # type: ignore[union-attr]


def test_more_personal_epochs_is_the_same_as_fitting_longer_by_hand() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 120)
    x = (rng.standard_normal((120, 6)) + 2.0 * np.eye(6)[y]).astype(np.float32)
    shared = SoftmaxRegression(6, 4, seed=0).get_params()
    ditto = Ditto(SoftmaxRegression(6, 4, seed=0), SoftmaxRegression(6, 4, seed=0), x, y, lam=0.1)
    ditto.step(shared, x, y, epochs=5, lr=0.1, batch_size=16, rng=np.random.default_rng(7))
    by_hand = SoftmaxRegression(6, 4, seed=0)
    by_hand.set_proximal(0.1, anchor=shared)
    by_hand.fit(x, y, epochs=5, lr=0.1, batch_size=16, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(ditto.params, by_hand.get_params())
    one = Ditto(SoftmaxRegression(6, 4, seed=0), SoftmaxRegression(6, 4, seed=0), x, y, lam=0.1)
    one.step(shared, x, y, epochs=1, lr=0.1, batch_size=16, rng=np.random.default_rng(7))
    assert not np.array_equal(one.params, ditto.params)


def test_the_scenario_key_reaches_every_node_config() -> None:
    training = {"personalize": "ditto", "personal_epochs": 5}
    s = parse_scenario({"nodes": 3, "training": training})
    assert s.training.personal_epochs == 5
    values = s.node_config_values([f"mem:n{i}" for i in range(3)], [Path(".")] * 3)
    assert [NodeConfig(**v).validated().personal_epochs for v in values] == [5, 5, 5]
    default = parse_scenario({"nodes": 3}).node_config_values(
        ["mem:a", "mem:b", "mem:c"], [Path(".")] * 3
    )
    assert {v["personal_epochs"] for v in default} == {0}
    with pytest.raises(ScenarioError, match=r"training\.personal_epochs"):
        parse_scenario({"nodes": 3, "training": {"personal_epochs": -1}})
