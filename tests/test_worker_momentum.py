"""Worker momentum: what leaves the node is start + the exponential average of updates."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.learning import Dataset
from p2pfl.learning.worker_momentum import WorkerMomentum
from p2pfl.node.learner import Learner
from p2pfl.scenario import ScenarioError, parse_scenario
from p2pfl.supervision import Supervisor


def test_recursion_starts_at_the_first_update() -> None:
    rng = np.random.default_rng(0)
    wm = WorkerMomentum(0.8)
    m = None
    for _ in range(5):
        start = rng.standard_normal(9).astype(np.float32)
        trained = start + rng.standard_normal(9).astype(np.float32)
        u = (trained - start).astype(np.float64)
        m = u if m is None else 0.8 * m + 0.2 * u
        sent = wm.apply(start, trained)
        np.testing.assert_allclose(sent, start + m, rtol=1e-5, atol=1e-5)
        assert sent.dtype == np.float32


def test_reset_forgets_the_history() -> None:
    wm = WorkerMomentum(0.5)
    z = np.zeros(3, np.float32)
    wm.apply(z, np.ones(3, np.float32))
    wm.reset()
    np.testing.assert_array_equal(wm.apply(z, 2 * np.ones(3, np.float32)), 2 * np.ones(3))


@pytest.mark.parametrize("beta", [-0.1, 1.0])
def test_bad_beta_is_refused(beta: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        WorkerMomentum(beta)
    with pytest.raises(ConfigError, match="worker_momentum"):
        NodeConfig(data_dir=tmp_path, worker_momentum=beta).validated()


def _learner(tmp_path: Path, beta: float) -> Learner:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int64)
    return Learner(
        NodeConfig(data_dir=tmp_path, model="softmax", worker_momentum=beta),
        model=None,
        data=Dataset("toy", x, y, x[:8], y[:8], 3),
        supervisor=Supervisor(logging.getLogger("test"), time.monotonic),
        counters=Counter(),
        threaded=False,
    )


async def test_the_learner_sends_start_plus_momentum(tmp_path: Path) -> None:
    """Train the same rounds with and without momentum (same seeds, same starts): the
    momentum node's model is start + m, m the recursion over the plain node's updates."""
    beta = 0.7
    plain = _learner(tmp_path / "a", 0.0)
    smooth = _learner(tmp_path / "b", beta)
    params = plain.model.get_params()
    m = None
    for r in range(4):
        start = params + np.float32(0.01 * r)
        trained, _ = await plain.train(r, start)
        u = (trained - start).astype(np.float64)
        m = u if m is None else beta * m + (1 - beta) * u
        sent, _ = await smooth.train(r, start)
        np.testing.assert_allclose(sent, start + m, rtol=1e-4, atol=1e-5)
        if r > 0:
            assert not np.allclose(sent, trained, atol=1e-5)  # momentum did something


def test_a_scenario_sets_it_on_every_node_and_names_a_bad_value(tmp_path: Path) -> None:
    sc = parse_scenario({"nodes": 2, "training": {"worker_momentum": 0.5}})
    values = sc.node_config_values(["mem:a", "mem:b"], [tmp_path / "a", tmp_path / "b"])
    assert [v["worker_momentum"] for v in values] == [0.5, 0.5]
    assert parse_scenario({"nodes": 2}).training.worker_momentum == 0.0
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"nodes": 2, "training": {"worker_momentum": 1.5}})
    assert info.value.path == "training.worker_momentum"
