"""Mutual TLS 1.3 with identity certificates signed by a derived federation CA.

Why this design:
- Each node's TLS key *is* its Ed25519 identity key, and the peer id is a hash of that
  public key (as in libp2p's TLS handshake). Completing a TLS 1.3 handshake proves
  possession of the key, so after the handshake we read the peer certificate and hash
  its public key: that is the peer's authenticated id. No invented crypto.
- Python's `ssl` has no custom verification callback, so with CERT_REQUIRED it refuses a
  bare self-signed identity certificate. Instead every member derives the same federation
  CA key, HKDF-SHA256(ikm=secret or b"", salt=b"p2pfl-federation-ca-v1", info=name) ->
  Ed25519 seed, and signs its own node certificate with it. Both sides run CERT_REQUIRED
  with that CA as the only trust anchor, so a node of another federation (other name or
  other secret) fails the handshake inside OpenSSL.
- An `open` federation (no secret) derives its CA from the public name alone: anyone can
  join, but still only under an id they hold the key for. With a secret, only parties that
  know it can mint a certificate the others accept. The secret must be high-entropy (e.g.
  32 random bytes): an active peer receives node certificates and could test guesses of a
  weak secret offline against the CA signature.
- The CA authenticates membership only; it never vouches for ids. Any member can sign a
  certificate with any CN, so the CN is informative and the id check (hash of the
  certificate's key vs the expected id) happens after the handshake, in the caller.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pfl.identity import Identity, peer_id_from_public_key
from p2pfl.transport.base import HandshakeError

CA_SALT = b"p2pfl-federation-ca-v1"
# Fixed so every member builds a byte-identical CA certificate (Ed25519 is deterministic).
CA_SERIAL = 1
NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
_CONTEXT_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class FederationCA:
    key: Ed25519PrivateKey
    cert: x509.Certificate
    cert_pem: str


def derive_ca_seed(federation: str, secret: bytes | None) -> bytes:
    """32-byte Ed25519 seed of the federation CA; the secret is the HKDF keying material."""
    if not federation:
        raise ValueError("federation name must not be empty")
    if secret is not None and len(secret) == 0:
        raise ValueError("federation secret must be None (open federation) or non-empty")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=CA_SALT,
        info=b"federation:" + federation.encode("utf-8"),
    )
    return hkdf.derive(secret if secret is not None else b"")


@lru_cache(maxsize=64)
def federation_ca(federation: str, secret: bytes | None) -> FederationCA:
    """The deterministic self-signed CA every member of the federation derives alike."""
    key = Ed25519PrivateKey.from_private_bytes(derive_ca_seed(federation, secret))
    public = key.public_key()
    # The name carries a fingerprint of the CA key, not the (possibly long, non-ASCII)
    # federation name: distinct federations get distinct issuer names.
    fingerprint = hashlib.sha256(_raw_public(public)).hexdigest()[:16]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2pfl federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"p2pfl-ca-{fingerprint}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(CA_SERIAL)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, None)
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return FederationCA(key=key, cert=cert, cert_pem=pem)


def node_certificate(identity: Identity, ca: FederationCA) -> x509.Certificate:
    """Certificate for the identity key, CN = peer id, signed by the federation CA."""
    public = identity.private_key.public_key()
    serial = int.from_bytes(hashlib.sha256(identity.public_bytes).digest()[:16], "big") >> 1
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(serial or 1)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, None)
    )


_contexts: OrderedDict[tuple[bytes, str, bytes | None, bool], ssl.SSLContext] = OrderedDict()


def make_ssl_context(
    identity: Identity, federation: str, secret: bytes | None, *, server: bool
) -> ssl.SSLContext:
    """TLS 1.3-only mutual-auth context; cached, since building one signs a certificate."""
    cache_key = (identity.public_bytes, federation, secret, server)
    ctx = _contexts.get(cache_key)
    if ctx is not None:
        _contexts.move_to_end(cache_key)
        return ctx
    ctx = _build_context(identity, federation_ca(federation, secret), server=server)
    _contexts[cache_key] = ctx
    if len(_contexts) > _CONTEXT_CACHE_SIZE:
        _contexts.popitem(last=False)
    return ctx


def build_context(
    identity: Identity, trust: FederationCA, cert: x509.Certificate, *, server: bool
) -> ssl.SSLContext:
    """Context trusting only `trust` and presenting `cert` with the identity key.

    Public so tests can build deliberately mismatched contexts.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # we check the peer id (key hash) instead of a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=trust.cert_pem)
    if server:
        # No resumption: every connection does a full handshake with certificates, and no
        # post-handshake ticket messages linger on the wire.
        ctx.num_tickets = 0
    _load_chain(ctx, identity, cert)
    return ctx


def _build_context(identity: Identity, ca: FederationCA, *, server: bool) -> ssl.SSLContext:
    return build_context(identity, ca, node_certificate(identity, ca), server=server)


def _load_chain(ctx: ssl.SSLContext, identity: Identity, cert: x509.Certificate) -> None:
    """`load_cert_chain` only reads files: write cert+key to a private temp dir, then wipe.

    The directory is 0700 (mkdtemp), the file 0600 and removed before returning; tmpfs
    (/dev/shm) is preferred so the key never touches a disk.
    """
    pem = cert.public_bytes(serialization.Encoding.PEM) + identity.to_pem()
    with tempfile.TemporaryDirectory(prefix="p2pfl-tls-", dir=_ram_tmp_dir()) as tmp:
        path = Path(tmp) / "node.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path)
        finally:
            path.unlink(missing_ok=True)


def _ram_tmp_dir() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> object: ...


def peer_id_of(ssl_object: _HasPeerCert) -> str:
    """Authenticated peer id after a completed handshake: hash of the cert's Ed25519 key."""
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise HandshakeError("peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        public = cert.public_key()
    except ValueError as exc:
        raise HandshakeError(f"peer certificate unreadable: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise HandshakeError(f"peer certificate key is {type(public).__name__}, expected Ed25519")
    return peer_id_from_public_key(_raw_public(public))


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
