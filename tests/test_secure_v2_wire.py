"""Secure aggregation v2 messages on the wire: every kind round-trips, hostile bodies
are refused with the wire's typed error (issue 14, and issue 12's "validated at the
codec" for every field a peer sends)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from p2pfl.identity import Identity
from p2pfl.secure.group_messages import (
    GROUP_MESSAGE_TYPES,
    Abstain,
    GroupAbort,
    GroupJoin,
    GroupMean,
    GroupMessage,
    GroupOffer,
    IdentityKey,
    MaskedVector,
    MaskList,
    Relayed,
    Sealed,
    SetupDone,
    Unmasking,
    UnmaskList,
)
from p2pfl.secure.shamir import split
from p2pfl.secure.wire import group_from_envelope, to_envelope
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import SecureEnvelope

IDS = sorted(Identity.from_seed(bytes([90 + i]) * 32).peer_id for i in range(4))
ME, S = IDS[0], b"\x01" * 16
SHARE = split(b"\x02" * 32, 2, 3)[0].to_bytes()


def _all() -> list[GroupMessage]:
    return [
        GroupJoin(ME, 3, IDS[1]),
        GroupOffer(ME, 3, S, tuple(IDS), 4, 3, 16.0, 10),
        SetupDone(ME, 3, S, 0, b"k" * 32, b"s" * 64, b"i" * 32, b"p" * 64),
        MaskList(ME, 3, S, 0, tuple(IDS[:3]), ((b"k" * 32, b"s" * 64, b"i" * 32, b"p" * 64),) * 3),
        Sealed(ME, 3, S, 0, IDS[1], "shares", b"b" * 100),
        Relayed(ME, 3, S, 0, IDS[2], "commit", b"b" * 28),
        MaskedVector(ME, 3, S, 0, np.arange(10, dtype=np.uint32)),
        UnmaskList(ME, 3, S, 0, tuple(IDS[:3])),
        Unmasking(ME, 3, S, 0, b"z" * 32, ((IDS[1], SHARE),), ((IDS[2], SHARE),)),
        GroupMean(ME, 3, S, 0, tuple(IDS[:3]), np.linspace(-1, 1, 10, dtype=np.float32)),
        GroupAbort(ME, 3, S, 0, "too_few_vectors"),
        IdentityKey(ME, 3, b"p" * 32),
        Abstain(ME, 3, "no_group"),
    ]


def _through_the_wire(msg: GroupMessage) -> GroupMessage:
    env = codec.decode(codec.encode(to_envelope(msg)))
    assert isinstance(env, SecureEnvelope)
    return group_from_envelope(env, max_dim=10)


def test_every_kind_round_trips() -> None:
    msgs = _all()
    assert {m.TYPE for m in msgs} == set(GROUP_MESSAGE_TYPES)
    for msg in msgs:
        back = _through_the_wire(msg)
        assert type(back) is type(msg)
        for f in dataclasses.fields(msg):
            a, b = getattr(msg, f.name), getattr(back, f.name)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, f.name


def _env(kind: str, /, **body: object) -> SecureEnvelope:
    return SecureEnvelope(ME, 3, kind, dict(body))


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        (_env("sa2_nope"), "unknown_type"),
        (_env("sa2_join", leader=IDS[1], extra=1), "bad_field"),
        (_env("sa2_join", leader=""), "bad_field"),
        (_env("sa2_sealed", session=S, group=0, peer=IDS[1], kind="ack"), "bad_field"),
        (_env("sa2_sealed", session=S, group=0, peer=IDS[1], kind="x", box=b"b" * 28), "bad_field"),
        (_env("sa2_sealed", session=S, group=0, peer=IDS[1], kind="ack", box=b"b"), "bad_field"),
        (
            _env("sa2_relayed", session=S, group=0, peer="x1", kind="ack", box=b"b" * 28),
            "bad_field",
        ),
        (
            _env("sa2_relayed", session=b"short", group=0, peer=IDS[1], kind="ack", box=b"b" * 28),
            "bad_field",
        ),
        (
            _env("sa2_relayed", session=S, group=-1, peer=IDS[1], kind="ack", box=b"b" * 28),
            "bad_field",
        ),
        (_env("sa2_id", public=b"short"), "bad_field"),
        (_env("sa2_none", reason=""), "bad_field"),
        (_env("sa2_none", reason="x" * 65), "bad_field"),
        (_env("sa2_abort", session=S, group=0, reason="\u00e9t\u00e9"), "bad_field"),
        (_env("sa2_masklist", session=S, group=0, members=["b", "a", "c"], setups=[]), "bad_field"),
        (
            _env("sa2_masklist", session=S, group=0, members=["x1", "x2", "x3"], setups=[[]] * 3),
            "bad_field",
        ),
        (
            _env(
                "sa2_masklist",
                session=S,
                group=0,
                members=IDS[:3],
                setups=[list((b"k" * 32, b"s" * 64, b"i" * 32, b"p" * 64))] * 2,
            ),
            "bad_field",
        ),  # one setup missing
        (
            _env(
                "sa2_ready",
                session=S,
                group=0,
                public=b"k" * 32,
                signature=b"s" * 64,
                identity=b"i" * 32,
                proof=b"p" * 63,
            ),
            "bad_field",
        ),
        (
            _env(
                "sa2_offer", session=S, choosers=IDS, group_size=4, min_group=3, clip=16.0, dim=11
            ),
            "bad_field",
        ),  # more than the local model
        (
            _env(
                "sa2_offer", session=S, choosers=IDS, group_size=2, min_group=3, clip=16.0, dim=10
            ),
            "bad_field",
        ),
        (
            _env(
                "sa2_reveal",
                session=S,
                group=0,
                seed=b"z" * 32,
                seed_shares=[[IDS[1], SHARE]],
                key_shares=[[IDS[1], SHARE]],
            ),
            "bad_field",
        ),
        (
            _env(
                "sa2_reveal",
                session=S,
                group=0,
                seed=b"z" * 32,
                seed_shares=[[IDS[1], b"short"]],
                key_shares=[],
            ),
            "bad_field",
        ),
    ],
)
def test_hostile_bodies_are_refused_with_a_wire_error(env: SecureEnvelope, reason: str) -> None:
    with pytest.raises(WireError) as exc:
        group_from_envelope(env, max_dim=10)
    assert exc.value.reason == reason


def test_tensors_must_have_the_kinds_dtype_and_fit_the_model() -> None:
    wrong_dtype = to_envelope(MaskedVector(ME, 3, S, 0, np.arange(10, dtype=np.uint32)))
    wrong_dtype.body["masked"] = to_envelope(
        GroupMean(ME, 3, S, 0, tuple(IDS[:3]), np.zeros(10, np.float32))
    ).body["mean"]
    with pytest.raises(WireError):
        group_from_envelope(wrong_dtype, max_dim=10)
    too_long = to_envelope(MaskedVector(ME, 3, S, 0, np.arange(11, dtype=np.uint32)))
    with pytest.raises(WireError):
        group_from_envelope(too_long, max_dim=10)
    nan = to_envelope(GroupMean(ME, 3, S, 0, tuple(IDS[:3]), np.zeros(10, np.float32)))
    nan.body["mean"] = to_envelope(MaskedVector(ME, 3, S, 0, np.arange(10, dtype=np.uint32))).body[
        "masked"
    ]
    with pytest.raises(WireError):
        group_from_envelope(nan, max_dim=10)
