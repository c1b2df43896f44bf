from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest

from p2pfl.identity import (
    KEY_FILE_NAME,
    Identity,
    IdentityError,
    is_peer_id,
    peer_id_from_public_key,
)


def test_peer_id_format_and_definition() -> None:
    ident = Identity.from_seed(bytes(range(32)))
    expected = base64.b32encode(hashlib.sha256(ident.public_bytes).digest()[:20])
    assert ident.peer_id == expected.decode().lower()
    assert len(ident.peer_id) == 32 and "=" not in ident.peer_id
    assert ident.peer_id == ident.peer_id.lower()
    assert is_peer_id(ident.peer_id)
    assert not is_peer_id(ident.peer_id.upper())
    assert peer_id_from_public_key(ident.public_bytes) == ident.peer_id
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"short")


def test_from_seed_is_deterministic_and_generate_is_not() -> None:
    a, b = Identity.from_seed(b"\x07" * 32), Identity.from_seed(b"\x07" * 32)
    assert a.peer_id == b.peer_id and a == b
    assert Identity.from_seed(b"\x08" * 32).peer_id != a.peer_id
    assert Identity.generate().peer_id != Identity.generate().peer_id
    with pytest.raises(ValueError):
        Identity.from_seed(b"\x00" * 31)


def test_repr_shows_no_key_material() -> None:
    ident = Identity.from_seed(b"\x01" * 32)
    text = repr(ident)
    assert ident.peer_id in text
    assert ident.to_pem().decode() not in text and "PRIVATE" not in text


def test_load_or_create_round_trip_and_modes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "node" / "data"
    with caplog.at_level(logging.DEBUG, logger="p2pfl.identity"):
        first = Identity.load_or_create(data_dir)
    key_file = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert os.listdir(data_dir) == [KEY_FILE_NAME]  # no temp file left behind
    again = Identity.load_or_create(data_dir)
    assert again.peer_id == first.peer_id
    assert again.public_bytes == first.public_bytes
    # The log names the id, never the key.
    assert first.peer_id in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_existing_directory_is_kept(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    Identity.load_or_create(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_corrupt_key_file_raises_and_is_not_overwritten(tmp_path: Path) -> None:
    key_file = tmp_path / KEY_FILE_NAME
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    key_file.chmod(0o600)
    before = key_file.read_bytes()
    with pytest.raises(IdentityError, match=KEY_FILE_NAME):
        Identity.load_or_create(tmp_path)
    assert key_file.read_bytes() == before


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file = tmp_path / KEY_FILE_NAME
    key_file.write_bytes(pem)
    with pytest.raises(IdentityError, match="Ed25519"):
        Identity.load_or_create(tmp_path)


def test_group_readable_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ident = Identity.load_or_create(tmp_path)
    key_file = tmp_path / KEY_FILE_NAME
    with caplog.at_level(logging.WARNING, logger="p2pfl.identity"):
        Identity.load_or_create(tmp_path)
    assert not caplog.records
    key_file.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="p2pfl.identity"):
        loaded = Identity.load_or_create(tmp_path)
    assert loaded.peer_id == ident.peer_id
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    assert "PRIVATE KEY" not in caplog.text


def test_pem_round_trip() -> None:
    ident = Identity.from_seed(b"\x05" * 32)
    assert Identity.from_pem(ident.to_pem()).peer_id == ident.peer_id
    with pytest.raises(IdentityError, match=r"somewhere\.key"):
        Identity.from_pem(b"not a key", source="somewhere.key")
