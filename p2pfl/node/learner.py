"""The node's learning: its data and model, local training, evaluation and records.

Kept apart from the daemon so that nothing here ever runs on the event loop when it
could stall it: training runs in a worker thread, and so do evaluation and the metrics
and checkpoint writes, strictly in order (one record task fed by a channel). A model
that fails, or training that diverges, costs that round's work, never the node. The
learner knows nothing of peers or rounds' rules: the daemon tells it what to train,
evaluate and save.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from p2pfl.aggregation import AggregationRule, make_rule
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.datadir import DataDir
from p2pfl.learning import Dataset, Model
from p2pfl.learning.attacks import Attack, make_attack
from p2pfl.learning.datasets import MissingExtra
from p2pfl.learning.fingerprint import fingerprint
from p2pfl.learning.outer import OuterOptimizer
from p2pfl.learning.personal import Ditto, local_split
from p2pfl.learning.plugins import PluginError, resolve_data, resolve_model
from p2pfl.learning.worker_momentum import WorkerMomentum
from p2pfl.logs import event
from p2pfl.node.participation import Participation, parse_conditions
from p2pfl.node.records import Done, Evaluate, RecordItem, RecordQueue, Save
from p2pfl.privacy.examples import ExampleLevelDP
from p2pfl.privacy.node import NodePrivacy
from p2pfl.storage import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from p2pfl.supervision import Supervisor
from p2pfl.units import format_bytes

log = logging.getLogger("p2pfl.node")

CHECKPOINT_FILE = "checkpoint.msgpack"
METRICS_FILE = "metrics.jsonl"


SHUTDOWN_RECORD_GRACE = 10.0  # seconds to write queued records when the node stops
# Rows of per-round metrics kept in memory, in status and in the checkpoint. The whole
# record is metrics.jsonl (appended, never rewritten; `all_rows` reads it): a daemon
# that runs for months must not grow, nor rewrite a growing checkpoint every round. A
# row costs about 2.5 KiB as Python objects, so 1000 of them (the first bound) were a
# plateau of 2.5 MiB that a 10-minute soak could not tell from a leak.
HISTORY_KEPT = 100


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file by round (the last one written for a round wins);
    a torn or foreign line (a crash mid-append, an edit) is skipped, not fatal."""
    by_round: dict[int, dict[str, Any]] = {}
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            by_round[row["round"]] = row
    return [by_round[r] for r in sorted(by_round)]


