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
from p2pfl.secure.group_messages import (
    MAX_BOX,
    GroupMessage,
    GroupOffer,
    MaskedVector,
    Sealed,
    Unmasking,
    UnmaskList,
)
from p2pfl.secure.masking import SEED_LEN
from p2pfl.secure.messages import SESSION_LEN
from p2pfl.secure.shamir import split
from p2pfl.secure.wire import group_from_envelope
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
# The codec checks the envelope (sender, round, a kind name, a map body) and
# `group_from_envelope` the body, into a v2 group message. These cases go from raw bytes
# through both, as a peer's frame does; tests/test_secure_v2_wire.py has every kind.

SESSION = b"s" * SESSION_LEN
DIM = 4
SHARE = split(b"\x02" * 32, 2, 3)[0].to_bytes()


def secure_frame(kind: str, /, **body: Any) -> bytes:
    return raw("sa", kind=kind, body=body)


def secure_decode(payload: bytes) -> GroupMessage:
    env = decode(payload)
    assert isinstance(env, SecureEnvelope)
    return group_from_envelope(env, max_dim=DIM)


def secure_rejects(payload: bytes, needle: str, reason: str = "bad_field") -> None:
    with pytest.raises(WireError) as info:
        secure_decode(payload)
    assert info.value.reason == reason, info.value
    assert needle in info.value.detail, info.value


def offer(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "session": SESSION,
        "choosers": IDS[:3],
        "group_size": 3,
        "min_group": 3,
        "clip": 1.0,
        "dim": DIM,
    }
    return secure_frame("sa2_offer", **{**body, **changes})


def test_well_formed_offer_passes_from_raw_bytes() -> None:
    msg = secure_decode(offer())
    assert isinstance(msg, GroupOffer)
    assert (msg.sender, msg.choosers, msg.dim) == (ME, tuple(IDS[:3]), DIM)


def test_the_envelope_is_checked_by_the_codec_and_v1_kinds_are_unknown() -> None:
    rejects(raw("sa", kind="sa2_offer", body=[1, 2]), "body")
    rejects(raw("sa", kind=7, body={}), "kind")
    secure_rejects(secure_frame("sa_announce", session=SESSION), "sa_announce", "unknown_type")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"choosers": ["a", "b", "c"]}, "peers[0]"),  # only the wire knows real peer ids
        ({"choosers": [IDS[1], IDS[0]]}, "choosers"),  # sorted ...
        ({"choosers": [IDS[0]] * 3}, "choosers"),  # ... and distinct
        ({"choosers": IDS * 200}, "choosers: expected a tuple of 1..1024"),
        ({"dim": DIM + 1}, "dim"),  # beyond the local model
        ({"group_size": 2**40}, "group_size"),
        ({"min_group": 2}, "min_group"),
        ({"clip": float("nan")}, "clip"),
        ({"clip": 1e-30}, "clip"),  # would overflow the float32 fixed-point scale
        ({"clip": 1}, "clip"),  # an int where the float belongs
        ({"session": b"short"}, "session"),
        ({"extra": 1}, "unexpected"),
    ],
)
def test_offer_fields_are_validated(changes: dict[str, Any], needle: str) -> None:
    secure_rejects(offer(**changes), needle)


def test_member_lists_must_be_sorted_distinct_peer_ids() -> None:
    head = {"session": SESSION, "group": 0}
    assert isinstance(
        secure_decode(secure_frame("sa2_unmask", **head, members=IDS[:3])), UnmaskList
    )
    secure_rejects(secure_frame("sa2_unmask", **head, members=["x", "y", "z"]), "peers[0]")
    secure_rejects(secure_frame("sa2_unmask", **head, members=[IDS[0]] * 3), "members")
    secure_rejects(secure_frame("sa2_unmask", **head, members=IDS[:2]), "members")  # < 3
    secure_rejects(secure_frame("sa2_unmask", session=SESSION, group=-1, members=IDS[:3]), "group")


def test_shares_in_a_reveal_name_peer_ids_once_each() -> None:
    head = {"session": SESSION, "group": 0, "seed": b"z" * SEED_LEN}
    ok = secure_frame("sa2_reveal", **head, seed_shares=[[IDS[1], SHARE]], key_shares=[])
    assert isinstance(secure_decode(ok), Unmasking)
    bad_peer = secure_frame("sa2_reveal", **head, seed_shares=[["x", SHARE]], key_shares=[])
    secure_rejects(bad_peer, "peers[0]")
    twice = secure_frame("sa2_reveal", **head, seed_shares=[], key_shares=[[IDS[1], SHARE]] * 2)
    secure_rejects(twice, "key_shares")
    short_seed = {**head, "seed": b"x"}
    secure_rejects(secure_frame("sa2_reveal", **short_seed, seed_shares=[], key_shares=[]), "seed")


def test_sealed_boxes_are_bounded_and_name_a_peer() -> None:
    head = {"session": SESSION, "group": 0, "peer": IDS[1], "kind": "shares"}
    assert isinstance(secure_decode(secure_frame("sa2_sealed", **head, box=b"b" * MAX_BOX)), Sealed)
    secure_rejects(secure_frame("sa2_sealed", **head, box=b"b" * (MAX_BOX + 1)), "box")
    spoof = {**head, "peer": IDS[1].upper()}
    secure_rejects(secure_frame("sa2_sealed", **spoof, box=b"b" * MAX_BOX), "peers[0]")


def test_masked_vectors_are_uint32_and_fit_the_model() -> None:
    head = {"session": SESSION, "group": 0}

    def u4(n: int) -> dict[str, Any]:
        return {"dtype": "u4", "shape": [n], "data": b"\x00" * 4 * n}

    assert isinstance(
        secure_decode(secure_frame("sa2_masked", **head, masked=u4(DIM))), MaskedVector
    )
    secure_rejects(
        secure_frame("sa2_masked", **head, masked=u4(DIM + 1)), "element limit", "bad_tensor"
    )
    as_float = tensor(np.zeros(DIM, np.float32))
    secure_rejects(secure_frame("sa2_masked", **head, masked=as_float), "masked", "bad_tensor")
