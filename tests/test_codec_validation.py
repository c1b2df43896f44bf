"""Validation at the codec of every field a peer controls (issue 12).

Each known reproduction is here as a decode that must fail with WireError (reason and
field named), so hostile values never reach the dialer, the round machine or the
secure protocol. Raw msgpack maps are built by hand for values the encoder refuses.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from p2pfl import PROTOCOL_VERSION
from p2pfl.identity import Identity
from p2pfl.secure.keys import ANNOUNCEMENT_LEN
from p2pfl.secure.masking import SEED_LEN
from p2pfl.secure.messages import SESSION_LEN, GroupRetry, UnmaskRequest
from p2pfl.secure.wire import from_envelope
from p2pfl.transport import tcp
from p2pfl.wire import address
from p2pfl.wire.codec import MAX_LISTEN, MAX_PEERS, Limits, decode, encode
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import (
    CompressedModelUpdate,
    Hello,
    ModelUpdate,
    PeerList,
    SecureEnvelope,
    StateReply,
)

IDS = sorted(Identity.from_seed(bytes([i]) * 32).peer_id for i in range(1, 7))
ME = IDS[0]
PARAMS = np.arange(4, dtype=np.float32)


def raw(type_: str, **fields: Any) -> bytes:
    """A payload the encoder would refuse to produce: header plus `fields`, as given."""
    obj = {"v": PROTOCOL_VERSION, "type": type_, "sender": ME, "round": 0, **fields}
    return msgpack.packb(obj, use_bin_type=True)


def tensor(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": "f4", "shape": list(a.shape), "data": a.astype("<f4").tobytes()}


def rejects(payload: bytes, needle: str, reason: str = "bad_field") -> WireError:
    with pytest.raises(WireError) as info:
        decode(payload)
    assert info.value.reason == reason, info.value
    assert needle in info.value.detail, info.value
    return info.value


# ---------------------------------------------------------------- reproduction (1)

BAD_ADDRESSES = [
    "nonsense",
    "127.0.0.1:99999",
    "::1:7000",
    "0.0.0.0:x",
    "127.0.0.1:0",
    "127.0.0.1:-1",
    "127.0.0.1:",
    ":7000",
    "[::1]7000",
    "[nonsense]:7000",
    "[127.0.0.1]:7000",
    "999.1.1.1:7000",
    "host name:7000",
    "-host:7000",
    "host..lan:7000",
    "h\u00e9te:7000",
    "127.0.0.1:\u00b2",
    "a" * 254 + ":1",
    "mem:",
    "mem:a/b",
    "mem:" + "x" * 65,
]


@pytest.mark.parametrize("bad", BAD_ADDRESSES)
def test_peer_list_address_that_does_not_parse_is_rejected(bad: str) -> None:
    rejects(raw("peers", peers=[[IDS[1], bad]]), "peers[0][1]")


@pytest.mark.parametrize("bad", BAD_ADDRESSES)
def test_hello_listen_address_that_does_not_parse_is_rejected(bad: str) -> None:
    payload = raw(
        "hello", federation="f", listen=["127.0.0.1:7000", bad], version="0", fingerprint=""
    )
    rejects(payload, "listen[1]")


def test_encoder_refuses_what_the_decoder_would_reject() -> None:
    with pytest.raises(ValueError, match="listen"):
        encode(Hello(ME, 0, "f", ("0.0.0.0:x",)))
    with pytest.raises(ValueError, match="peers"):
        encode(PeerList(ME, 0, ((IDS[1], "nonsense"),)))


@pytest.mark.parametrize(
    "good",
    [
        "127.0.0.1:7000",
        "0.0.0.0:7000",
        "[::1]:1",
        "[fe80::1%eth0]:65535",
        "node-1.lan:7470",
        "localhost:9",
        "mem:n0",
        "mem:node_1.a-b",
    ],
)
def test_dialable_addresses_round_trip(good: str) -> None:
    msg = PeerList(ME, 3, ((IDS[1], good),))
    assert decode(encode(msg)) == msg
    hello = Hello(ME, 3, "f", (good,), "0.1")
    assert decode(encode(hello)) == hello


def test_one_address_parser_shared_with_the_tcp_transport() -> None:
    assert tcp.parse_address is address.parse_address
    assert address.parse_address("127.0.0.1:0") == ("127.0.0.1", 0)  # listen config
    assert address.parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="port 0"):
        address.check_peer_address("127.0.0.1:0")
    for bad in BAD_ADDRESSES:
        with pytest.raises(ValueError, match="bad address"):
            address.check_peer_address(bad)


def test_a_tcp_node_can_refuse_memory_addresses() -> None:
    payload = encode(PeerList(ME, 0, ((IDS[1], "mem:n1"),)))
    assert decode(payload).peers == ((IDS[1], "mem:n1"),)  # simulations rely on them
    with pytest.raises(WireError, match=r"peers\[0\]\[1\].*in-memory"):
        decode(payload, limits=Limits(memory_addresses=False))
    hello = encode(Hello(ME, 0, "f", ("mem:n1",)))
    with pytest.raises(WireError, match=r"listen\[0\]"):
        decode(hello, limits=Limits(memory_addresses=False))


def test_peer_list_ids_must_be_peer_ids() -> None:
    for bad in ["", "peer-b", IDS[1].upper(), IDS[1][:-1], IDS[1] + "a", "1" * 32, 7]:
        rejects(raw("peers", peers=[[bad, "127.0.0.1:7000"]]), "peers[0][0]")


def test_list_lengths_are_bounded() -> None:
    many = [f"10.0.{i // 256}.{i % 256}:7000" for i in range(MAX_LISTEN + 1)]
    rejects(raw("hello", federation="f", listen=many, version="0", fingerprint=""), "listen")
    peers = [[IDS[1], f"10.0.{i // 256}.{i % 256}:7000"] for i in range(MAX_PEERS + 1)]
    rejects(raw("peers", peers=peers), "peers")


# ---------------------------------------------------------------- reproduction (6)


@pytest.mark.parametrize("samples", [2**53 - 1, 2**31, 0, -1, True, 1.0])
@pytest.mark.parametrize("kind", ["model", "state"])
def test_sample_count_out_of_range_is_rejected(kind: str, samples: object) -> None:
    rejects(raw(kind, params=tensor(PARAMS), samples=samples), "samples")


def test_compressed_update_sample_count_is_bounded() -> None:
    blob = {"stages": [], "base": -1, "payload": {"data": b""}}
    rejects(raw("model_z", blob=blob, samples=2**53 - 1), "samples")
    ok = CompressedModelUpdate(ME, 0, blob, 2**31 - 1)
    assert decode(encode(ok)).samples == 2**31 - 1


def test_largest_accepted_values_round_trip() -> None:
    msg = ModelUpdate(ME, 2**31 - 1, PARAMS, 2**31 - 1)
    got = decode(encode(msg))
    assert isinstance(got, ModelUpdate) and (got.round, got.samples) == (2**31 - 1, 2**31 - 1)
    assert isinstance(decode(encode(StateReply(ME, 0, PARAMS, 1))), StateReply)


@pytest.mark.parametrize("rnd", [2**31, 2**53 - 1, -1])
def test_rounds_are_bounded(rnd: int) -> None:
    obj = {"v": PROTOCOL_VERSION, "type": "state_req", "sender": ME, "round": rnd}
    rejects(msgpack.packb(obj), "round")


@pytest.mark.parametrize("sent_at", [-1.0, 1e300])
def test_ping_time_is_bounded(sent_at: float) -> None:
    rejects(raw("ping", nonce=1, sent_at=sent_at), "sent_at")


# ---------------------------------------------------------------- decoding cost


def test_nested_small_items_cannot_amplify_memory() -> None:
    """4096 lists of 4096 zero bytes: 16 MiB on the wire, ~150 MB of Python objects."""
    n = 4096
    inner = b"\xdc" + n.to_bytes(2, "big") + b"\x00" * n
    body = b"\xdc" + n.to_bytes(2, "big") + inner * n
    head = {"v": PROTOCOL_VERSION, "type": "bye", "sender": ME, "round": 0}
    payload = b"\x85" + msgpack.packb(head)[1:] + msgpack.packb("reason") + body
    rejects(payload, "items", reason="malformed")


def test_many_small_maps_are_counted_too() -> None:
    inner = b"\x82\xa1a\x80\xa1b\x80"  # {"a": {}, "b": {}}: 7 bytes, three dicts
    body = b"\xdc" + (4000).to_bytes(2, "big") + inner * 4000
    head = {"v": PROTOCOL_VERSION, "type": "bye", "sender": ME, "round": 0}
    payload = b"\x85" + msgpack.packb(head)[1:] + msgpack.packb("reason") + body
    rejects(payload, "items", reason="malformed")


# ---------------------------------------------------------------- secure aggregation


def envelope(kind: str, **body: Any) -> SecureEnvelope:
    return SecureEnvelope(IDS[5], 3, kind, body)


def announce(**changes: Any) -> SecureEnvelope:
    body: dict[str, Any] = {
        "session": b"s" * SESSION_LEN,
        "group_size": 3,
        "clip": 1.0,
        "dim": 4,
        "participants": IDS[:3],
        "keys": [b"k" * ANNOUNCEMENT_LEN] * 3,
        "groups": [[0, 1, 2]],
    }
    body.update(changes)
    return envelope("sa_announce", **body)


def secure_rejects(env: SecureEnvelope, needle: str, max_dim: int = 4) -> None:
    with pytest.raises(WireError) as info:
        from_envelope(env, max_dim=max_dim)
    assert info.value.reason == "bad_field", info.value
    assert needle in info.value.detail, info.value


def test_well_formed_announcement_passes() -> None:
    msg = from_envelope(announce(), max_dim=4)
    assert msg.TYPE == "sa_announce"


def test_announcement_fields_are_validated() -> None:
    secure_rejects(announce(participants=["a", "b", "c"]), "participants")
    secure_rejects(announce(dim=5), "dim")
    secure_rejects(announce(groups=[[0, 1, 1]]), "groups[0]")
    secure_rejects(announce(groups=[[0, 1, 2], [0, 1, 2]]), "groups")
    secure_rejects(announce(group_size=2**40), "group_size")
    secure_rejects(announce(keys=[b"k"] * 3), "keys")


@pytest.mark.parametrize("kind", ["sa_retry", "sa_unmask"])
def test_member_lists_must_be_peer_ids(kind: str) -> None:
    header = {"session": b"s" * SESSION_LEN, "group": 0, "attempt": 1}
    ok = envelope(kind, **header, members=IDS[:3])
    assert isinstance(from_envelope(ok, max_dim=4), GroupRetry | UnmaskRequest)
    secure_rejects(envelope(kind, **header, members=["x", "y", "z"]), "members")
    secure_rejects(envelope(kind, **header, members=[IDS[0]] * 3), "members")


def test_reveal_and_masked_headers_are_validated() -> None:
    header = {"session": b"s" * SESSION_LEN, "group": 0, "attempt": 0}
    secure_rejects(envelope("sa_reveal", **{**header, "group": -1}, seed=b"x" * SEED_LEN), "group")
    secure_rejects(envelope("sa_reveal", **header, seed=b"x"), "seed")
    masked = {"dtype": "u4", "shape": [5], "data": b"\x00" * 20}
    with pytest.raises(WireError) as info:
        from_envelope(envelope("sa_masked", **header, masked=masked), max_dim=4)
    assert info.value.reason == "bad_tensor"
