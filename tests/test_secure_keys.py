"""Signed X25519 announcements: a substituted, re-signed or unsigned key is rejected."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pfl.identity import Identity
from p2pfl.secure.keys import (
    ANNOUNCEMENT_LEN,
    KeyAnnouncement,
    KeyRejected,
    KeyStore,
    SessionKey,
    verify_announcement,
)

FED = "fed-a"


@pytest.fixture(scope="module")
def alice() -> SessionKey:
    return SessionKey(Identity.generate(), FED, epoch=5)


def test_genuine_announcement_verifies_and_round_trips(alice: SessionKey) -> None:
    data = alice.announcement.to_bytes()
    assert len(data) == ANNOUNCEMENT_LEN
    ann = verify_announcement(data, FED, expected_peer=alice.peer_id)
    assert ann == alice.announcement
    assert ann.peer_id == alice.peer_id
    assert KeyAnnouncement.from_bytes(data) == ann


def test_substituted_x25519_key_breaks_the_signature(alice: SessionKey) -> None:
    mallory_x = SessionKey(Identity.generate(), FED, 5).public_bytes
    forged = dataclasses.replace(alice.announcement, x25519_key=mallory_x)
    with pytest.raises(KeyRejected) as err:
        verify_announcement(forged, FED, expected_peer=alice.peer_id)
    assert err.value.reason == "bad_signature"


def test_key_resigned_by_someone_else_names_them_not_the_victim(alice: SessionKey) -> None:
    mallory = SessionKey(Identity.generate(), FED, 5)
    with pytest.raises(KeyRejected) as err:
        verify_announcement(mallory.announcement, FED, expected_peer=alice.peer_id)
    assert err.value.reason == "wrong_peer"
    # Keeping alice's identity key with mallory's signature does not help either.
    mixed = dataclasses.replace(mallory.announcement, identity_key=alice.announcement.identity_key)
    with pytest.raises(KeyRejected) as err:
        verify_announcement(mixed, FED, expected_peer=alice.peer_id)
    assert err.value.reason == "bad_signature"


def test_unsigned_key_and_other_federation_are_rejected(alice: SessionKey) -> None:
    unsigned = dataclasses.replace(alice.announcement, signature=bytes(64))
    with pytest.raises(KeyRejected, match="bad_signature"):
        verify_announcement(unsigned, FED)
    with pytest.raises(KeyRejected, match="bad_signature"):
        verify_announcement(alice.announcement, "fed-b")  # no cross-federation replay
    replayed_epoch = dataclasses.replace(alice.announcement, epoch=6)
    with pytest.raises(KeyRejected, match="bad_signature"):
        verify_announcement(replayed_epoch, FED)


def test_malformed_bytes_are_rejected(alice: SessionKey) -> None:
    data = alice.announcement.to_bytes()
    for bad in (data[:-1], b"\x02" + data[1:], b""):
        with pytest.raises(KeyRejected, match="malformed"):
            verify_announcement(bad, FED)


def test_low_order_peer_key_is_refused(alice: SessionKey) -> None:
    with pytest.raises(KeyRejected, match="weak_key"):
        alice.agree(bytes(32))


def test_agreement_is_symmetric() -> None:
    a = SessionKey(Identity.generate(), FED, 1)
    b = SessionKey(Identity.generate(), FED, 1, private=X25519PrivateKey.generate())
    assert a.agree(b.public_bytes) == b.agree(a.public_bytes)


def test_keystore_keeps_the_latest_epoch_and_refuses_equivocation() -> None:
    identity = Identity.generate()
    old, new = SessionKey(identity, FED, 1), SessionKey(identity, FED, 2)
    store = KeyStore(FED)
    store.add(identity.peer_id, old.announcement.to_bytes())
    store.add(identity.peer_id, new.announcement)
    assert store.get(identity.peer_id) == new.announcement
    with pytest.raises(KeyRejected, match="stale"):
        store.add(identity.peer_id, old.announcement)
    with pytest.raises(KeyRejected, match="equivocation"):
        store.add(identity.peer_id, SessionKey(identity, FED, 2).announcement)
    with pytest.raises(KeyRejected, match="wrong_peer"):
        store.add(Identity.generate().peer_id, new.announcement)  # sender must own the key
    assert len(store) == 1 and identity.peer_id in store
    store.forget(identity.peer_id)
    assert store.get(identity.peer_id) is None
