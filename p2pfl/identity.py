"""A node's long-term Ed25519 identity and the peer id derived from it.

The peer id is a hash of the public key, so a peer proves its id simply by proving
possession of the key (the TLS handshake does that); nobody can claim an id without it.
The key lives in `<data_dir>/identity.key` as unencrypted PEM PKCS8: the daemon must
start unattended, so protection comes from file permissions (0600 in a 0700 dir): a data
dir or key file that another user could write, or that another user owns, is refused
(`p2pfl.datadir`), and the key is never read through a symlink.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfl.datadir import check_private, ensure_dir, fsync_dir, os_error
from p2pfl.fatal import DataDirUnusable

log = logging.getLogger("p2pfl.identity")

KEY_FILE_NAME = "identity.key"
PEER_ID_LENGTH = 32  # base32 characters: 20 hash bytes = 160 bits = 32 chars, no padding


class IdentityError(DataDirUnusable):
    """The identity key file exists but cannot be used (corrupt, wrong type, unreadable,
    writable or owned by another user, a symlink): the data dir is unusable as it is."""


def peer_id_from_public_key(raw32: bytes) -> str:
    """Short printable id: lowercase unpadded base32 of sha256(raw key) cut to 20 bytes.

    160 bits keep collisions out of reach while fitting in a log line or a CLI argument.
    """
    if len(raw32) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw32)}")
    digest = hashlib.sha256(raw32).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def is_peer_id(s: str) -> bool:
    """True if `s` has the shape of a peer id (cheap syntax check for config and CLI)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return len(s) == PEER_ID_LENGTH and all(c in alphabet for c in s)


class Identity:
    """An Ed25519 private key with its raw public key and peer id precomputed."""

    __slots__ = ("peer_id", "private_key", "public_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = peer_id_from_public_key(self.public_bytes)

    def __repr__(self) -> str:
        # Never include key material, even by accident in a log line.
        return f"Identity(peer_id={self.peer_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.public_bytes == self.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed: for tests and simulations only."""
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def to_pem(self) -> bytes:
        """Unencrypted PEM PKCS8, the on-disk format of `identity.key`."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes, *, source: str = "<pem>") -> Identity:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # The message of these exceptions never echoes key bytes.
            raise IdentityError(
                f"{source}: not a valid unencrypted PEM PKCS8 private key "
                f"({type(exc).__name__}); fix or move the file away, it is never overwritten"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(
                f"{source}: holds a {type(key).__name__}, expected an Ed25519 private key"
            )
        return cls(key)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Load `<data_dir>/identity.key`, or create it (0600) if it does not exist.

        An existing file is never overwritten: a corrupt key raises IdentityError, since
        silently replacing it would change the node's peer id behind the operator's back.
        """
        path = ensure_dir(Path(data_dir)) / KEY_FILE_NAME  # refuses a dir others can write
        existing = _load(path)
        if existing is not None:
            return existing
        identity = cls.generate()
        try:
            created = _create_exclusive(path, identity.to_pem())
        except OSError as exc:
            raise os_error(exc, path, "create identity key") from None
        if created:
            log.info("created new identity %s in %s", identity.peer_id, path)
            return identity
        # Another process created the file between our check and our link: use theirs.
        theirs = _load(path)
        if theirs is None:
            raise IdentityError(f"{path}: vanished while being created; try again")
        return theirs


def load_identity(data_dir: Path) -> Identity | None:
    """The identity in `data_dir`, None if it has none; never creates one (for readers
    of a stopped node's data dir, such as `p2pfl status --offline`)."""
    return _load(Path(data_dir) / KEY_FILE_NAME)


def _load(path: Path) -> Identity | None:
    """The identity in `path`, None if there is none; IdentityError if it cannot be trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise IdentityError(
                f"{path} is a symbolic link; the identity key must be a file in the data dir: "
                "replace the link with the key file itself"
            ) from None
        raise IdentityError(f"{path}: cannot read identity key ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{path} is not a regular file; move it out of the data dir")
        try:
            check_private(path, st, what="identity key", mode="600")
        except DataDirUnusable as exc:
            raise IdentityError(str(exc)) from None
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read identity key ({exc.strerror})") from None
    finally:
        os.close(fd)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "identity key %s is accessible by group/others (mode %o); run: chmod 600 %s",
            path,
            stat.S_IMODE(st.st_mode),
            path,
        )
    return Identity.from_pem(data, source=str(path))


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically with mode 0600; False if `path` already exists.

    The bytes go to a fresh temp file (O_EXCL, 0600) that is fsynced and then hard-linked
    into place: link() fails if the target exists, so a concurrent creator never gets
    its key replaced, and readers never see a half-written file.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # File systems without hard links: fall back to rename, after a last check.
            if os.path.lexists(path):
                return False
            os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True
