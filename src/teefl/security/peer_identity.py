"""Who is calling: a verified client certificate mapped to a collaborator, and TLS 1.3 enforced.

In mtls mode gRPC verifies the client's chain; `authorize` then binds the certificate's CN to the
collaborator name the client claims in its requests, so col1 cannot upload as col2 and a
certificate from another plan is refused. `check_client_certificate` decides which certificate may
carry which call (enrolment, session certificate, revocation).

TLS 1.3: grpcio's Python API has no minimum-TLS-version setting (no argument, channel option or
environment variable; ``GRPC_SSL_CIPHER_SUITES`` cannot express "1.3 only" -- BoringSSL rejects a
list without TLS 1.2 suites and the server then fails to bind). gRPC clients always negotiate
TLS 1.3 with a gRPC server, but the server would complete a TLS 1.2 handshake with another client.
So the protocol version is enforced per RPC instead: gRPC exposes the negotiated version as the
``ssl_tls_version`` auth-context property and `authorize` refuses anything but ``TLSv1.3``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import grpc

from teefl.errors import TeeflError
from teefl.security import certificates

TRANSPORTS = ("none", "tls", "mtls")
REQUIRED_TLS_VERSION = "TLSv1.3"


class IdentityError(TeeflError):
    """A peer that may not make this call; carries the gRPC status the server should answer with.

    UNAUTHENTICATED: we do not know who the peer is (no client certificate, no TLS 1.3).
    PERMISSION_DENIED: we know who it is, and it is not (that) collaborator.
    """

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code

    def abort(self, context: grpc.ServicerContext) -> None:
        """End the RPC with this error's status and message (raises, as ``context.abort`` does)."""
        context.abort(self.code, str(self))


# -- server side: who is calling? --------------------------------------------------------------
def _auth_value(context: grpc.ServicerContext, name: str) -> str | None:
    values = (context.auth_context() or {}).get(name) or []
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def peer_certificate_pem(context: grpc.ServicerContext) -> str | None:
    """PEM of the verified client certificate of this call (mtls), else None."""
    return _auth_value(context, "x509_pem_cert")


def tls_version(context: grpc.ServicerContext) -> str | None:
    """The negotiated protocol (``TLSv1.3``) of the call's connection; None on plaintext."""
    return _auth_value(context, "ssl_tls_version")


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """CN of the client certificate gRPC verified for this call; None without one.

    gRPC fills ``x509_common_name`` only after verifying the chain against the server's CA (we
    always run mtls with REQUIRE_AND_VERIFY), so the CN can be trusted as the peer's name.
    """
    if _auth_value(context, "transport_security_type") != "ssl":
        return None
    return _auth_value(context, "x509_common_name")


