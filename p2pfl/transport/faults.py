"""Fault injection around any transport: lossy, slow, garbling or partitioned links.

A `FaultPlan` is a list of rules. Each rule has a kind, a probability, the remote
peers it concerns (None = all), the local nodes that apply it (None = every node that
loads the plan) and a half-open range of the *local* node's rounds [from_round,
to_round) in which it is active; a rule "heals" when its range ends.

Kinds, all applied by the sending side to its outgoing payloads unless noted:

    drop       the payload is not sent
    delay      sent `delay` +/- uniform `jitter` seconds later. The link stays FIFO like
               a TCP stream (a message never overtakes an earlier one), and delays
               pipeline: a delayed message does not hold up the node's other links, nor
               later messages on this link beyond their own due time. At most
               MAX_IN_FLIGHT messages per link are in flight; then `send` blocks, so
               backpressure from a reader that does not read is preserved.
    duplicate  sent twice
    reorder    held back and sent right after the next payload on the link
    truncate   cut to a random shorter length (inside a well-formed frame: the stream
               stays in sync, so each mangled message is seen and counted separately)
    corrupt    `flips` random bytes XORed with random non-zero values (same framing note)
    cut        partition: while active, sends to and receives from those peers are
               discarded (a black hole: heartbeats notice), and new connections with
               them are refused in both directions
    stall      the receiving side stops reading from those peers (a slow consumer);
               probability is ignored

Decisions are sans-IO (`LinkFaults`) and drawn from a generator seeded by (seed, local
id, peer id, n-th connection to that peer), so the n-th payload on a link always meets
the same fate and a failing run can be replayed. Trio deliberately randomizes task
order, so how *different* links interleave may still vary from run to run.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from p2pfl.transport.base import (
    Connection,
    ConnectionClosed,
    ConnectionHandler,
    Transport,
    TransportLimits,
)

log = logging.getLogger("p2pfl.faults")

FAULT_KINDS = ("drop", "delay", "duplicate", "reorder", "truncate", "corrupt", "cut", "stall")
# Within one payload, active rules apply in this order whatever their order in the file.
_APPLY_ORDER = ("drop", "duplicate", "truncate", "corrupt", "reorder", "delay")
MAX_IN_FLIGHT = 16  # delayed messages per link before `send` blocks (like MemoryNetwork)
STALL_POLL = 0.1  # seconds between checks whether a stall rule has ended
_RULE_KEYS = (
    "kind",
    "probability",
    "delay",
    "jitter",
    "flips",
    "peers",
    "on",
    "from_round",
    "to_round",
)


class FaultPlanError(ValueError):
    """A fault plan is wrong; `path` names the offending field (`rules[2].delay`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass(frozen=True)
class FaultRule:
    kind: str
    probability: float = 1.0
    delay: float = 0.0  # seconds (kind "delay")
    jitter: float = 0.0  # seconds, uniform in [-jitter, +jitter] (kind "delay")
    flips: int = 1  # bytes changed per corrupted payload (kind "corrupt")
    peers: frozenset[str] | None = None  # remote peer ids; None = every peer
    on: frozenset[str] | None = None  # local node ids applying it; None = every node
    from_round: int = 0
    to_round: int | None = None  # exclusive; None = until the end of the run

    def __post_init__(self) -> None:
        _check_rule(self)

    def active(self, round: int, peer: str) -> bool:
        if round < self.from_round or (self.to_round is not None and round >= self.to_round):
            return False
        return self.peers is None or peer in self.peers

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if value != f.default:
                d[f.name] = sorted(value) if isinstance(value, frozenset) else value
        return d


@dataclass(frozen=True)
class FaultPlan:
    rules: tuple[FaultRule, ...] = ()

    def for_node(self, local_id: str) -> FaultPlan:
        """The rules this node applies (those without `on`, or naming it)."""
        return FaultPlan(tuple(r for r in self.rules if r.on is None or local_id in r.on))

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}


