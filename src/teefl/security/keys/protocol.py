"""What a key release binds, and how a released secret travels: both sides of `teefl keys serve`.

A party asks the owner's key service for a secret in two calls: Challenge (a fresh nonce), then
Release with TEE evidence whose report data is ``report_data_for(tee_key, nonce, binding)``:

- ``tee_key``: the DER SubjectPublicKeyInfo of an EC P-384 key the party made in memory for this
  request. The secrets come back wrapped to it (`wrap`), so only the process holding that key --
  the one whose TEE produced the evidence -- can read them; not the host, not a TLS-terminating
  proxy, not a host that also holds the party's client-certificate key file.
- ``nonce``: the service's, single use, with a time to live: a replayed quote is refused.
- ``binding``: SHA-256 of the `release_document`: the SPKI of the client certificate of the
  mTLS connection that carries the request (evidence made for one connection is refused on
  another), the items asked for, and the party's own configuration binding
  (`teefl.security.attest.party_binding`: plan, CA, code digests), which the service records
  and may pin.

Why this shape: it is the one of Confidential Containers' KBS (evidence binds a TEE-held public
key and the service's nonce; the resource comes back encrypted to that key), on the federation's
own PKI and verifiers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teefl.errors import TeeflError

#: the secrets a key service can release
SEALING_KEY = "sealing_key"
TLS_KEY = "tls_key"
ITEMS = (SEALING_KEY, TLS_KEY)
#: version of `release_document`; bump when its fields change meaning
RELEASE_VERSION = 1
_PURPOSE = "teefl key release"
_WRAP_INFO = b"teefl key release wrap v1\0"
_IV_SIZE = 12


class ReleaseError(TeeflError):
    """A release that cannot be made or read (malformed request, unwrap failure)."""


def check_items(items: Iterable[str]) -> list[str]:
    """The items asked for, sorted and without repeats; an unknown name is refused."""
    wanted = sorted(set(items))
    unknown = [i for i in wanted if i not in ITEMS]
    if unknown:
        raise ReleaseError(
            f"unknown item {unknown[0]!r}: a key service releases {', '.join(ITEMS)}"
        )
    if not wanted:
        raise ReleaseError(f"no item asked for (one or more of {', '.join(ITEMS)})")
    return wanted


def release_document(client_spki: bytes, items: Iterable[str], party_binding: bytes) -> dict:
    """What the evidence's binding hashes: the connection's client key, the items, the party's
    configuration binding. Its keys differ from the federation's `binding_document`, so evidence
    made for a Join can never pass as a release request or the other way round."""
    return {
        "purpose": _PURPOSE,
        "version": RELEASE_VERSION,
        "client": hashlib.sha256(bytes(client_spki)).hexdigest(),
        "items": check_items(items),
        "party": bytes(party_binding).hex(),
    }


def release_binding(client_spki: bytes, items: Iterable[str], party_binding: bytes) -> bytes:
    """SHA-256 of the canonical `release_document`: the binding hashed into report data."""
    doc = release_document(client_spki, items, party_binding)
    return hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).digest()


def public_key_of(spki: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """An EC P-384 public key from its DER SubjectPublicKeyInfo, or `ReleaseError`."""
    try:
        key = serialization.load_der_public_key(bytes(spki))
    except (ValueError, TypeError):
        raise ReleaseError(f"{what} is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ReleaseError(f"{what} must be an EC P-384 public key")
    return key


def spki_of(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _wrap_key(
    own: ec.EllipticCurvePrivateKey,
    peer: ec.EllipticCurvePublicKey,
    nonce: bytes,
    tee_spki: bytes,
    service_spki: bytes,
) -> bytes:
    """The AES-256 key both sides derive: HKDF-SHA256 over the ECDH secret, salted with the
    release's nonce and bound to both public keys."""
    shared = own.exchange(ec.ECDH(), peer)
    info = _WRAP_INFO + hashlib.sha256(tee_spki).digest() + hashlib.sha256(service_spki).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(nonce), info=info).derive(shared)


@dataclass(frozen=True)
class Wrapped:
    item: str
    iv: bytes
    ciphertext: bytes


def wrap(
    secrets: Mapping[str, bytes], tee_spki: bytes, nonce: bytes
) -> tuple[bytes, list[Wrapped]]:
    """Encrypt each secret to ``tee_spki`` under a one-time key of the service: returns (the
    service key's SPKI, the wrapped items). The one-time private key is dropped on return."""
    tee = public_key_of(tee_spki, "tee_key")
    own = ec.generate_private_key(ec.SECP384R1())
    service_spki = spki_of(own)
    aead = AESGCM(_wrap_key(own, tee, nonce, bytes(tee_spki), service_spki))
    out = []
    for item in sorted(secrets):
        iv = os.urandom(_IV_SIZE)
        out.append(Wrapped(item, iv, aead.encrypt(iv, bytes(secrets[item]), item.encode())))
    return service_spki, out


def unwrap(
    tee_key: ec.EllipticCurvePrivateKey,
    service_spki: bytes,
    nonce: bytes,
    wrapped: Iterable[Wrapped],
) -> dict[str, bytes]:
    """The secrets of a release, decrypted with the party's in-memory key."""
    service = public_key_of(service_spki, "the key service's wrapping key")
    aead = AESGCM(_wrap_key(tee_key, service, nonce, spki_of(tee_key), bytes(service_spki)))
    out = {}
    for w in wrapped:
        try:
            out[w.item] = aead.decrypt(bytes(w.iv), bytes(w.ciphertext), w.item.encode())
        except (InvalidTag, ValueError):
            raise ReleaseError(
                f"the released {w.item} does not decrypt with this request's key (modified in "
                "transit, or wrapped to another key)"
            ) from None
    return out


__all__ = [
    "ITEMS",
    "RELEASE_VERSION",
    "SEALING_KEY",
    "TLS_KEY",
    "ReleaseError",
    "Wrapped",
    "check_items",
    "public_key_of",
    "release_binding",
    "release_document",
    "spki_of",
    "unwrap",
    "wrap",
]