def authorize(
    context: grpc.ServicerContext,
    claimed_name: str,
    allowed: list[str],
    transport: str,
    *,
    require_tls13: bool = True,
) -> str:
    """The collaborator name this call may act as, or `IdentityError`.

    - mtls: the verified certificate CN must equal the name the client claims *and* be one of the
      plan's collaborators; the claim alone proves nothing.
    - tls / none: there is no client identity, the claimed name is taken at face value (after
      checking it is a collaborator of the plan) -- that is what those modes do not protect.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    if transport in ("tls", "mtls") and require_tls13:
        version = tls_version(context)
        if version != REQUIRED_TLS_VERSION:
            raise IdentityError(
                f"connection uses {version or 'no TLS'}; teefl requires {REQUIRED_TLS_VERSION}",
                grpc.StatusCode.UNAUTHENTICATED,
            )
    if transport != "mtls":
        if claimed_name not in allowed:
            raise IdentityError(
                f"'{claimed_name}' is not a collaborator of this plan",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        return claimed_name
    cn = peer_identity(context)
    if cn is None:
        raise IdentityError(
            "no verified client certificate: transport mtls requires one",
            grpc.StatusCode.UNAUTHENTICATED,
        )
    if cn != claimed_name:
        raise IdentityError(
            f"certificate CN '{cn}' does not match claimed collaborator name '{claimed_name}'",
            grpc.StatusCode.PERMISSION_DENIED,
        )
    if cn not in allowed:
        raise IdentityError(
            f"certificate CN '{cn}' is not a collaborator of this plan",
            grpc.StatusCode.PERMISSION_DENIED,
        )
    return cn


# -- server side: is this a client certificate, and the right one? ------------------------------
@dataclass(frozen=True)
class ClientCert:
    """What the aggregator checks on a client certificate the TLS layer already verified
    (chain to a trusted root, validity), parsed once per distinct certificate."""

    cn: str | None
    issuer_der: bytes
    serial: int
    is_ca: bool
    ekus: tuple[str, ...]
    der_sha256: bytes


@functools.lru_cache(maxsize=1024)
def client_cert(encoded: str | bytes) -> ClientCert:
    """Parse a peer certificate (PEM as gRPC's auth context gives it, or DER as Python's ssl
    does). Cached: a collaborator presents the same certificate on every call."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = encoded.encode() if isinstance(encoded, str) else encoded
    if data.lstrip().startswith(b"-----BEGIN"):
        cert = x509.load_pem_x509_certificate(data)
    else:
        cert = x509.load_der_x509_certificate(data)
    der = cert.public_bytes(serialization.Encoding.DER)
    return ClientCert(
        cn=certificates.common_name(cert),
        issuer_der=cert.issuer.public_bytes(),
        serial=cert.serial_number,
        is_ca=certificates.is_ca(cert),
        ekus=tuple(certificates.ekus(cert)),
        der_sha256=hashlib.sha256(der).digest(),
    )


def check_client_certificate(
    cert: ClientCert | None,
    name: str,
    *,
    enrol: bool,
    session_issuer: bytes | None = None,
    session_cert_sha256: bytes | None = None,
    revoked: frozenset[int] = frozenset(),
) -> None:
    """Raise `IdentityError` unless ``cert`` may carry this call or connection of ``name``.

    Every client certificate: CA:false and extended key usage clientAuth (a CA certificate or one
    for another purpose with CN=col1 is not col1's client certificate, whoever signed it).
    ``enrol`` (Challenge, Join): the certificate the plan's CA issued, not revoked.
    Otherwise (model traffic): with ``session_issuer`` (collaborators' attestation required) only
    the session certificate issued at the latest verified Join, ``session_cert_sha256``;
    without it the plan-CA certificate, not revoked.
    """
    if cert is None:
        raise IdentityError(
            "no verified client certificate: transport mtls requires one",
            grpc.StatusCode.UNAUTHENTICATED,
        )
    denied = grpc.StatusCode.PERMISSION_DENIED
    if cert.is_ca:
        raise IdentityError(
            f"the client certificate of {name} is a CA certificate (basicConstraints CA:true): "
            "refused",
            denied,
        )
    if "clientAuth" not in cert.ekus:
        usages = ", ".join(cert.ekus) or "none"
        raise IdentityError(
            f"the client certificate of {name} lacks extended key usage clientAuth "
            f"(it has: {usages}); issue one with: teefl pki issue DIR --collaborator {name}",
            denied,
        )
    from_session = session_issuer is not None and cert.issuer_der == session_issuer
    if enrol and from_session:
        raise IdentityError(
            f"Challenge and Join need the certificate the plan's CA issued to {name}, not a "
            "session certificate",
            denied,
        )
    if not enrol and session_issuer is not None:
        if not from_session:
            raise IdentityError(
                f"model traffic of {name} needs the session certificate issued at its attested "
                "Join; this connection presents its enrolment certificate",
                denied,
            )
        if session_cert_sha256 is None or cert.der_sha256 != session_cert_sha256:
            raise IdentityError(f"{name} has not passed attestation on this TLS key", denied)
        return
    if cert.serial in revoked:
        raise IdentityError(
            f"the certificate of {name} (serial {cert.serial:x}) is revoked (security.tls.crl)",
            denied,
        )
