"""Whatever metrics a model reports reach status, metrics.json, the table and the plot
(issue 13, item 1): a regression model (loss and mae, no accuracy) is shown by its loss,
a classifier by its accuracy as before, and each round's timing is shown too."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from rich.console import Console
from test_node_inmemory import run_until_done

from p2pfl.config import NodeConfig
from p2pfl.control.render import render_status
from p2pfl.identity import Identity
from p2pfl.learning import Dataset
from p2pfl.metrics import (
    fmt_metric,
    metric_names,
    primary_metric,
    row_metrics,
    row_timing,
)
from p2pfl.node import Node
from p2pfl.scenario.report import (
    RoundProgress,
    build_metrics,
    metric_figure,
    plot_name,
    summary_table,
    write_report,
)
from p2pfl.scenario.schema import parse_scenario
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

TIMING = {"aggregate_s": 0.001, "encode_s": 0.004, "eval_s": 0.02, "train_s": 0.25}


def text_of(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def _row(r: int, metrics: dict[str, float]) -> dict[str, Any]:
    """A history row as node.py writes it."""
    return {
        "round": r,
        **{k: metrics[k] for k in ("accuracy", "loss") if k in metrics},
        "metrics": metrics,
        "bytes_sent": 1000 * r,
        "bytes_received": 900 * r,
        "seconds": 0.5,
        "peers_heard": 2,
        "timed_out": False,
        "timing": TIMING,
    }


def _regression_nodes(n: int = 3, rounds: int = 4) -> dict[str, dict[str, Any]]:
    return {
        f"n{i}": {
            "peer_id": f"p{i}",
            "rounds": [
                _row(r, {"loss": 4000.0 / r**4 + i, "mae": 10.0 / r + 0.1 * i})
                for r in range(1, rounds + 1)
            ],
        }
        for i in range(n)
    }


def _classification_nodes(n: int = 3, rounds: int = 4) -> dict[str, dict[str, Any]]:
    return {
        f"n{i}": {
            "peer_id": f"p{i}",
            "rounds": [
                _row(r, {"loss": 1.0 / r, "accuracy": 0.5 + 0.04 * r + 0.01 * i})
                for r in range(1, rounds + 1)
            ],
        }
        for i in range(n)
    }


# --- the shared notion of "primary metric" ---------------------------------------------------


def test_primary_metric_is_accuracy_else_loss_else_first() -> None:
    assert primary_metric(["loss", "accuracy"]) == "accuracy"
    assert primary_metric(["mae", "loss"]) == "loss"
    assert primary_metric(["r2", "mae"]) == "r2"
    assert primary_metric([]) is None
    rows = [_row(1, {"mae": 1.0, "loss": 2.0}), _row(2, {"loss": 1.0, "rmse": 0.5})]
    assert metric_names(rows) == ["loss", "mae", "rmse"]


def test_row_metrics_reads_old_rows_and_drops_non_numbers() -> None:
    # A checkpoint written before rows had "metrics" still shows its accuracy and loss.
    assert row_metrics({"round": 1, "accuracy": 0.5, "loss": 0.7}) == {
        "accuracy": 0.5,
        "loss": 0.7,
    }
    odd = {"round": 1, "metrics": {"loss": float("nan"), "mae": "x", "ok": True, "r2": 0.3}}
    assert row_metrics(odd) == {"r2": 0.3}
    assert row_metrics("garbage") == {} and row_timing({"timing": [1, 2]}) == {}
    assert list(row_timing({"timing": TIMING})) == ["train_s", "encode_s", "aggregate_s", "eval_s"]


def test_fmt_metric_keeps_huge_and_tiny_values_readable() -> None:
    assert fmt_metric(0.9123) == "0.9123"
    assert fmt_metric(1234567.0, 4) == "1.235e+06"
    assert fmt_metric(0.0000123, 3) == "1.23e-05"
    assert fmt_metric(None) == "-" and fmt_metric(float("inf")) == "-"


# --- scenario report -------------------------------------------------------------------------


def test_regression_report_shows_loss_and_mae(tmp_path: Path) -> None:
    s = parse_scenario({"name": "regress", "nodes": 3, "rounds": 4})
    con = Console(file=io.StringIO(), width=200, color_system=None)
    metrics = write_report(
        tmp_path, s, _regression_nodes(), wall_seconds=1.0, mode="test", console=con
    )
    doc = json.loads((tmp_path / "metrics.json").read_text())
    summary = doc["summary"]
    assert summary["primary_metric"] == "loss" and summary["metrics"] == ["loss", "mae"]
    first = summary["per_round"][0]
    assert first["metrics_mean"] == pytest.approx({"loss": 4001.0, "mae": 10.1})
    assert first["metrics_min"]["loss"] == 4000.0 and first["metrics_max"]["loss"] == 4002.0
    assert first["loss_mean"] == pytest.approx(4001.0) and first["accuracy_mean"] is None
    assert first["timing_mean"] == pytest.approx(TIMING)
    final = summary["final"]
    assert final["metric"] == "loss" and final["metric_mean"] == pytest.approx(4000 / 256 + 1)
    assert final["metrics_mean"]["mae"] == pytest.approx(2.6)
    assert final["accuracy_mean"] is None  # the key stays for readers that expect it
    assert doc["nodes"]["n2"]["final_metrics"] == pytest.approx(
        {"loss": 4000 / 256 + 2, "mae": 2.7}
    )
    # The plot is named for its metric; there is no accuracy plot for a regression.
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "accuracy.png").exists()
    out = con.file.getvalue()  # type: ignore[attr-defined]
    for expected in ("loss mean", "loss min", "loss max", "mae", "4001.000", "10.100"):
        assert expected in out, expected
    assert "acc" not in out
    assert "CPU per round: train 250ms · encode 4.0ms · aggregate 1.0ms · eval 20ms" in out
    assert "final loss mean 16.625 (min 15.625, max 17.625), mae 2.600" in out
    assert "loss.png" in out
    assert metrics["summary"] == summary


def test_regression_plot_is_labelled_and_scaled_for_its_metric() -> None:
    s = parse_scenario({"name": "regress", "nodes": 3, "rounds": 4})
    metrics = build_metrics(s, _regression_nodes(), wall_seconds=1.0, mode="test")
    fig = metric_figure(metrics)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "test loss"
    assert "loss per node" in ax.get_title()
    # 4002 .. 15.6: more than two decades, all positive: a log axis, not accuracy's 0..1.
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low < 15.625 and high > 4002
    assert ax.get_legend().get_texts()[0].get_text() == "mean"


def test_classification_report_is_unchanged(tmp_path: Path) -> None:
    s = parse_scenario({"name": "classify", "nodes": 3, "rounds": 4})
    metrics = write_report(
        tmp_path, s, _classification_nodes(), wall_seconds=1.0, mode="test", console=None
    )
    assert (tmp_path / "accuracy.png").exists() and plot_name(metrics) == "accuracy.png"
    final = metrics["summary"]["final"]
    assert final["accuracy_mean"] == pytest.approx(0.67)
    assert (final["accuracy_min"], final["accuracy_max"]) == pytest.approx((0.66, 0.68))
    assert final["metric"] == "accuracy" and final["metrics_mean"]["loss"] == pytest.approx(0.25)
    assert metrics["summary"]["per_round"][0]["loss_mean"] == pytest.approx(1.0)
    text = text_of(summary_table(metrics))
    header = next(line for line in text.splitlines() if "round" in line)
    columns = [c.strip() for c in header.replace("┃", "|").split("|") if c.strip()]
    assert columns == ["round", "nodes", "acc mean", "acc min", "acc max", "loss", "sent (all)"]
    assert "final accuracy mean 0.670 (min 0.660, max 0.680), loss 0.250" in text
    ax = metric_figure(metrics).axes[0]
    assert ax.get_ylabel() == "test accuracy"
    low, high = ax.get_ylim()  # fitted to the values (issue 18), inside 0..1
    assert low > 0.0 and high <= 1.0


def test_an_odd_metric_name_does_not_become_a_path() -> None:
    assert plot_name({"summary": {"primary_metric": "../../etc/x"}}) == "metrics.png"
    assert plot_name({"summary": {"primary_metric": None}}) == "metrics.png"
    assert plot_name({"summary": {"primary_metric": "r2"}}) == "r2.png"


def test_progress_note_uses_the_primary_metric() -> None:
    progress = RoundProgress(Console(file=io.StringIO()), "x", rounds=4, nodes=3)
    reg = [n["rounds"][-1] for n in _regression_nodes(2).values()]
    assert progress.note(reg) == "mean loss 16.125 (2/3 nodes)"
    cls = [n["rounds"][0] for n in _classification_nodes(3).values()]
    assert progress.note(cls) == "mean acc 0.550"
    assert progress.note([]) == ""


# --- p2pfl status ----------------------------------------------------------------------------


def test_status_shows_every_metric_and_the_round_timing() -> None:
    row = _row(6, {"loss": 0.0421, "mae": 0.173})
    text = text_of(render_status({"history": [row]}))
    assert "round 6: loss 0.0421, mae 0.1730" in text
    assert "accuracy" not in text
    assert "train 250ms · encode 4.0ms · aggregate 1.0ms · eval 20ms" in text
    cls = text_of(render_status({"history": [_row(2, {"loss": 0.31, "accuracy": 0.9123})]}))
    assert "round 2: accuracy 0.9123, loss 0.3100" in cls
    # A row without metrics or timing (a failed evaluation, an older node) still renders.
    bare = text_of(render_status({"history": [{"round": 3, "metrics": {}}]}))
    assert "round 3: no metrics" in bare and "round timing" not in bare


# --- end to end: real nodes with a regression model, in one process --------------------------


class LinearRegression:
    """y = x.w + b by SGD on the mean squared error; reports loss (MSE) and mae."""

    def __init__(self, n_features: int) -> None:
        self._p = np.zeros(n_features + 1, dtype=np.float32)
        self._v = np.zeros_like(self._p)

    @property
    def num_params(self) -> int:
        return int(self._p.size)

    def get_params(self) -> np.ndarray:
        return self._p.copy()

    def set_params(self, params: np.ndarray) -> None:
        if params.shape != self._p.shape or not np.isfinite(params).all():
            raise ValueError("bad parameters")
        self._p[:] = params

    def _predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x @ self._p[:-1] + self._p[-1])

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        rng: np.random.Generator,
    ) -> float:
        loss = 0.0
        for _ in range(epochs):
            for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // batch_size)):
                err = self._predict(x[idx]) - y[idx]
                loss = float(np.mean(err**2))
                grad = np.append(2 * x[idx].T @ err / len(idx), 2 * err.mean())
                self._v = (0.9 * self._v + grad).astype(np.float32)
                self._p -= lr * self._v
        return loss

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        err = self._predict(x) - y
        return {"loss": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}

    def get_optimizer_state(self) -> dict[str, np.ndarray]:
        return {"v": self._v.copy()}

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self._v = np.asarray(state["v"], dtype=np.float32).copy()

    def reset_optimizer(self) -> None:
        self._v[:] = 0


def _regression_data(index: int) -> Dataset:
    rng = np.random.default_rng(index)
    w = np.array([2.0, -1.0, 0.5], dtype=np.float32)
    x = rng.normal(size=(120, 3)).astype(np.float32)
    xt = rng.normal(size=(60, 3)).astype(np.float32)
    y, yt = x @ w + 3.0, xt @ w + 3.0
    return Dataset(f"regress-{index}", x, y, xt, yt, n_classes=1)  # type: ignore[arg-type]


async def test_regression_nodes_end_to_end_through_report_and_status(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    nodes = []
    for i in range(3):
        cfg = NodeConfig(
            data_dir=tmp_path / f"n{i}",
            listen=f"mem:r{i}",
            peers=tuple(f"mem:r{j}" for j in range(3) if j != i),
            rounds=4,
            min_peers=2,
            lr=0.05,
            epochs=3,
        ).validated()
        ident = Identity.from_seed(bytes([60 + i]) * 32)
        nodes.append(
            Node(
                cfg,
                model=lambda c: LinearRegression(3),
                data=_regression_data(i),
                identity=ident,
                transport=MemoryTransport(network, ident, f"mem:r{i}"),
                train_in_thread=False,
                control_socket=False,
            )
        )
    await run_until_done(nodes)
    # What the node wrote to disk is what the report reads after a failed run.
    lines = (tmp_path / "n0" / "metrics.jsonl").read_text().splitlines()
    assert [set(json.loads(line)["metrics"]) for line in lines] == [{"loss", "mae"}] * 4
    records = {f"n{i}": {"peer_id": n.id, "rounds": n.history} for i, n in enumerate(nodes)}
    s = parse_scenario({"name": "linreg", "nodes": 3, "rounds": 4})
    metrics = write_report(tmp_path, s, records, wall_seconds=1.0, mode="in-process", console=None)
    per_round = metrics["summary"]["per_round"]
    assert metrics["summary"]["primary_metric"] == "loss"
    losses = [r["metrics_mean"]["loss"] for r in per_round]
    assert losses[-1] < losses[0] / 4  # the federation learned the line
    assert all(r["accuracy_mean"] is None for r in per_round)
    assert set(per_round[-1]["timing_mean"]) == {"train_s", "encode_s", "aggregate_s", "eval_s"}
    assert (tmp_path / "loss.png").exists()
    table = text_of(summary_table(metrics))
    assert "loss mean" in table and "mae" in table and "CPU per round: train" in table
    status = text_of(render_status(nodes[0].status()))
    assert "round 3: loss " in status and ", mae " in status and "round timing" in status


def test_with_privacy_the_plot_has_an_epsilon_axis_up_to_the_budget() -> None:
    s = parse_scenario({"name": "private", "nodes": 3, "rounds": 4})
    nodes = _classification_nodes()
    for rec in nodes.values():
        for r in rec["rounds"]:
            r["privacy"] = {"epsilon": 0.5 * r["round"], "budget": 4.0, "delta": 1e-5}
    metrics = build_metrics(s, nodes, wall_seconds=1.0, mode="test")
    fig = metric_figure(metrics)
    ax, eps = fig.axes
    assert ax.get_ylabel() == "test accuracy"
    assert "epsilon" in eps.get_ylabel()
    (line,) = eps.get_lines()
    assert list(line.get_ydata()) == [0.5, 1.0, 1.5, 2.0]
    assert eps.get_ylim()[1] >= 4.0  # the budget is in view
    plain = metric_figure(build_metrics(s, _classification_nodes(), wall_seconds=1.0, mode="test"))
    assert len(plain.axes) == 1  # no privacy, no second axis
