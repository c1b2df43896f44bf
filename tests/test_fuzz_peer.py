"""Authenticated fuzzer: a real peer (valid identity, mutual TLS, framing) sends every
message type with hostile field values to a live node on loopback.

Design (why not the obvious ones): `@given` around a whole `trio.run` would rebuild the
federation for every example (seconds each), and `strategy.example()` bypasses
Hypothesis's generation. Instead one federation runs for the whole test in a trio
thread (`LiveFederation`): honest `Node`s over real TCP + TLS on 127.0.0.1, plus a
hostile `TcpTransport` client with its own valid identity, connected to one of them
(the victim). An ordinary `@given` function, run in the test's thread, draws one
hostile payload per example and hands it to the trio thread (`trio.from_thread`),
so Hypothesis generates exactly as in any property test (boundary values, mixing),
and each example costs one TLS frame. Shrinking is off: after a crash every later
example fails too, so the last payloads sent are kept and printed instead.

Values are well-typed but hostile: huge, negative, empty, unparsable, future and
past rounds, other peers' ids (the victim's, an honest peer's), tensors whose shape
or dtype do not match, real compressed blobs for the wrong model, secure-aggregation
bodies of every kind. They are packed as raw msgpack maps in the codec's layout, so
values the encoder would refuse still go out. The hostile peer reconnects whenever
the victim hangs up on it (it does after too many bad messages).

The test asserts that the victim's run task never ends (no exception escapes it),
that no hostile message caused an error the supervision guard had to contain (every
one must be refused cleanly, with a counted reason), and that after the fuzzing all
honest nodes complete further rounds. CI runs a small budget with a fixed seed
(P2PFL_FUZZ_PEER_EXAMPLES, default 300 for the plain federation, a fifth of it for the
secure one; P2PFL_FUZZ_RANDOM=1 for fresh seeds). With the address check this issue
added to the codec switched off, the plain budget finds the dial ValueError it fixed.
`benchmarks/fuzz_peer.py` runs the same harness for minutes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import msgpack
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from p2pfl import PROTOCOL_VERSION
from p2pfl.compression import UpdateEncoder, parse_pipeline
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.secure.admission import PROOF_LEN, Admission
from p2pfl.secure.group_messages import (
    GROUP_MESSAGE_TYPES,
    IDENTITY_KEY_LEN,
    MAX_BOX,
    SEALED_KINDS,
    IdentityKey,
)
from p2pfl.secure.masking import SEED_LEN
from p2pfl.secure.messages import SESSION_LEN
from p2pfl.secure.round_keys import BOX_OVERHEAD, KEY_LEN, SIGNATURE_LEN, RoundKey, RoundScope
from p2pfl.secure.shamir import SHARE_LEN
from p2pfl.secure.wire import to_envelope
from p2pfl.transport.base import Connection, ConnectionClosed
from p2pfl.transport.tcp import TcpTransport, parse_address
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import MESSAGE_TYPES, Hello, Ping, SecureEnvelope

FEDERATION = "fuzz"
HOSTILE = Identity.from_seed(b"\xee" * 32)
# Our own identity key (its hash is our peer id) and membership proof (the federation
# is open: anyone can make one): with them the victim takes us for a secure neighbour
# and a valid mate, so later hostile group messages reach the protocol's checks.
OWN_IDENTITY_KEY = HOSTILE.public_bytes
OWN_PROOF = Admission(FEDERATION).prove(HOSTILE)
SEND_TIMEOUT = 20.0  # a send that blocks this long means the victim stopped reading
KEEP_LAST = 8

# ---------------------------------------------------------------- live federation


class LoopbackOnly:
    """The victim's transport: a real TcpTransport that dials loopback hosts only.

    Peers tell the victim where to dial; a made-up "a:1" or "1.2.3.4:5" must not become
    a DNS query or a packet on a real interface. Addresses that do not parse go to the
    real transport unchanged, so a dial that would raise still raises.
    """

    def __init__(self, inner: TcpTransport) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        try:
            host, _ = parse_address(address)
        except ValueError:
            return await self._inner.connect(address, expected_peer_id)
        if host != "localhost" and not _is_loopback(host):
            raise OSError(errno.ENETUNREACH, f"test: not dialing non-loopback {address}")
        return await self._inner.connect(address, expected_peer_id)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Stats:
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    reconnects: int = 0
    send_failures: int = 0
    last: collections.deque[tuple[str, bytes]] = field(
        default_factory=lambda: collections.deque(maxlen=KEEP_LAST)
    )


class LiveFederation:
    """Honest nodes + one hostile client, all in one trio loop on a background thread."""

    def __init__(self, tmp: Path, *, honest: int = 2, secure: bool = False) -> None:
        self.tmp = tmp
        self.n_honest = honest
        self.secure = secure
        self.nodes: list[Node] = []
        self.crashed: dict[str, BaseException] = {}
        self.finished: set[str] = set()
        self.stats = Stats()
        self.victim_round = 0
        # Secure sessions the victim sent us (offers, mask lists, ...): hostile setups,
        # vectors and reveals that name a real session get past the session lookup
        # into the protocol's checks.
        self.sessions: collections.deque[bytes] = collections.deque([b"\x05" * 16], maxlen=8)
        self.dim = 0
        self._conn: Connection | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)

    # -- lifecycle (called from the test's thread)

    def __enter__(self) -> LiveFederation:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError(f"federation did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(30)

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._token is not None
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    # -- the trio side

    def _config(self, i: int, peers: tuple[str, ...]) -> NodeConfig:
        return NodeConfig(
            data_dir=self.tmp / f"n{i}",
            listen="127.0.0.1:0",
            peers=peers,
            federation=FEDERATION,
            mdns=False,
            nodes=self.n_honest,
            node_index=i,
            min_peers=self.n_honest - 1,
            rounds=0,  # unbounded: rounds keep coming while the fuzzer runs
            epochs=1,
            round_timeout=1.0,
            heartbeat_interval=0.5,
            heartbeat_timeout=5.0,
            secure_aggregation=self.secure,
            group_size=3,
        ).validated()

    async def _run_node(self, node: Node, task_status: trio.TaskStatus[None]) -> None:
        try:
            await node.run(task_status=task_status)
        except trio.Cancelled:
            raise
        except BaseException as exc:  # the finding itself
            self.crashed[node.id] = exc
        finally:
            self.finished.add(node.id)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            first: str | None = None
            for i in range(self.n_honest):
                ident = Identity.from_seed(bytes([0x10 + i]) * 32)
                cfg = self._config(i, () if first is None else (first,))
                transport = LoopbackOnly(TcpTransport(ident, federation=FEDERATION))
                node = Node(
                    cfg,
                    identity=ident,
                    transport=transport,  # type: ignore[arg-type]
                    train_in_thread=False,
                    control_socket=False,
                )
                self.nodes.append(node)
                await nursery.start(self._run_node, node)
                first = first or node.listen_addresses[0]
            self.dim = self.victim.model.num_params
            self.hostile = TcpTransport(HOSTILE, federation=FEDERATION)
            self._nursery = nursery
            await self._connect()
            self._ready.set()

    @property
    def victim(self) -> Node:
        return self.nodes[0]

    async def _connect(self) -> None:
        conn = await self.hostile.connect(self.victim.listen_addresses[0], self.victim.id)
        self._conn = conn
        # The victim's own fingerprint: an incompatible hello would only get us refused.
        fp = self.victim.fingerprint.digest
        hello = Hello(HOSTILE.peer_id, self.victim_round, FEDERATION, ("127.0.0.1:9",), "0", fp)
        await conn.send(codec.encode(hello))
        if self.secure:  # as an honest node greets: our identity key, on each new link
            greeting = IdentityKey(HOSTILE.peer_id, self.victim_round, OWN_IDENTITY_KEY)
            await conn.send(codec.encode(to_envelope(greeting)))
        self._nursery.start_soon(self._drain, conn)

    async def _drain(self, conn: Connection) -> None:
        """Read (and discard) what the victim sends, remembering its round."""
        try:
            while True:
                payload = await conn.receive()
                try:
                    msg = codec.decode(payload)
                except WireError:
                    continue
                if isinstance(msg, Ping | Hello):
                    self.victim_round = msg.round
                elif isinstance(msg, SecureEnvelope):
                    session = msg.body.get("session")
                    if isinstance(session, bytes) and session not in self.sessions:
                        self.sessions.append(session)
        except (ConnectionClosed, WireError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except OSError:
            pass

    async def send(self, kind: str, payload: bytes) -> None:
        self.stats.last.append((kind, payload))
        for _ in range(2):
            if self._conn is None:
                self.stats.reconnects += 1
                await self._connect()
            assert self._conn is not None
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    await self._conn.send(payload)
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.stats.send_failures += 1
                self._conn = None
                continue
            self.stats.sent[kind] += 1
            return

    async def rounds_completed(self) -> list[int]:
        return [len(node.history) for node in self.nodes]

    async def wait_rounds(self, more: int, timeout: float) -> list[int]:
        """Wait until every honest node completed `more` rounds beyond now."""
        start = [len(node.history) for node in self.nodes]
        with trio.move_on_after(timeout):
            while any(len(n.history) < s + more for n, s in zip(self.nodes, start, strict=True)):
                await trio.sleep(0.1)
        return [len(n.history) - s for n, s in zip(self.nodes, start, strict=True)]

    async def victim_status(self) -> dict[str, Any]:
        return self.victim.status()

    def victim_alive(self) -> bool:
        return self.victim.id not in self.finished

    async def rejections(self) -> dict[str, int]:
        return dict(self.victim.frames_rejected)

    async def contained(self) -> dict[str, int]:
        return dict(self.victim.supervisor.contained)


# ---------------------------------------------------------------- hostile values

BAD_ADDRESSES = [
    "nonsense",
    "127.0.0.1:99999",
    "::1:7000",
    "0.0.0.0:x",
    "127.0.0.1:0",
    "",
    ":",
    "[::1]",
    "mem:x",
    "mem:",
    "a" * 300 + ":1",
    "\u00e9:1",
]
# Valid addresses; the victim may dial them, so only loopback ones (LoopbackOnly below
# also refuses anything else a hostile peer makes up, so no test traffic leaves the host).
GOOD_ADDRESSES = ["127.0.0.1:9", "[::1]:9", "localhost:9", "127.0.0.2:7000", "0.0.0.0:9"]
BIG_INTS = [-(2**63), -1, 0, 1, 2**31 - 1, 2**31, 2**53 - 1, 2**53, 2**63 - 1, 2**64 - 1]
FLOATS = [0.0, -0.0, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]


def hostile_ints() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(BIG_INTS), st.integers(-10, 10), st.integers(-(2**63), 2**64 - 1)
    )


def hostile_text(max_size: int = 64) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["", " ", "\x00", "\n", "\x1b[2J", "x" * 5000, "\u202e", "default"]),
        st.text(max_size=max_size),
    )


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """`valid` about two times in three: a message whose every field is hostile dies at
    the first check, one hostile field among valid ones reaches the code behind it."""
    return st.one_of(valid, valid, hostile)


def rarely(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any], one_in: int = 8
) -> st.SearchStrategy[Any]:
    """`hostile` about once in `one_in`: for list entries and header fields, so a list
    of several entries still gets through with one bad entry now and then."""
    return st.integers(0, one_in - 1).flatmap(lambda k: hostile if k == 0 else valid)


class Hostile:
    """Strategies for hostile messages, bound to one live federation (ids, round, dim)."""

    def __init__(self, fed: LiveFederation) -> None:
        self.fed = fed
        ids = [n.id for n in fed.nodes]
        self.real_ids = st.sampled_from([*ids, HOSTILE.peer_id])
        self.valid_ids = st.one_of(
            self.real_ids, st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=32, max_size=32)
        )
        self.ids = st.one_of(
            self.real_ids,
            st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=32, max_size=32),
            hostile_text(),
        )
        # Mostly our own id: a spoofed sender is rejected before anything else runs.
        self.sender = st.sampled_from([HOSTILE.peer_id] * 9 + ids)
        self.rounds = rarely(
            st.integers(-2, 3).map(lambda d: max(0, fed.victim_round + d)), hostile_ints(), 4
        )
        self.addresses = st.one_of(
            st.sampled_from(BAD_ADDRESSES + GOOD_ADDRESSES),
            st.sampled_from([a for n in fed.nodes for a in n.listen_addresses]),
            st.text(max_size=40),
        )
        self.floats = st.one_of(st.sampled_from(FLOATS), st.floats())
        # With secure aggregation on, half of the messages are secure ones.
        self.types = sorted(MESSAGE_TYPES) + ["sa"] * (10 if fed.secure else 0)

    def tensor(self, dtype: str = "f4") -> st.SearchStrategy[Any]:
        dim = self.fed.dim
        good_shape = st.just([dim])
        shapes = st.one_of(
            good_shape,
            good_shape,
            st.sampled_from([[dim + 1], [max(0, dim - 1)], [0], [dim, 1], [1, dim], [], [2**40]]),
            st.lists(st.integers(-1, 2**40), max_size=9),
        )
        values = st.one_of(
            st.sampled_from([0.0, 1.0, 1e38, -1e38, math.nan, math.inf, -math.inf]),
            st.floats(width=32),
        )

        @st.composite
        def build(draw: st.DrawFn) -> Any:
            shape = draw(shapes)
            code = draw(st.one_of(st.just(dtype), st.sampled_from(["f2", "i1", "u4", "f8", ""])))
            n = math.prod(shape) if all(type(d) is int and d >= 0 for d in shape) else 1
            if n > 4 * dim + 16:  # a claimed huge shape: send a little data and let it lie
                n = 1
            fill = draw(values)
            arr = np.full(n, fill, dtype=np.float32)
            if draw(st.booleans()) and arr.size:
                arr[draw(st.integers(0, arr.size - 1))] = draw(values)
            data = arr.tobytes()
            if draw(st.integers(0, 9)) == 0:
                data = data[: draw(st.integers(0, len(data)))]
            if draw(st.integers(0, 19)) == 0:
                return draw(st.sampled_from([None, 0, "tensor", [], {}, b"\x00" * 16]))
            return {"dtype": code, "shape": shape, "data": data}

        return build()

    def blob(self) -> st.SearchStrategy[Any]:
        dim = self.fed.dim
        pipelines = [(), ("delta",), ("quantize:8",), ("delta", "topk:0.3", "quantize:4", "zstd:3")]

        @st.composite
        def real(draw: st.DrawFn) -> Any:
            stages = draw(st.sampled_from(pipelines))
            size = draw(st.sampled_from([dim, dim, dim + 3, 1]))
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            enc = UpdateEncoder(parse_pipeline(stages))
            x = rng.standard_normal(size).astype(np.float32)
            blob: dict[str, Any] = enc.encode(x, draw(st.integers(0, 3)))
            blob = _plain(blob)
            if draw(st.booleans()):  # then break one field of it
                key = draw(st.sampled_from(sorted(blob)))
                blob[key] = draw(junk)
            if draw(st.booleans()) and isinstance(body := blob.get("x"), bytes) and body:
                flipped = bytearray(body)  # or flip one bit of the body (index code, values)
                bit = draw(st.integers(0, len(flipped) * 8 - 1))
                flipped[bit // 8] ^= 1 << (bit % 8)
                blob["x"] = bytes(flipped)
            return blob

        junk = st.one_of(
            st.none(),
            hostile_ints(),
            self.floats,
            hostile_text(16),
            st.binary(max_size=64),
            st.lists(st.sampled_from(["delta", "zstd:3", "topk:2", "quantize:99", "nope"])),
        )
        return st.one_of(
            real(), st.dictionaries(st.text(max_size=8), junk, min_size=0, max_size=18)
        )

    def secure_body(self, kind: str) -> st.SearchStrategy[dict[str, Any]]:
        """Well-typed but hostile fields of group message `kind` (sa2_*), each field
        mostly valid so that one bad field at a time reaches the code behind the others."""
        fed = self.fed
        ids = st.one_of(
            st.lists(self.real_ids, min_size=3, max_size=5, unique=True).map(sorted),
            st.lists(self.ids, max_size=6).map(sorted),
            st.lists(self.ids, max_size=6),
        )
        session = st.one_of(
            st.integers(0, 2**16).map(lambda i: fed.sessions[i % len(fed.sessions)]),
            st.sampled_from([0, 1, SESSION_LEN - 1, SESSION_LEN + 1, 40]).map(lambda n: b"s" * n),
        )
        small = st.one_of(st.integers(0, 4), st.integers(0, 4), hostile_ints())
        group = {"session": session, "group": small}

        def sized(n: int) -> st.SearchStrategy[bytes]:
            return mostly(st.binary(min_size=n, max_size=n), st.binary(max_size=2 * n + 8))

        share_list = st.lists(
            st.tuples(rarely(self.real_ids, self.ids), sized(SHARE_LEN)).map(list), max_size=6
        )
        reason = mostly(st.sampled_from(["no_group", "too_few_vectors"]), hostile_text())

        @st.composite
        def setup(draw: st.DrawFn) -> dict[str, Any]:
            """Our round key, signed for a scope the victim may lead (or a broken one)."""
            sess, grp = draw(session), draw(small)
            if draw(st.integers(0, 2)) == 0 or type(grp) is not int or not 0 <= grp < 2**32:
                public, signature = draw(sized(KEY_LEN)), draw(sized(SIGNATURE_LEN))
            else:
                scope = RoundScope(FEDERATION, fed.victim_round, fed.victim.id, sess, grp)
                key = RoundKey(HOSTILE, scope)
                public, signature = key.public, key.signature
            return {
                "session": sess,
                "group": grp,
                "public": public,
                "signature": signature,
                "identity": draw(mostly(st.just(OWN_IDENTITY_KEY), sized(IDENTITY_KEY_LEN))),
                "proof": draw(mostly(st.just(OWN_PROOF), sized(PROOF_LEN))),
            }

        fields: dict[str, st.SearchStrategy[Any]]
        match kind:
            case "sa2_id":
                # Mostly our own key: a refused one unkeys nothing, a valid one keys us.
                return st.fixed_dictionaries(
                    {"public": mostly(st.just(OWN_IDENTITY_KEY), sized(IDENTITY_KEY_LEN))}
                )
            case "sa2_ready":
                return setup()
            case "sa2_join":
                fields = {"leader": mostly(st.just(fed.victim.id), self.ids)}
            case "sa2_offer":
                fields = {
                    "session": session,
                    "choosers": ids,
                    "group_size": st.one_of(st.integers(2, 6), hostile_ints()),
                    "min_group": st.one_of(st.integers(2, 4), hostile_ints()),
                    "clip": mostly(st.just(16.0), self.floats),
                    "dim": mostly(st.just(fed.dim), hostile_ints()),
                }
            case "sa2_masklist":
                entry = st.tuples(
                    sized(KEY_LEN), sized(SIGNATURE_LEN), sized(IDENTITY_KEY_LEN), sized(PROOF_LEN)
                ).map(list)
                fields = {**group, "members": ids, "setups": st.lists(entry, max_size=6)}
            case "sa2_sealed" | "sa2_relayed":
                fields = {
                    **group,
                    "peer": rarely(self.real_ids, self.ids, 4),
                    "kind": mostly(st.sampled_from(SEALED_KINDS), hostile_text(8)),
                    "box": mostly(
                        st.binary(min_size=BOX_OVERHEAD, max_size=MAX_BOX), st.binary(max_size=400)
                    ),
                }
            case "sa2_masked":
                fields = {**group, "masked": self.tensor("u4")}
            case "sa2_mean":
                fields = {**group, "members": ids, "mean": self.tensor()}
            case "sa2_unmask":
                fields = {**group, "members": ids}
            case "sa2_reveal":
                fields = {
                    **group,
                    "seed": sized(SEED_LEN),
                    "seed_shares": share_list,
                    "key_shares": share_list,
                }
            case "sa2_abort":
                fields = {**group, "reason": reason}
            case _:  # sa2_none, and names that are no kind at all
                fields = {"reason": reason}
        return st.fixed_dictionaries(fields)

    def body(self, type_: str) -> st.SearchStrategy[dict[str, Any]]:
        """The fields after the header for message `type_`."""
        tensor, samples = self.tensor(), mostly(st.integers(1, 1000), hostile_ints())
        match type_:
            case "hello":
                return st.fixed_dictionaries(
                    {
                        "federation": mostly(st.just(FEDERATION), hostile_text()),
                        "listen": mostly(
                            st.lists(self.addresses, max_size=4),
                            st.lists(self.addresses, max_size=20),
                        ),
                        "version": mostly(st.just("0.1"), hostile_text()),
                        # Mostly the victim's own: another one only gets us refused.
                        "fingerprint": mostly(
                            st.just(self.fed.victim.fingerprint.digest), hostile_text()
                        ),
                    }
                )
            case "ping" | "pong":
                return st.fixed_dictionaries(
                    {
                        "nonce": mostly(st.integers(0, 2**64 - 1), hostile_ints()),
                        "sent_at": mostly(st.floats(0.0, 1e7), self.floats),
                    }
                )
            case "peers":
                pair = rarely(
                    st.tuples(rarely(self.valid_ids, self.ids), self.addresses).map(list),
                    st.lists(st.one_of(self.ids, self.addresses), min_size=2, max_size=2),
                )
                return st.fixed_dictionaries(
                    {"peers": mostly(st.lists(pair, max_size=4), st.lists(pair, max_size=80))}
                )
            case "model" | "state":
                return st.fixed_dictionaries({"params": tensor, "samples": samples})
            case "model_z":
                return st.fixed_dictionaries({"blob": self.blob(), "samples": samples})
            case "bye":
                return st.fixed_dictionaries(
                    {
                        "reason": mostly(
                            st.text(st.characters(categories=["L", "N"])), hostile_text()
                        )
                    }
                )
            case "sa":
                kinds = sorted(GROUP_MESSAGE_TYPES)

                @st.composite
                def envelope(draw: st.DrawFn) -> dict[str, Any]:
                    kind = draw(
                        st.sampled_from(kinds) if draw(st.integers(0, 9)) else hostile_text(12)
                    )
                    body = draw(self.secure_body(kind))
                    return {"kind": kind, "body": body}

                return envelope()
            case _:  # state_req, model_req: header only
                return st.just({})

    def message(self) -> st.SearchStrategy[tuple[str, bytes]]:
        @st.composite
        def build(draw: st.DrawFn) -> tuple[str, bytes]:
            type_ = draw(st.sampled_from(self.types))
            obj: dict[str, Any] = {
                "v": PROTOCOL_VERSION,
                "type": type_,
                "sender": draw(self.sender),
                "round": draw(self.rounds),
                **draw(self.body(type_)),
            }
            label = type_ if type_ != "sa" else f"sa/{obj['kind']}"
            if label.startswith("sa/") and obj["kind"] not in GROUP_MESSAGE_TYPES:
                label = "sa/?"
            if draw(st.integers(0, 29)) == 0:  # now and then a broken header too
                key = draw(st.sampled_from(["v", "type", "sender", "round"]))
                obj[key] = draw(st.one_of(st.none(), hostile_ints(), hostile_text(8)))
            return label, msgpack.packb(obj, use_bin_type=True)

        return build()


def _plain(obj: Any) -> Any:
    """A blob from the encoder with memoryviews turned into bytes (msgpack-ready, mutable)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, memoryview):
        return obj.tobytes()
    return obj