def _check_rule(rule: FaultRule) -> None:
    """Raise FaultPlanError whose path is the offending key of the rule."""

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise FaultPlanError(key, message)

    check(
        rule.kind in FAULT_KINDS,
        "kind",
        f"unknown kind {rule.kind!r}; choose one of {', '.join(FAULT_KINDS)}",
    )
    check(0.0 <= rule.probability <= 1.0, "probability", "must be in [0, 1]")
    check(
        rule.kind not in ("cut", "stall") or rule.probability == 1.0,
        "probability",
        f"a {rule.kind} is all or nothing (leave probability at 1)",
    )
    check(math.isfinite(rule.delay) and rule.delay >= 0, "delay", "must be >= 0 seconds")
    check(math.isfinite(rule.jitter) and rule.jitter >= 0, "jitter", "must be >= 0 seconds")
    check(
        rule.kind != "delay" or rule.delay > 0 or rule.jitter > 0,
        "delay",
        "a delay rule needs delay > 0 or jitter > 0",
    )
    check(
        rule.kind == "delay" or not (rule.delay or rule.jitter),
        "delay",
        "only used with kind = 'delay'",
    )
    check(rule.flips >= 1, "flips", "must be >= 1")
    check(rule.from_round >= 0, "from_round", "must be >= 0")
    check(
        rule.to_round is None or rule.to_round > rule.from_round,
        "to_round",
        f"must be > from_round ({rule.from_round})",
    )
    for key in ("peers", "on"):
        ids = getattr(rule, key)
        check(
            ids is None or (bool(ids) and all(isinstance(p, str) and p for p in ids)),
            key,
            "must be a non-empty list of peer ids (leave it out for all)",
        )


# ---- plan files ------------------------------------------------------------------------


def parse_fault_plan(doc: Any) -> FaultPlan:
    """Validate a decoded `{"rules": [...]}` document (TOML `[[rules]]` or JSON)."""
    if not isinstance(doc, Mapping):
        raise FaultPlanError("", f"expected a table with a 'rules' list, got {doc!r}")
    unknown = [k for k in doc if k != "rules"]
    if unknown:
        raise FaultPlanError(unknown[0], "unknown key; the only top-level key is 'rules'")
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, list):
        raise FaultPlanError("rules", "expected a list of rule tables")
    return FaultPlan(tuple(_parse_rule(r, f"rules[{i}]") for i, r in enumerate(raw_rules)))


