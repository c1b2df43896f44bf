"""Peers with another model or task are refused; checkpoints are keyed by the model;
a program can hand a node its own model and data (issue 13, items 1, 5 and 7)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.identity import Identity
from p2pfl.learning import Dataset, build_model
from p2pfl.node import Node
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport


async def test_a_peer_with_another_model_is_refused_and_shown_in_status(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    network = MemoryNetwork()
    same = make_nodes(tmp_path, 2, network, total=3, rounds=3, min_peers=1, model="mlp")
    odd = make_nodes(
        tmp_path, 1, network, start=2, total=3, rounds=3, min_peers=0, model="mlp", hidden=16
    )
    with caplog.at_level(logging.WARNING, logger="p2pfl.node"):
        async with trio.open_nursery() as nursery:
            for node in [*same, *odd]:
                await nursery.start(node.run)
            for node in same:
                await node.done.wait()
            nursery.cancel_scope.cancel()
    # The two alike learn together, every round, and never wait for the odd one.
    for node in same:
        assert [row["peers_heard"] for row in node.history] == [1, 1, 1]
        assert not any(row["timed_out"] for row in node.history)
        assert node.status()["counters"]["incompatible_peers"] >= 1
        peers = {p["id"]: p for p in node.status()["peers"]}
        odd_row = peers[odd[0].id]
        assert odd_row["state"] == "refused"
        assert "differs from ours" in odd_row["refused"] and "2410 params" in odd_row["refused"]
    refusals = [r.getMessage() for r in caplog.records if "refusing peer" in r.getMessage()]
    # One line per node and incompatible peer (the odd node refuses two, each of the
    # others one), not one per reconnection.
    assert 2 <= len(refusals) <= 4, refusals


async def test_checkpoint_of_another_model_refuses_to_resume(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(tmp_path, 2, MemoryNetwork(), rounds=1, model="softmax")
    await run_until_done(nodes)
    with pytest.raises(ConfigError, match="written for another model or task"):
        make_nodes(tmp_path, 1, MemoryNetwork(), total=2, rounds=2, model="mlp")
    # The same model resumes, and the refused attempt left the data dir usable.
    (again,) = make_nodes(tmp_path, 1, MemoryNetwork(), total=2, rounds=2, model="softmax")
    assert again.machine.round == 1


def _own_data(index: int) -> Dataset:
    rng = np.random.default_rng(index)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    xt = rng.normal(size=(100, 5)).astype(np.float32)
    yt = (xt[:, 0] + xt[:, 1] > 0).astype(np.int64)
    return Dataset(f"device-{index}", x, y, xt, yt, n_classes=2)


async def test_a_program_gives_each_node_its_own_model_and_data(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    nodes = []
    for i in range(3):
        cfg = NodeConfig(
            data_dir=tmp_path / f"own{i}",
            listen=f"mem:own{i}",
            peers=tuple(f"mem:own{j}" for j in range(3) if j != i),
            rounds=4,
            min_peers=2,
            lr=0.1,
        ).validated()
        ident = Identity.from_seed(bytes([40 + i]) * 32)
        nodes.append(
            Node(
                cfg,
                # A factory: the node builds its training model and its evaluation twin.
                model=lambda c: build_model("softmax", 5, 2, seed=c.model_seed),
                data=_own_data(i),
                identity=ident,
                transport=MemoryTransport(network, ident, f"mem:own{i}"),
                train_in_thread=False,
                control_socket=False,
            )
        )
    await run_until_done(nodes)
    for node in nodes:
        assert len(node.history) == 4
        assert node.history[-1]["metrics"]["accuracy"] > 0.9
        assert set(node.history[-1]["metrics"]) == {"loss", "accuracy"}
        timing = node.history[-1]["timing"]
        assert set(timing) == {"train_s", "encode_s", "aggregate_s", "eval_s"}
        assert all(v >= 0 for v in timing.values())
    params = np.stack([n.machine.params for n in nodes])
    assert np.abs(params - params.mean(axis=0)).max() < 0.05
