"""Keys born in the party's process (inside its TEE), and the certificates made for them.

Why: a TLS key that an administrator issued lives in a file, and a file on a host is readable by
that host's operator -- who could then stand in for the TEE on any connection bound to that key
(docs/security.md). With attestation required, a party therefore makes its TLS key pair in
memory at start-up and never writes it anywhere; its evidence is bound to that key, and only a
certificate *for that key* carries model traffic:

- the aggregator (``attestation.aggregator: required``) serves with an in-memory key and a
  self-signed certificate (RA-TLS style) that collaborators pin after checking its evidence;
- a collaborator (``attestation.collaborators: required``) sends the public half of its
  in-memory key with its evidence at Join; the aggregator, once the evidence is verified, issues
  a short-lived client certificate for exactly that key from a `SessionCA` that it generated in
  memory at its own start-up (and that no file ever holds).

The provisioned key files remain the admin-issued identity used to enrol (Challenge, Join) and,
for the aggregator, to endorse its in-memory key.

Python's ``ssl`` module loads keys only from files, so `load_chain` hands it the PEM through an
anonymous in-memory file (``memfd_create``): the key never touches a file system.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teefl.errors import TeeflError

#: a session certificate is valid this long; a rejoin issues a new one (and revokes the old)
SESSION_CERT_LIFETIME = dt.timedelta(hours=24)
#: the in-memory server certificate and the session CA live as long as the process, within this
PROCESS_CERT_LIFETIME = dt.timedelta(days=30)
_SKEW = dt.timedelta(minutes=5)
_HASH = hashes.SHA384()


def new_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-384 key pair, in this process's memory only."""
    return ec.generate_private_key(ec.SECP384R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM -- for gRPC and `load_chain`, in memory."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def spki_of(key_or_cert: object) -> bytes:
    """DER SubjectPublicKeyInfo of a key (private or public) or certificate."""
    if isinstance(key_or_cert, x509.Certificate):
        public = key_or_cert.public_key()
    elif hasattr(key_or_cert, "public_bytes"):
        public = key_or_cert
    else:
        public = key_or_cert.public_key()  # type: ignore[attr-defined]
    return public.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teefl"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def self_signed_server(key: ec.EllipticCurvePrivateKey, hosts: list[str]) -> bytes:
    """A self-signed server certificate (PEM) for ``key``, SANs = ``hosts``.

    Nobody trusts it for its signature: a collaborator pins exactly this certificate once the
    aggregator's evidence (bound to its key) and endorsement have been verified.
    """
    from teefl.security.pki import san_entry

    sans: list[x509.GeneralName] = []
    for h in hosts:
        entry = san_entry(h)
        if entry not in sans:
            sans.append(entry)
    now = _now()
    name = _name(f"teefl aggregator {secrets.token_hex(4)}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + PROCESS_CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, _HASH)
    )
    return cert_pem(cert)


class SessionCA:
    """The aggregator's in-memory CA for collaborators' session certificates.

    Made at start-up and never written anywhere: a certificate it signed can only have been
    issued by this very process, after a verified Join. A restart makes a new one, so every
    certificate of the previous process stops working at once.
    """

    def __init__(self) -> None:
        self.key = new_key()
        now = _now()
        self.name = _name(f"teefl session CA {secrets.token_hex(6)}")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + PROCESS_CERT_LIFETIME)
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
            .sign(self.key, _HASH)
        )
        self.pem = cert_pem(self.cert)
        #: DER of the subject: how a peer certificate's issuer is recognised as this CA
        self.subject_der = self.name.public_bytes()

    def issue(self, name: str, spki_der: bytes) -> tuple[bytes, bytes]:
        """A client certificate (CN = ``name``, EKU clientAuth, CA:false) for the public key
        ``spki_der``; returns (PEM, SHA-256 of its DER) -- the fingerprint every later call and
        data connection of that session must present."""
        try:
            public = serialization.load_der_public_key(spki_der)
        except (ValueError, TypeError):
            raise TeeflError("session key is not a DER SubjectPublicKeyInfo") from None
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise TeeflError("session key must be an EC public key")
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + SESSION_CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, _HASH)
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        return cert_pem(cert), hashlib.sha256(der).digest()


# -- Python ssl with keys that exist only in memory ----------------------------------------------
def load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem_bytes: bytes) -> None:
    """``ctx.load_cert_chain`` from PEM bytes, through an anonymous in-memory file.

    ``memfd_create`` makes a file that lives in this process's memory (in a TEE: the TEE's
    memory) and has no name in any file system; OpenSSL reads it through ``/proc/self/fd``.
    """
    create = getattr(os, "memfd_create", None)
    if create is None:
        raise TeeflError(
            "this platform has no memfd_create: Python's ssl cannot load an in-memory key here "
            "(use network.data_plane: grpc)"
        )
    try:
        fd = create("teefl-tls", getattr(os, "MFD_CLOEXEC", 0))
    except OSError as exc:
        raise TeeflError(
            f"cannot make an in-memory file for the TLS key ({exc.strerror or exc}); "
            "use network.data_plane: grpc"
        ) from None
    try:
        os.write(fd, bytes(chain_pem) + b"\n" + bytes(key_pem_bytes))
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except (OSError, ssl.SSLError) as exc:
        raise TeeflError(
            f"cannot load the in-memory TLS key through /proc/self/fd ({exc}); "
            "use network.data_plane: grpc"
        ) from None
    finally:
        os.close(fd)


def server_ssl_context(
    chain: tuple[bytes, bytes] | tuple[Path, Path], client_roots_pem: bytes | None
) -> ssl.SSLContext:
    """TLS 1.3 server context: certificate and key as PEM bytes (in memory) or file paths;
    with ``client_roots_pem`` every client must present a certificate issued by one of them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cert, key = chain
    if isinstance(cert, bytes) and isinstance(key, bytes):
        load_chain(ctx, cert, key)
    else:
        ctx.load_cert_chain(str(cert), str(key))
    if client_roots_pem is not None:
        ctx.load_verify_locations(cadata=client_roots_pem.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(
    roots_pem: bytes, chain: tuple[bytes, bytes] | tuple[Path, Path] | None, *, pinned: bool
) -> ssl.SSLContext:
    """TLS 1.3 client context trusting only ``roots_pem``. ``pinned``: the root *is* the
    server's own (self-signed, attested) certificate, so the host name is not what identifies
    it (the chain can only be that one certificate); otherwise the name is checked as usual."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = not pinned
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    if chain is not None:
        cert, key = chain
        if isinstance(cert, bytes) and isinstance(key, bytes):
            load_chain(ctx, cert, key)
        else:
            ctx.load_cert_chain(str(cert), str(key))
    return ctx