# ---------------------------------------------------------------- the run


def fuzz(fed: LiveFederation, examples: int, *, seed: int | None) -> None:
    """Send `examples` hostile messages; fail at the first one after which the victim is down.

    `seed` fixes Hypothesis's choices (CI is reproducible); None draws fresh ones.
    """
    hostile = Hostile(fed)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile.message())
    def send_one(labelled: tuple[str, bytes]) -> None:
        label, payload = labelled
        fed.call(fed.send, label, payload)
        assert fed.victim_alive(), report(fed)

    if seed is not None:
        send_one = hypothesis.seed(seed)(send_one)
    send_one()


def report(fed: LiveFederation) -> str:
    lines = [f"victim crashed: {fed.crashed.get(fed.victim.id)!r}", "last payloads sent:"]
    lines += [f"  {label}: {payload[:300]!r}" for label, payload in fed.stats.last]
    return "\n".join(lines)


EXAMPLES = int(os.environ.get("P2PFL_FUZZ_PEER_EXAMPLES", "300"))
SEED = None if os.environ.get("P2PFL_FUZZ_RANDOM") else 0


@pytest.mark.parametrize(
    ("secure", "honest", "examples"),
    [(False, 2, EXAMPLES), (True, 4, EXAMPLES // 5)],
    ids=["plain", "secure"],
)
def test_hostile_peer_cannot_stop_a_node_or_its_rounds(
    tmp_path: Path, secure: bool, honest: int, examples: int
) -> None:
    with LiveFederation(tmp_path, honest=honest, secure=secure) as fed:
        before = fed.call(fed.wait_rounds, 1, 60.0)
        assert all(n >= 1 for n in before), before  # the honest federation works at all
        fuzz(fed, examples, seed=SEED)
        after = fed.call(fed.wait_rounds, 2, 60.0)
        assert fed.victim_alive() and not fed.crashed, report(fed)
        rejected, contained = fed.call(fed.rejections), fed.call(fed.contained)
        assert all(n >= 2 for n in after), (after, rejected, contained)
        assert sum(fed.stats.sent.values()) >= examples
        # Every hostile message was refused cleanly (a counted rejection), none reached
        # a component that failed and had to be contained by the supervision guard.
        assert rejected, "the hostile peer never got a message rejected"
        assert not contained, (contained, report(fed))
