"""Round keys signed by the identity key, pair secrets and sealed boxes (round_keys.py):
a substituted, re-signed, replayed or unsigned key is rejected, and a sealed message
opens only for its pair, its scope, its direction and its kind.

(v1's tests of signed session-key announcements, ported to what replaced them.)
"""

from __future__ import annotations

import dataclasses

import pytest

from p2pfl.identity import Identity
from p2pfl.secure.keys import KeyRejected, _lp
from p2pfl.secure.round_keys import (
    BOX_OVERHEAD,
    RoundKey,
    RoundScope,
    open_sealed,
    pair_seeds_from_secret,
    seal,
    verify_round_key,
)

FED = "fed-a"
ALICE, BOB, MALLORY = (Identity.from_seed(bytes([60 + i]) * 32) for i in range(3))
SCOPE = RoundScope(FED, 7, BOB.peer_id, b"s" * 16, 2)


@pytest.fixture(scope="module")
def alice() -> RoundKey:
    return RoundKey(ALICE, SCOPE)


def _verify(key: RoundKey, scope: RoundScope = SCOPE, **changes: object) -> None:
    args: dict[str, object] = {
        "peer_id": key.peer_id,
        "identity_key": ALICE.public_bytes,
        "public": key.public,
        "signature": key.signature,
    }
    args.update(changes)
    verify_round_key(scope, **args)  # type: ignore[arg-type]


def _reason(key: RoundKey, scope: RoundScope = SCOPE, **changes: object) -> str:
    with pytest.raises(KeyRejected) as err:
        _verify(key, scope, **changes)
    return err.value.reason


def test_a_genuine_round_key_verifies_and_never_shows_its_secret(alice: RoundKey) -> None:
    _verify(alice)
    assert len(alice.public) == 32 and len(alice.signature) == 64
    assert alice.secret_bytes().hex() not in repr(alice) and "round=7" in repr(alice)


def test_a_substituted_x25519_key_breaks_the_signature(alice: RoundKey) -> None:
    mallory = RoundKey(MALLORY, SCOPE)
    assert _reason(alice, public=mallory.public) == "bad_signature"


def test_a_key_signed_by_someone_else_names_them_not_the_victim(alice: RoundKey) -> None:
    mallory = RoundKey(MALLORY, SCOPE)
    # Mallory's own key and signature under her identity key: it is not alice's id.
    reason = _reason(mallory, peer_id=ALICE.peer_id, identity_key=MALLORY.public_bytes)
    assert reason == "wrong_peer"
    # Alice's identity key with mallory's signature does not help either.
    assert _reason(mallory, peer_id=ALICE.peer_id) == "bad_signature"


@pytest.mark.parametrize(
    "field",
    [
        ("federation", "fed-b"),  # no cross-federation replay
        ("round", 8),  # nor into another round ...
        ("leader", MALLORY.peer_id),  # ... another leader's group ...
        ("session", b"t" * 16),  # ... another session of the same leader ...
        ("group", 3),  # ... or another group of it
    ],
)
def test_a_round_key_does_not_verify_in_any_other_scope(
    alice: RoundKey, field: tuple[str, object]
) -> None:
    other = dataclasses.replace(SCOPE, **{field[0]: field[1]})
    assert _reason(alice, other) == "bad_signature"


def test_unsigned_and_malformed_keys_are_rejected(alice: RoundKey) -> None:
    assert _reason(alice, signature=bytes(64)) == "bad_signature"
    for changes in (
        {"public": alice.public[:-1]},
        {"signature": alice.signature + b"\x00"},
        {"identity_key": b""},
    ):
        assert _reason(alice, **changes) == "malformed"


def test_pair_secrets_agree_and_the_leaders_rebuild_gives_the_same_seeds() -> None:
    a, b, c = (RoundKey(i, SCOPE) for i in (ALICE, BOB, MALLORY))
    seed, box = a.pair_secrets(b.peer_id, b.public)
    assert (seed, box) == b.pair_secrets(a.peer_id, a.public)
    assert seed != box and seed != a.pair_seed(c.peer_id, c.public)
    # What a leader computes from a's rebuilt secret (a dropped out): the same seeds.
    peers = {b.peer_id: b.public, c.peer_id: c.public}
    rebuilt = pair_seeds_from_secret(a.secret_bytes(), a.peer_id, a.public, peers, SCOPE)
    assert rebuilt == {p: a.pair_seed(p, k) for p, k in peers.items()}
    with pytest.raises(ValueError):
        a.pair_seed(a.peer_id, a.public)


def test_a_low_order_peer_key_is_refused(alice: RoundKey) -> None:
    with pytest.raises(KeyRejected, match="weak_key"):
        alice.pair_seed(BOB.peer_id, bytes(32))


def test_a_sealed_box_opens_only_for_its_key_and_binding() -> None:
    a, b = RoundKey(ALICE, SCOPE), RoundKey(BOB, SCOPE)
    _, key = a.pair_secrets(b.peer_id, b.public)
    aad = SCOPE.box_aad(a.peer_id, b.peer_id, "commit")
    box = seal(key, aad, b"shares")
    assert len(box) == len(b"shares") + BOX_OVERHEAD
    assert open_sealed(key, aad, box) == b"shares"
    assert seal(key, aad, b"shares") != box  # a fresh nonce each time
    _, other_key = a.pair_secrets(MALLORY.peer_id, RoundKey(MALLORY, SCOPE).public)
    flipped = box[:-1] + bytes([box[-1] ^ 1])
    wrong_aads = [
        SCOPE.box_aad(b.peer_id, a.peer_id, "commit"),  # the other direction
        SCOPE.box_aad(a.peer_id, b.peer_id, "ack"),  # a commit is not an ack
        dataclasses.replace(SCOPE, group=3).box_aad(a.peer_id, b.peer_id, "commit"),
    ]
    cases = [(other_key, aad, box), (key, aad, flipped), *((key, w, box) for w in wrong_aads)]
    for k, bound, sealed in cases:
        with pytest.raises(KeyRejected, match="bad_box"):
            open_sealed(k, bound, sealed)
    with pytest.raises(KeyRejected, match="malformed"):
        open_sealed(key, aad, box[: BOX_OVERHEAD - 1])


def test_length_prefixed_fields_are_unambiguous() -> None:
    assert _lp(b"ab") + _lp(b"c") != _lp(b"a") + _lp(b"bc")
    assert _lp(b"") == bytes(4)
    err = KeyRejected("bad_signature", "of someone")
    assert err.reason == "bad_signature" and str(err) == "bad_signature: of someone"