def _parse_rule(raw: Any, path: str) -> FaultRule:
    if not isinstance(raw, Mapping):
        raise FaultPlanError(path, f"expected a table, got {raw!r}")
    for key in raw:
        if key not in _RULE_KEYS:
            raise FaultPlanError(f"{path}.{key}", f"unknown key; known: {', '.join(_RULE_KEYS)}")
    if "kind" not in raw:
        raise FaultPlanError(f"{path}.kind", "is required")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}"
        if key == "kind":
            if not isinstance(value, str):
                raise FaultPlanError(where, f"expected a string, got {value!r}")
        elif key in ("probability", "delay", "jitter"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FaultPlanError(where, f"expected a number, got {value!r}")
            value = float(value)
        elif key in ("peers", "on"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise FaultPlanError(where, "expected a list of peer id strings")
            value = frozenset(value)
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise FaultPlanError(where, f"expected an integer, got {value!r}")
        values[key] = value
    try:
        return FaultRule(**values)
    except FaultPlanError as exc:
        message = str(exc).split(": ", 1)[-1]
        raise FaultPlanError(f"{path}.{exc.path}", message) from None


def load_fault_plan(path: Path | str) -> FaultPlan:
    """Read a plan from a `.json` file or (any other suffix) a TOML file."""
    p = Path(path)
    try:
        if p.suffix == ".json":
            doc = json.loads(p.read_text())
        else:
            with p.open("rb") as f:
                doc = tomllib.load(f)
    except FileNotFoundError:
        raise FaultPlanError("", f"fault plan {p} does not exist") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FaultPlanError("", f"fault plan {p} cannot be parsed: {exc}") from None
    try:
        return parse_fault_plan(doc)
    except FaultPlanError as exc:
        raise FaultPlanError(exc.path, f"{exc} (in {p})") from None


def dump_fault_plan(plan: FaultPlan, path: Path | str) -> None:
    """Write a plan as JSON (what the scenario runner hands each node with `--faults`)."""
    Path(path).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")


# ---- decisions (sans-IO) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Emit:
    """Hand `payload` to the real connection at time `at` (or right away if past)."""

    payload: bytes
    at: float


def link_rng(seed: int, local_id: str, peer_id: str, index: int) -> np.random.Generator:
    """The generator for the `index`-th connection between two nodes, as seen by local_id."""

    def h(s: str) -> int:
        return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")

    return np.random.default_rng([seed & (2**64 - 1), h(local_id), h(peer_id), index])


@dataclass
class LinkFaults:
    """What happens to each payload on one connection: a pure function of the rules,
    the round, the payload and the link's seeded generator."""

    rules: Sequence[FaultRule]
    peer_id: str
    rng: np.random.Generator
    stats: Counter[str] = field(default_factory=Counter)
    _held: list[bytes] | None = None
    _last_at: float = -math.inf

    def _active(self, round: int, kind: str) -> list[FaultRule]:
        return [r for r in self.rules if r.kind == kind and r.active(round, self.peer_id)]

    def is_cut(self, round: int) -> bool:
        return bool(self._active(round, "cut"))

    def is_stalled(self, round: int) -> bool:
        return bool(self._active(round, "stall"))

    def deliver(self, round: int) -> bool:
        """Should a payload just received from the peer reach the node?"""
        if self.is_cut(round):
            self.stats["cut_received"] += 1
            return False
        return True

    def on_send(self, now: float, round: int, payload: bytes) -> list[Emit]:
        """The payloads to put on the wire for one `send`, in order, with their times."""
        if self.is_cut(round):
            self.stats["cut_sent"] += 1
            return []
        out = [payload]
        delay = 0.0
        hold = False
        for kind in _APPLY_ORDER:
            for rule in self._active(round, kind):
                # One draw per active rule and payload, fired or not: the fate of the
                # n-th payload never depends on what happened to earlier ones.
                fires = bool(self.rng.random() < rule.probability)
                if not fires or not out:
                    continue
                self.stats[_STAT[kind]] += 1
                if kind == "drop":
                    out = []
                elif kind == "duplicate":
                    out = out + out
                elif kind == "truncate":
                    out = [p[: int(self.rng.integers(0, len(p)))] if p else p for p in out]
                elif kind == "corrupt":
                    out = [_corrupt(p, rule.flips, self.rng) for p in out]
                elif kind == "reorder":
                    hold = True
                else:  # delay
                    jitter = self.rng.uniform(-rule.jitter, rule.jitter) if rule.jitter else 0.0
                    delay += max(0.0, rule.delay + jitter)
        if hold and self._held is None:
            self._held, out = out, []
        elif out and self._held is not None:
            out, self._held = out + self._held, None
        if not out:
            return []
        at = max(now + delay, self._last_at)  # FIFO, like a stream
        self._last_at = at
        return [Emit(p, at) for p in out]


_STAT = {
    "drop": "dropped",
    "duplicate": "duplicated",
    "truncate": "truncated",
    "corrupt": "corrupted",
    "reorder": "reordered",
    "delay": "delayed",
}


def _corrupt(payload: bytes, flips: int, rng: np.random.Generator) -> bytes:
    if not payload:
        return payload
    buf = np.frombuffer(payload, dtype=np.uint8).copy()
    where = rng.integers(0, buf.size, size=flips)
    buf[where] ^= rng.integers(1, 256, size=flips, dtype=np.uint8)
    return buf.tobytes()


# ---- I/O: the wrappers ---------------------------------------------------------------


class FaultyConnection:
    """A Connection whose traffic goes through a LinkFaults; same interface as the inner."""

    def __init__(
        self,
        inner: Connection,
        link: LinkFaults,
        current_round: Callable[[], int],
        nursery: trio.Nursery | None,
        *,
        crashed: Callable[[], bool] = lambda: False,
        on_close: Callable[[LinkFaults], None] = lambda link: None,
    ) -> None:
        self.inner = inner
        self.link = link
        self._on_close = on_close
        self._round = current_round
        self._nursery = nursery
        self._crashed = crashed
        self._queue_send, self._queue_recv = trio.open_memory_channel[Emit](MAX_IN_FLIGHT)
        self._in_flight = 0
        self._pump_scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    @property
    def remote_address(self) -> str:
        return self.inner.remote_address

    @property
    def outbound(self) -> bool:
        return self.inner.outbound

    def __repr__(self) -> str:
        return f"<FaultyConnection around {self.inner!r}>"

    async def send(self, payload: bytes) -> None:
        if self._closed or self._error is not None:
            await trio.lowlevel.checkpoint()
            raise ConnectionClosed(f"connection to {self.peer_id} is closed") from self._error
        if self._crashed():
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        for emit in self.link.on_send(now, self._round(), payload):
            if self._nursery is None:  # no pump (dialed before listen): delay inline
                await trio.sleep_until(emit.at)
                await self.inner.send(emit.payload)
            elif emit.at <= now and self._in_flight == 0:
                await self.inner.send(emit.payload)
            else:
                self._start_pump(self._nursery)
                self._in_flight += 1
                try:
                    await self._queue_send.send(emit)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._in_flight -= 1
                    raise ConnectionClosed(f"connection to {self.peer_id} is closed") from exc
        await trio.lowlevel.checkpoint()

    def _start_pump(self, nursery: trio.Nursery) -> None:
        if self._pump_scope is None:
            self._pump_scope = trio.CancelScope()
            nursery.start_soon(self._pump, self._pump_scope)

    async def _pump(self, scope: trio.CancelScope) -> None:
        """Deliver delayed payloads at their due times; never raises into the nursery."""
        with scope:
            try:
                async for emit in self._queue_recv:
                    await trio.sleep_until(emit.at)
                    try:
                        if not self._crashed():
                            await self.inner.send(emit.payload)
                    except (
                        ConnectionClosed,
                        trio.BrokenResourceError,
                        trio.ClosedResourceError,
                        OSError,
                    ) as exc:
                        self._error = exc
                        return
                    finally:
                        self._in_flight -= 1
            finally:
                self._queue_recv.close()  # a sender blocked on a full queue gets an error

    async def receive(self) -> bytes:
        while True:
            while self.link.is_stalled(self._round()) and not self._crashed():
                await trio.sleep(STALL_POLL)
            payload = await self.inner.receive()
            if self._crashed():
                continue
            if self.link.deliver(self._round()):
                return payload

    async def aclose(self) -> None:
        if not self._closed:
            self._on_close(self.link)
        self._closed = True
        self._queue_send.close()
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        await self.inner.aclose()


class FaultyTransport:
    """Wraps a Transport so every connection it makes or accepts is a FaultyConnection.

    The node passes `current_round` (its round machine's round) so rules switch on and
    off with rounds. `stats` counts every injected fault across all links.
    """

    def __init__(
        self,
        inner: Transport,
        plan: FaultPlan,
        *,
        local_id: str,
        current_round: Callable[[], int],
        seed: int,
    ) -> None:
        self.inner = inner
        self.plan = plan.for_node(local_id)
        self._local = local_id
        self._round = current_round
        self._seed = seed
        self._nursery: trio.Nursery | None = None
        self._connections: Counter[str] = Counter()
        self._crashed = False
        self.stats: Counter[str] = Counter()
        self.links: list[LinkFaults] = []

    @property
    def local_id(self) -> str:
        return self.inner.local_id

    def set_limits(self, limits: TransportLimits) -> None:
        self.inner.set_limits(limits)

    def crash(self) -> None:
        """From now on nothing goes out or comes in, and dials fail: the in-process
        stand-in for SIGKILL, so a node's goodbye never reaches anyone."""
        self._crashed = True

    def is_cut(self, peer_id: str) -> bool:
        if self._crashed:
            return True
        round = self._round()
        return any(r.kind == "cut" and r.active(round, peer_id) for r in self.plan.rules)

    def counts(self) -> dict[str, int]:
        """All injected faults so far (links' decisions plus refused connections)."""
        total = Counter(self.stats)
        for link in self.links:
            total.update(link.stats)
        return dict(sorted(total.items()))

    def _wrap(self, conn: Connection) -> FaultyConnection:
        peer = conn.peer_id
        index = self._connections[peer]
        self._connections[peer] += 1
        rules = [r for r in self.plan.rules if r.peers is None or peer in r.peers]
        link = LinkFaults(rules, peer, link_rng(self._seed, self._local, peer, index))
        self.links.append(link)
        return FaultyConnection(
            conn,
            link,
            self._round,
            self._nursery,
            crashed=lambda: self._crashed,
            on_close=self._closed_link,
        )

    def _closed_link(self, link: LinkFaults) -> None:
        """A closed connection's counts join the totals and its state goes: a node under
        churn must not keep every connection it ever had (a generator and counters each)."""
        self.stats.update(link.stats)
        self.links.remove(link)

    async def listen(
        self,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen through the inner transport; this nursery also runs the delay pumps."""

        async def accept(conn: Connection) -> None:
            if self.is_cut(conn.peer_id):
                self.stats["cut_accepts"] += 1
                await conn.aclose()
                return
            await handler(self._wrap(conn))

        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                addresses = await nursery.start(functools.partial(self.inner.listen, accept))
                task_status.started(addresses)
        except BaseExceptionGroup as group:  # surface e.g. EADDRINUSE unwrapped
            leaf = _single(group)
            if leaf is None or isinstance(leaf, trio.Cancelled):
                raise
            raise leaf from None
        finally:
            self._nursery = None

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        if expected_peer_id is not None and self.is_cut(expected_peer_id):
            await trio.lowlevel.checkpoint()
            self.stats["cut_dials"] += 1
            raise OSError(errno.EHOSTUNREACH, f"fault plan: link to {address} is cut")
        conn = await self.inner.connect(address, expected_peer_id)
        if self.is_cut(conn.peer_id):
            self.stats["cut_dials"] += 1
            with trio.CancelScope(shield=True):
                await conn.aclose()
            raise OSError(errno.EHOSTUNREACH, f"fault plan: link to {address} is cut")
        return self._wrap(conn)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        if len(leaf.exceptions) != 1:
            return None
        leaf = leaf.exceptions[0]
    return leaf