class Learner:
    """Data, model (and its evaluation twin), training and the ordered records."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        model: Model | Callable[[NodeConfig], Model] | None,
        data: Dataset | None,
        supervisor: Supervisor,
        counters: Counter[str],
        threaded: bool,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.counters = counters
        # Training, evaluation and writes in worker threads (a real node), or inline (a
        # simulation, so a mock clock stays deterministic).
        self.threaded = threaded
        # The device's data and model: given by a program (`p2pfl.run_node`), or named by
        # the config (a built-in, a .npz/.csv file, or an import string).
        self.data = data if data is not None else self._resolve_data()
        # What status calls the model: the config's name, or the class a program gave.
        self.model_name = config.model if model is None else f"{type(model).__name__} (given)"
        self.model = self._build_model(model)
        # Evaluation uses its own instance so it never races a training thread.
        self.eval_model = self._build_model(model, second=True)
        self.fingerprint = fingerprint(self.model, self.data)
        ds = self.data
        self.attack = self._make_attack()
        self._x, self._y = ds.x_train, ds.y_train
        # Personalization (Ditto): a personal model beside the shared one, evaluated on a
        # test split held out from our own shard, which neither model trains on.
        self.personal = self._make_personal(model)
        self._x_test, self._y_test = ds.x_test, ds.y_test
        # The weight our update claims: a model that brings its own data says how much.
        self.samples = int(getattr(self.model, "num_samples", None) or len(self._y))
        # The labels trained on once the attack starts (label_flip's poisoned ones).
        self._y_attack = self._y
        if self.attack is not None:
            self._y_attack = self.attack.poison_labels(self._y, ds.n_classes)
        self._round_start: tuple[int, np.ndarray] | None = None  # (round, model trained from)
        # Round-level momentum of what we send (off at 0; learning/worker_momentum.py).
        self.worker_momentum = (
            WorkerMomentum(config.worker_momentum) if config.worker_momentum > 0 else None
        )
        # FedProx's proximal term in local training, and the outer optimizer that turns
        # the round's aggregate into our next model (learning/outer.py; None = FedAvg).
        self._set_proximal(config.prox_mu)
        self.outer = (
            None
            if config.outer == "fedavg"
            else OuterOptimizer(
                config.outer,
                lr=config.outer_lr,
                beta1=config.outer_beta1,
                beta2=config.outer_beta2,
                tau=config.outer_tau,
            )
        )
        # The rule runs in a worker thread; a checkpoint or a catch-up may read the
        # outer state meanwhile, and must never copy half a step.
        self._outer_lock = threading.Lock()
        # Device-aware participation: train only when the device allows it (None = always).
        self.participation = self._make_participation()
        # Node-level DP on what leaves the node, and its budget (None = off).
        self.privacy = NodePrivacy.from_config(config)
        # Example-level DP-SGD inside local training (None = off).
        self.dp_sgd = ExampleLevelDP.attach(self.model, config, len(self._y))
        # Neighbours' last deltas and who sent them (attacks only).
        self._overheard: np.ndarray | None = None
        self._overheard_from: tuple[str, ...] = ()

        self.datadir: DataDir | None = None  # set by `resume`
        self.history: list[dict[str, Any]] = []
        self.done = trio.Event()
        # Records queue up for the record task once the node runs (threaded only).
        self.running = False
        self._records = RecordQueue()
        self._records_ready = trio.Event()
        self._skip_logged = False
        self._last_eval_s = 0.0
        self._train_lock = trio.Lock()

    # ---- construction helpers ----------------------------------------------------------

    def _resolve_data(self) -> Dataset:
        try:
            return resolve_data(self.config.dataset, self.config)
        except (MissingExtra, PluginError) as exc:  # one line; names the fix
            raise ConfigError("dataset", str(exc)) from None

    def _build_model(
        self, given: Model | Callable[[NodeConfig], Model] | None, *, second: bool = False
    ) -> Model:
        """Our model, or (`second`) an independent twin of it for evaluation.

        A factory or a config name builds both the same way; a model object given by a
        program is deep-copied for its twin.
        """
        if given is None:
            try:
                return resolve_model(self.config.model, self.config, self.data)
            except PluginError as exc:
                raise ConfigError("model", str(exc)) from None
        if isinstance(given, Model):
            if not second:
                return given
            try:
                return copy.deepcopy(given)
            except Exception as exc:
                raise ConfigError(
                    "model",
                    f"the model object cannot be copied for evaluation ({exc}); "
                    "pass a factory (a function of the config) instead",
                ) from None
        built = given(self.config)
        if not isinstance(built, Model):
            raise ConfigError("model", f"the model factory returned {type(built).__name__}")
        return built

    def _make_attack(self) -> Attack | None:
        cfg = self.config
        if not cfg.attack:
            return None
        try:
            # The tailored attack optimises against the rule the federation aggregates
            # with, which in a study is this node's own.
            rule = (
                make_rule(cfg.aggregation, f=cfg.tolerate, options=cfg.aggregation_options)
                if cfg.attack == "tailored"
                else None
            )
            return make_attack(
                cfg.attack,
                options=dict(cfg.attack_options),
                n=cfg.nodes,
                f=cfg.tolerate,
                start_round=cfg.attack_start_round,
                rule=rule,
            )
        except ValueError as exc:
            raise ConfigError("attack", str(exc)) from None

    def _make_personal(self, model: Model | Callable[[NodeConfig], Model] | None) -> Ditto | None:
        cfg = self.config
        if cfg.personalize not in ("ditto", "head"):
            return None
        seed = cfg.seed * 1_000_003 + cfg.node_index
        self._x, self._y, x_test, y_test = local_split(
            self._x, self._y, cfg.personal_test_fraction, seed
        )
        try:
            return Ditto(
                self._build_model(model, second=True),
                self._build_model(model, second=True),
                x_test,
                y_test,
                lam=cfg.personal_lambda,
                part="head" if cfg.personalize == "head" else "all",
            )
        except ValueError as exc:
            raise ConfigError("personalize", str(exc)) from None

    def _make_participation(self) -> Participation | None:
        if not self.config.train_when:
            return None
        try:
            return Participation(parse_conditions(self.config.train_when))
        except ValueError as exc:  # a condition that needs psutil, without it
            raise ConfigError("train_when", str(exc)) from None

    def _may_train(self, round: int) -> bool:
        """Check the device's conditions; say it once each time the answer changes."""
        assert self.participation is not None
        ok = self.participation.check()
        if self.participation.changed:
            if ok:
                log.info("round %d: conditions met again, training", round,
                         extra=event("participation.training", round=round))  # fmt: skip
            else:
                log.info(
                    "round %d: not training (%s); still serving peers and aggregating",
                    round,
                    self.participation.reason,
                    extra=event(
                        "participation.idle", round=round, reason=self.participation.reason
                    ),
                )
        return ok

    def _set_proximal(self, mu: float) -> None:
        """Hand FedProx's mu to the model; a model without the hook cannot honour it,
        which must be said at start-up rather than silently train plain FedAvg."""
        if mu == 0:
            return
        set_proximal = getattr(self.model, "set_proximal", None)
        if set_proximal is None:
            raise ConfigError(
                "prox_mu",
                f"the model {self.model_name} has no set_proximal(mu) for FedProx; "
                "set prox_mu = 0 or use a built-in or the PyTorch adapter",
            )
        set_proximal(mu)

    def resume(self, datadir: DataDir) -> Checkpoint | None:
        """Take the data dir the records go to; load its checkpoint, if any, into the
        model, optimizer and history (the caller restores the rest of its state)."""
        self.datadir = datadir
        ckpt = self._load_checkpoint(datadir)
        if self.privacy is not None:  # the spent budget, whatever became of the checkpoint
            self.privacy.attach(datadir, 0 if ckpt is None else ckpt.round)
        if self.dp_sgd is not None and ckpt is not None:  # the rounds trained before
            self.dp_sgd.rounds = ckpt.round
        if ckpt is not None:
            log.info(
                "resuming from checkpoint at round %d",
                ckpt.round,
                extra=event("checkpoint.resumed", round=ckpt.round),
            )
            self.model.set_params(ckpt.params)
            if ckpt.optimizer:
                self.model.set_optimizer_state(ckpt.optimizer)
            self.history = ckpt.history[-HISTORY_KEPT:]
            if self.personal is not None:
                self.personal.restore(ckpt.personal, self.model.num_params)
            if self.outer is not None:
                try:
                    loaded = self.outer.load_state(ckpt.outer, self.model.num_params)
                except ValueError as exc:
                    loaded = False
                    log.warning("checkpoint's %s; starting the outer optimizer afresh", exc)
                if not loaded and ckpt.round > 0:
                    log.info(
                        "no %s state in the checkpoint: its moments start afresh", self.outer.name
                    )
        return ckpt

    def _load_checkpoint(self, datadir: DataDir) -> Checkpoint | None:
        path = datadir.path / CHECKPOINT_FILE
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, aside)
            log.error(
                "%s; moved aside to %s, starting from the initial model",
                exc,
                aside,
                extra=event("checkpoint.unreadable", path=path, moved_to=aside, error=str(exc)),
            )
            return None
        if ckpt is not None and (
            ckpt.model != self.fingerprint.digest or ckpt.params.shape != (self.model.num_params,)
        ):
            # Never load parameters that mean something else, and never silently start
            # over on top of a federation's progress: the operator decides.
            datadir.close()
            raise ConfigError(
                "model",
                f"{path} was written for another model or task (fingerprint "
                f"{ckpt.model!r}, this node's is {self.fingerprint.digest!r}); use another "
                "--data-dir, or move the checkpoint away to start this model from scratch",
            )
        return ckpt

    # ---- training ----------------------------------------------------------------------

    def round_started(self, round: int, params: np.ndarray) -> None:
        """The model a round's training starts from (what an attack crafts against)."""
        self._round_start = (round, params)
        log.debug("round %d started", round, extra=event("round.started", round=round))

    async def train(self, round: int, params: np.ndarray) -> tuple[np.ndarray, float]:
        """Train from `params`; the new parameters and the seconds it took.

        A model that fails, or training that diverges, gives back `params` (the round
        still ends and peers are not left waiting for us). With privacy on, the result
        is clipped, noised and charged; once the budget is spent, `params` is given back
        untrained: a zero update, so peers still hear from us on time (their quorum) and
        our model keeps mixing, while nothing new about our data leaves (docs/privacy.md).
        """
        if self.privacy is not None and not self.privacy.allows(round):
            return params, 0.0
        if self.participation is not None and not self._may_train(round):
            return params, 0.0  # a zero update: peers' quorums hold, no battery spent
        seed = [self.config.seed, self.config.node_index, round]
        cfg = self.config
        y = self._y_attack if self.attacking(round) else self._y

        def work() -> tuple[np.ndarray, float]:
            self.model.set_params(params)
            loss = self.model.fit(
                self._x,
                y,
                epochs=cfg.epochs,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                rng=np.random.default_rng(seed),
            )
            if self.personal is not None:  # v from the round's shared model
                self.personal.step(
                    params, self._x, y, epochs=cfg.personal_epochs or cfg.epochs, lr=cfg.lr,
                    batch_size=cfg.batch_size, rng=np.random.default_rng([*seed, 1]),
                )  # fmt: skip
            return self.model.get_params(), loss

        async with self._train_lock:
            started = time.perf_counter()
            try:
                if self.threaded:
                    new, _loss = await trio.to_thread.run_sync(work)
                else:
                    new, _loss = work()
            except Exception as exc:
                # The model's own code failed: contain it like divergence, so the round
                # still ends and peers are not left waiting for us.
                self.supervisor.failed("training", exc)
                new = np.full_like(params, np.nan)
            seconds = time.perf_counter() - started
            if cfg.train_slowdown > 1.0:
                # A slower device (scenario fault "slow"): wait out the extra time, the
                # device still busy (the lock), the rest of the node serving meanwhile;
                # the seconds reported are the slow device's.
                await trio.sleep((cfg.train_slowdown - 1.0) * seconds)
                seconds *= cfg.train_slowdown
            if self.dp_sgd is not None:
                self.dp_sgd.rounds += 1
        if not np.isfinite(new).all():
            # Local training diverged (e.g. from a poisoned aggregate): send the model we
            # started from rather than NaNs, and restart the optimizer.
            log.warning(
                "round %d: local training diverged; keeping the round's start model",
                round,
                extra=event("round.diverged", round=round),
            )
            self.counters["training_diverged"] += 1
            self.model.reset_optimizer()
            new = params
            if self.outer is not None:
                with self._outer_lock:
                    self.outer.reset()
            if self.worker_momentum is not None:
                self.worker_momentum.reset()
        elif self.worker_momentum is not None:
            # What leaves the node (and counts as our own input) is the smoothed update.
            new = self.worker_momentum.apply(params, new)
        if self.privacy is not None:  # what leaves the node, and counts as our own input
            release = functools.partial(self.privacy.release, round, params, new)
            new = await trio.to_thread.run_sync(release) if self.threaded else release()
        return new, seconds

    def outer_rule(self, rule: AggregationRule) -> AggregationRule:
        """`rule` followed by the outer optimizer: what the round machine adopts is then
        the outer step from the round's start model along (aggregate - start). FedAvg
        gets `rule` itself, so its rounds stay exactly what they were."""
        if self.outer is None:
            return rule
        return _OuterRule(rule, self)

    def outer_step(self, aggregate: np.ndarray) -> np.ndarray:
        """The next model from the round's aggregate (called where the rule runs)."""
        if self.outer is None or self._round_start is None:
            return aggregate
        with self._outer_lock:
            return self.outer.step(self._round_start[1], aggregate)

    def outer_state(self) -> dict[str, np.ndarray]:
        """Copies of the outer optimizer's moments, for a checkpoint."""
        if self.outer is None:
            return {}
        with self._outer_lock:
            return self.outer.state()

    def attacking(self, round: int) -> bool:
        """A malicious study node in a round of its attack (honest before it starts)."""
        return self.attack is not None and self.attack.active(round)

    def outgoing(self, round: int, trained: np.ndarray) -> np.ndarray | None:
        """What we send: our model, or a malicious study node's crafted one (None = silent)."""
        if self.attack is None or not self.attack.active(round):
            return trained
        start = self._round_start[1] if self._round_start else trained
        crafted = self.attack.craft(
            start=start,
            trained=trained,
            overheard=self._overheard,
            rng=np.random.default_rng([self.config.seed, round, 7]),
            senders=self._overheard_from,
        )
        return None if crafted is None else np.asarray(crafted, np.float32)

    def overhear(self, received: Sequence[np.ndarray], senders: Sequence[str] = ()) -> None:
        """What an omniscient attacker overheard this round (`senders` name the models),
        for next round's attack. It listens before its attack starts too."""
        if self.attack is not None and received and self._round_start is not None:
            self._overheard = np.stack(received) - self._round_start[1]
            self._overheard_from = tuple(senders)

    # ---- records: evaluation, metrics lines and checkpoints, in order -------------------

    def record_round(self, params: np.ndarray, row: dict[str, Any], connected: int) -> None:
        """Evaluate a round's aggregate and write its metrics line (and history row)."""
        if self.privacy is not None:  # what this node has spent, as of this round
            row = {**row, "privacy": self.privacy.status()}
        if self.dp_sgd is not None:
            row = {**row, "privacy_examples": self.dp_sgd.status()}
        self._record(Evaluate(params, row, connected))

    def checkpoint(
        self, round: int, params: np.ndarray, compression: dict[str, np.ndarray]
    ) -> None:
        """Snapshot the state now (the next round's training may start at once), write
        it in order with the other records; its history is filled in when written.

        Only every `checkpoint_every`-th round and the last (an in-process scenario of
        1000 nodes spent more time writing checkpoints than training)."""
        every = self.config.checkpoint_every
        if every == 0 or (round % every and round != self.config.rounds):
            return
        self._record(
            Save(
                Checkpoint(
                    round,
                    params,  # replaced, never mutated, by the round machine
                    self.model.get_optimizer_state(),  # copies
                    [],
                    self.fingerprint.digest,  # what the parameters mean; resume checks it
                    compression,
                    self.outer_state(),  # copies
                    {} if self.personal is None else self.personal.state(),  # copies
                )
            )
        )

    def finish(self, rounds: int) -> None:
        """The run is done once the records queued so far are written."""
        log.info("finished %d rounds", rounds, extra=event("run.finished", rounds=rounds))
        self._record(Done())

    def _record(self, item: RecordItem) -> None:
        """Evaluate, write a metrics line or a checkpoint, or mark the run done.

        A real node does it in a worker thread, in order, so neither a large model's
        evaluation nor an fsync'd checkpoint ever stalls the event loop (heartbeats,
        other peers' messages); a simulation does it inline, so a mock clock stays
        deterministic. The queue stays bounded when the worker falls behind
        (`p2pfl.node.records`).
        """
        if self.threaded and self.running:
            skipped = self._records.evaluations_skipped
            self._records.put(item)
            if self._records.evaluations_skipped > skipped and not self._skip_logged:
                self._skip_logged = True
                log.warning(
                    "records fall behind the rounds (evaluation or disk too slow): "
                    "older rounds are written without evaluation (eval_skipped)"
                )
            self._records_ready.set()
            return
        self._finish_record(item, self._record_work(item))

    def records_status(self) -> dict[str, int]:
        """For status: what the record queue holds and what it coalesced."""
        return {
            "queued": len(self._records),
            "evaluations_skipped": self._records.evaluations_skipped,
            "checkpoints_superseded": self._records.checkpoints_superseded,
        }

    async def record_loop(self) -> None:
        item: RecordItem | None = None  # taken from the queue, not yet written
        try:
            while True:
                item = self._records.get()
                if item is None:
                    await self._records_ready.wait()
                    self._records_ready = trio.Event()
                    continue
                done = await trio.to_thread.run_sync(self._record_work, item)
                self._finish_record(item, done)
                item = None
        finally:
            # Cancelled (shutdown): what is still queued is written, in order and within a
            # bound, so a stopped node loses neither its last metrics line nor its newest
            # checkpoint (a scenario stops its nodes right after their last round).
            with trio.CancelScope(shield=True) as flush:
                flush.deadline = trio.current_time() + SHUTDOWN_RECORD_GRACE
                if item is None:
                    item = self._records.get()
                while item is not None:
                    done = await trio.to_thread.run_sync(self._record_work, item)
                    self._finish_record(item, done)
                    item = self._records.get()

    def _record_work(self, item: RecordItem) -> dict[str, Any] | None:
        """The blocking part (a worker thread for real nodes): evaluate, write."""
        assert self.datadir is not None
        if isinstance(item, Evaluate):
            skipped = item.params is None
            metrics = {} if item.params is None else self._evaluate(item.params)
            row: dict[str, Any] = {
                **item.row,
                # "loss" and "accuracy" (when reported) also at the top, as before.
                **{k: metrics[k] for k in ("accuracy", "loss") if k in metrics},
                "metrics": metrics,
            }
            eval_s = 0.0 if skipped else round(self._last_eval_s, 6)
            row["timing"] = {**row["timing"], "eval_s": eval_s}
            if skipped:
                row["eval_skipped"] = True
            self.datadir.append(METRICS_FILE, json.dumps(row))
            return row
        if isinstance(item, Save):
            # A full disk or an unusable data dir raises a FatalError, which no guard
            # contains: it ends the node with its exit code.
            path = self.datadir.path / CHECKPOINT_FILE
            save_checkpoint(path, dataclasses.replace(item.checkpoint, history=list(self.history)))
            saved = item.checkpoint.round
            log.debug(
                "checkpoint written (a restart resumes at round %d)",
                saved,
                extra=event("checkpoint.written", round=saved, path=path),
            )
        return None

    def all_rows(self) -> list[dict[str, Any]]:
        """Every round's row this data dir has recorded (metrics.jsonl; the newest row
        of a round that was recorded twice around a crash), or the in-memory history
        when that holds more (no data dir yet, or the file was removed)."""
        rows = [] if self.datadir is None else read_metrics(self.datadir.path / METRICS_FILE)
        return rows if len(rows) >= len(self.history) else list(self.history)

    def _finish_record(self, item: RecordItem, row: dict[str, Any] | None) -> None:
        """The event-loop part: history, the round's log line, done."""
        if isinstance(item, Evaluate) and row is not None:
            self.history.append(row)
            del self.history[:-HISTORY_KEPT]
            log.info(
                "round %d | %s | heard %d/%d peers%s | sent %s recv %s | %.2fs",
                row["round"],
                " ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()),
                row["peers_heard"],
                item.connected,
                " (timeout)" if row["timed_out"] else "",
                format_bytes(row["bytes_sent"]),
                format_bytes(row["bytes_received"]),
                row["seconds"],
                extra=event(
                    "round.finished",
                    round=row["round"],
                    metrics=row["metrics"],
                    peers_heard=row["peers_heard"],
                    peers_connected=item.connected,
                    timed_out=row["timed_out"],
                    bytes_sent=row["bytes_sent"],
                    bytes_received=row["bytes_received"],
                    seconds=row["seconds"],
                ),
            )
        elif isinstance(item, Done):
            self.done.set()

    def _evaluate(self, params: np.ndarray) -> dict[str, float]:
        """The model's own metrics on our test split, rounded, finite values only.

        Whatever the model reports is shown (status, metrics.jsonl, scenario table and
        plot); a model that fails to evaluate costs the metrics of that round, not the
        node.
        """
        started = time.perf_counter()
        self.eval_model.set_params(params)
        try:
            raw = dict(self.eval_model.evaluate(self._x_test, self._y_test))
            if self.personal is not None:
                raw.update(self.personal.evaluate(params, lambda m, x, y: m.evaluate(x, y)))
            metrics = {
                str(k): round(float(v), 6) for k, v in raw.items() if math.isfinite(float(v))
            }
        except Exception as exc:
            self.supervisor.failed("evaluation", exc)
            return {}
        finally:
            self._last_eval_s = time.perf_counter() - started
        return metrics


class _OuterRule:
    """An aggregation rule whose result goes through the node's outer optimizer; its
    name, counters and reports read through to the rule (status, the ledger)."""

    def __init__(self, rule: AggregationRule, learner: Learner) -> None:
        self.rule = rule
        self.learner = learner

    def __call__(self, x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
        return self.learner.outer_step(self.rule(x, weights, own))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rule, name)
