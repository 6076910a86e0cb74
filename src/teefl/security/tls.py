"""gRPC transport security for the federation: credentials, peer identity, and readable failures.

Three things gRPC does not do for us, and why they matter here:

1. **Check our own certificates before use.** gRPC reports an expired certificate, a key that
   belongs to another certificate or a certificate of another CA only as a failed handshake -- and
   usually on the *other* machine. `server_credentials` / `channel_credentials` run the checks a
   peer would run (`teefl.security.certificates.check_certificate`) and name the file that is wrong.
2. **Map a verified certificate to a collaborator.** In mtls mode gRPC verifies the client's
   chain; `authorize` then binds the certificate's CN to the collaborator name the client claims
   in its requests, so col1 cannot upload as col2 and a certificate from another plan is refused.
3. **Explain why a channel does not come up.** A client sees "failed to connect to all addresses"
   or "Socket closed" for half a dozen distinct mistakes. `diagnose_connection` probes the target
   with Python's `ssl` module (what does it speak? which certificate does it present? does it accept
   our client certificate?) and compares with the configured CA and host.

TLS 1.3: grpcio's Python API has no minimum-TLS-version setting (no argument, channel option or
environment variable; ``GRPC_SSL_CIPHER_SUITES`` cannot express "1.3 only" -- BoringSSL rejects a
list without TLS 1.2 suites and the server then fails to bind). gRPC clients always negotiate
TLS 1.3 with a gRPC server, but the server would complete a TLS 1.2 handshake with another client.
So the protocol version is enforced per RPC instead: gRPC exposes the negotiated version as the
``ssl_tls_version`` auth-context property and `authorize` refuses anything but ``TLSv1.3``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from teefl.errors import TeeflError
from teefl.security import certificates

if TYPE_CHECKING:
    from teefl.plan import SecuritySpec

TRANSPORTS = ("none", "tls", "mtls")
REQUIRED_TLS_VERSION = "TLSv1.3"

#: the HTTP/2 client preface plus an empty SETTINGS frame: any gRPC server answers with SETTINGS
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x04


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


class ConnectError(TeeflError):
    """The channel to the aggregator did not come up; ``retryable`` when waiting may help
    (nothing listening yet, no answer) as opposed to a configuration mistake."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# -- credentials -------------------------------------------------------------------------------
def server_credentials(
    ca: Path,
    cert: Path,
    key: Path,
    require_client_cert: bool,
    extra_roots: bytes | None = None,
) -> grpc.ServerCredentials:
    """Credentials for the aggregator's port: TLS with ``cert``/``key``; with
    ``require_client_cert`` (mtls) every client must present a certificate issued by ``ca``
    (or by one of ``extra_roots``, PEM: the aggregator's in-memory session CA).

    In tls mode the CA is not given to gRPC at all, so no client certificate is even requested --
    identity then rests on the claimed name only (see `authorize`).
    """
    certificates.check_certificate(
        Path(cert), ca_path=Path(ca), key_path=Path(key), purpose="server"
    )
    ca_pem = Path(ca).read_bytes()
    if extra_roots:
        ca_pem = ca_pem.rstrip(b"\n") + b"\n" + extra_roots
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=ca_pem if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def channel_credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a collaborator's channel: trust only ``ca`` (not the system store, so a
    publicly-issued certificate cannot stand in for the aggregator); present ``cert``/``key`` for
    mtls. Both or neither of ``cert``/``key``."""
    ca = Path(ca)
    if (cert is None) != (key is None):
        missing = "key" if key is None else "certificate"
        raise TeeflError(f"client {missing} missing: mtls needs both a certificate and its key")
    ca_cert = certificates.load_certificate(ca)
    if not certificates.is_ca(ca_cert):
        raise TeeflError(f"{ca} is not a CA certificate (basicConstraints CA is not true)")
    certificates.check_validity(ca_cert, ca)
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    certificates.check_certificate(Path(cert), ca_path=ca, key_path=Path(key), purpose="client")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )


def effective_transport(security: SecuritySpec) -> str:
    """The plan's transport, resolving ``None`` as documented in `teefl.plan.SecuritySpec`:
    mtls when certificates are configured, otherwise the user must choose (never silently none)."""
    if security.transport is not None:
        return security.transport
    if security.tls.ca is not None:
        return "mtls"
    raise TeeflError(
        "security.transport is not set: choose none, tls or mtls in the plan "
        "(certificates for tls/mtls: teefl pki plan PLAN)"
    )


def _need(value: Path | None, key: str, transport: str) -> Path:
    if value is None:
        raise TeeflError(
            f"security.transport is {transport} but security.tls.{key} is not set "
            "(teefl pki plan PLAN prints the block to paste)"
        )
    return value


def server_credentials_for(security: SecuritySpec) -> grpc.ServerCredentials | None:
    """The aggregator's credentials for a plan's security section; None for transport none."""
    transport = effective_transport(security)
    if transport == "none":
        return None
    t = security.tls
    return server_credentials(
        _need(t.ca, "ca", transport),
        _need(t.server_cert, "server_cert", transport),
        _need(t.server_key, "server_key", transport),
        require_client_cert=transport == "mtls",
    )


def client_paths_for(security: SecuritySpec, name: str) -> tuple[Path, Path] | None:
    """(certificate, key) collaborator ``name`` presents: ``<client_dir>/<name>.crt|.key`` in
    mtls mode, None otherwise."""
    transport = effective_transport(security)
    if transport != "mtls":
        return None
    client_dir = _need(security.tls.client_dir, "client_dir", transport)
    return client_dir / f"{name}.crt", client_dir / f"{name}.key"


def channel_credentials_for(security: SecuritySpec, name: str) -> grpc.ChannelCredentials | None:
    """Collaborator ``name``'s channel credentials for a plan; None for transport none."""
    transport = effective_transport(security)
    if transport == "none":
        return None
    ca = _need(security.tls.ca, "ca", transport)
    paths = client_paths_for(security, name)
    if paths is None:
        return channel_credentials(ca)
    return channel_credentials(ca, *paths)


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


# -- client side: why does the channel not come up? --------------------------------------------
@dataclass
class Diagnosis:
    """One line for the user; ``retryable`` when the aggregator may simply not be up yet."""

    message: str
    retryable: bool


@dataclass
class _Probe:
    speaks: str  # "tls" | "plaintext" | "unknown"
    server_cert_der: bytes | None = None
    accepted: bool | None = None  # did the server go on talking HTTP/2 after our handshake?
    tls_version: str | None = None
    error: str | None = None


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``ipv4:host:port`` / ``dns:///host:port`` -> (host, port)."""
    t = target
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(prefix):
            t = t[len(prefix) :]
            break
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = t.rpartition(":")
    if not host or not port.isdigit():
        raise TeeflError(f"cannot parse aggregator address {target!r}; expected HOST:PORT")
    return host, int(port)


def _tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext:
    # No verification: we want to *see* the certificate to explain what is wrong with it.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        with contextlib.suppress(OSError, ssl.SSLError):
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _answers_h2(sock: Any) -> bool:
    """Send the HTTP/2 preface; a gRPC server answers with a SETTINGS frame, a refusing TLS server
    (client certificate rejected) closes the connection."""
    sock.sendall(_H2_PREFACE)
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < 9:
            chunk = sock.recv(9 - len(data))
            if not chunk:
                break
            data += chunk
    return len(data) >= 4 and data[3] == _H2_SETTINGS


def _probe(host: str, port: int, cert: Path | None, key: Path | None, timeout: float) -> _Probe:
    with socket.create_connection((host, port), timeout=timeout) as raw:
        try:
            with _tls_context(cert, key).wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
                version = tls.version()
                accepted = _answers_h2(tls)
                return _Probe("tls", der, accepted, version)
        except (ssl.SSLError, OSError) as exc:
            tls_error = getattr(exc, "reason", None) or str(exc)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        if _answers_h2(raw):
            return _Probe("plaintext", error=tls_error)
    return _Probe("unknown", error=tls_error)


def _server_cert_problem(der: bytes, host: str, ca: Path | None, target: str) -> str | None:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    if ca is not None:
        try:
            ca_cert = certificates.load_certificate(ca)
        except TeeflError as exc:
            return str(exc)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except Exception:
            return (
                f"the aggregator's certificate at {target} is not signed by CA {ca} (unknown CA): "
                f"it was issued by '{cert.issuer.rfc4514_string()}', the CA file is "
                f"'{ca_cert.subject.rfc4514_string()}'; use the ca.crt of the aggregator's PKI"
            )
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        return (
            f"the aggregator's certificate at {target} expired on "
            f"{certificates.format_time(cert.not_valid_after_utc)}; re-issue it with: "
            "teefl pki issue DIR --aggregator HOST --force"
        )
    if now < cert.not_valid_before_utc:
        return (
            f"the aggregator's certificate at {target} is not valid before "
            f"{certificates.format_time(cert.not_valid_before_utc)} (is a clock wrong?)"
        )
    if not certificates.covers_host(cert, host):
        names = ", ".join(certificates.sans(cert)) or f"none; CN {certificates.common_name(cert)!r}"
        return (
            f"aggregator certificate does not cover host '{host}' (SANs: {names}); connect by "
            f"one of those names or re-issue it with: teefl pki issue DIR --aggregator {host}"
        )
    usages = certificates.ekus(cert)
    if usages and "serverAuth" not in usages:
        return (
            f"the certificate at {target} is not a server certificate (extended key usage: "
            f"{', '.join(usages)})"
        )
    return None


def _client_cert_problem(
    target: str, transport: str, cert: Path | None, server_der: bytes | None
) -> str:
    if transport == "tls":
        return (
            f"the aggregator at {target} requires a client certificate (is its transport mtls?) "
            "but this collaborator is configured with transport tls"
        )
    if cert is None:
        return (
            f"the aggregator at {target} requires a client certificate but none is configured "
            "for this collaborator"
        )
    from cryptography import x509

    why = "it is not issued by a CA the aggregator trusts (unknown CA), or it is not valid"
    with contextlib.suppress(Exception):
        mine = certificates.load_certificate(cert)
        if server_der is not None:
            theirs = x509.load_der_x509_certificate(server_der)
            if mine.issuer != theirs.issuer:
                why = (
                    f"it was issued by '{mine.issuer.rfc4514_string()}' but the aggregator's "
                    f"CA is '{theirs.issuer.rfc4514_string()}' (unknown CA)"
                )
    return f"the aggregator at {target} refused the client certificate {cert}: {why}"


def _from_details(details: str) -> str | None:
    """Last resort when probing told us nothing: translate gRPC's/BoringSSL's text."""
    table = [
        (
            "unable to get local issuer certificate",
            "its certificate is not signed by the configured CA (unknown CA)",
        ),
        ("certificate has expired", "its certificate has expired"),
        ("certificate is not yet valid", "its certificate is not valid yet (is a clock wrong?)"),
        ("Hostname Verification Check failed", "its certificate does not cover the host dialled"),
        ("WRONG_VERSION_NUMBER", "it does not speak TLS (is its transport none?)"),
    ]
    for needle, meaning in table:
        if needle in details:
            return meaning
    return None


def _details(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        with contextlib.suppress(Exception):
            return str(exc.details() or "")
    return str(exc)


def diagnose_connection(
    target: str,
    transport: str,
    ca: Path | None = None,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    exc: BaseException | None = None,
    timeout: float = 2.0,
) -> Diagnosis:
    """Find out, by talking to ``target`` directly, why a gRPC channel to it does not come up."""
    ca = Path(ca) if ca is not None else None
    cert = Path(cert) if cert is not None else None
    key = Path(key) if key is not None else None
    host, port = split_target(target)
    details = _details(exc)
    try:
        probe = _probe(host, port, cert if transport == "mtls" else None, key, timeout)
    except ConnectionRefusedError:
        return Diagnosis(
            f"nothing is listening at {target} (connection refused); is the aggregator running?",
            retryable=True,
        )
    except socket.gaierror as e:
        return Diagnosis(f"cannot resolve host '{host}': {e.strerror}", retryable=False)
    except TimeoutError:
        return Diagnosis(
            f"no answer from {target} within {timeout:g} s (wrong address, firewall, or the "
            "aggregator is not up yet?)",
            retryable=True,
        )
    except OSError as e:
        return Diagnosis(f"cannot connect to {target}: {e.strerror or e}", retryable=True)

    if transport == "none":
        if probe.speaks == "tls":
            return Diagnosis(
                f"the aggregator at {target} speaks TLS but this collaborator is configured "
                "with transport none",
                retryable=False,
            )
    elif probe.speaks == "plaintext":
        return Diagnosis(
            f"the aggregator at {target} does not speak TLS (is its transport none?)",
            retryable=False,
        )
    elif probe.speaks == "tls" and probe.server_cert_der is not None:
        problem = _server_cert_problem(probe.server_cert_der, host, ca, target)
        if problem is not None:
            return Diagnosis(problem, retryable=False)
        if probe.accepted is False:
            return Diagnosis(
                _client_cert_problem(target, transport, cert, probe.server_cert_der),
                retryable=False,
            )
    if probe.speaks == "unknown":
        return Diagnosis(
            f"the service at {target} speaks neither TLS nor gRPC (is it the aggregator?)",
            retryable=False,
        )
    hint = _from_details(details)
    if hint is not None:
        return Diagnosis(f"cannot connect to the aggregator at {target}: {hint}", retryable=False)
    suffix = f": {details}" if details else ""
    return Diagnosis(f"cannot connect to the aggregator at {target}{suffix}", retryable=True)


def classify_connect_error(
    exc: BaseException | None,
    transport: str,
    target: str,
    ca: Path | None,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    timeout: float = 2.0,
) -> str:
    """One line saying why the channel to ``target`` failed (see `diagnose_connection`)."""
    return diagnose_connection(
        target, transport, ca, cert=cert, key=key, exc=exc, timeout=timeout
    ).message


def _last_error(channel: grpc.Channel) -> grpc.RpcError | None:
    """gRPC's own reason for the failing channel: a call that does not wait for readiness fails
    at once with the subchannel's last error."""
    try:
        channel.unary_unary("/teefl.Probe/Ping")(b"", timeout=1.0, wait_for_ready=False)
    except grpc.RpcError as exc:
        return exc
    return None


def wait_for_channel(
    channel: grpc.Channel,
    *,
    target: str,
    transport: str,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    timeout: float = 10.0,
) -> None:
    """Block until ``channel`` is READY; raise `ConnectError` with a diagnosis otherwise.

    Why not just ``channel_ready_future(...).result(timeout)``: a certificate problem would then
    cost the whole timeout and end in a bare ``FutureTimeoutError``. Here every TRANSIENT_FAILURE
    is diagnosed at once; configuration mistakes fail immediately, while "nothing listening yet"
    keeps waiting (gRPC reconnects with backoff) until the deadline.
    """
    deadline = time.monotonic() + timeout
    changed = threading.Event()
    state: list[grpc.ChannelConnectivity | None] = [None]

    def on_change(s: grpc.ChannelConnectivity) -> None:
        state[0] = s
        changed.set()

    channel.subscribe(on_change, try_to_connect=True)
    last: Diagnosis | None = None
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            changed.wait(remaining)
            changed.clear()
            s = state[0]
            if s == grpc.ChannelConnectivity.READY:
                return
            if s == grpc.ChannelConnectivity.SHUTDOWN:
                raise ConnectError(f"the channel to {target} was closed", retryable=False)
            if s == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                last = diagnose_connection(
                    target, transport, ca, cert=cert, key=key, exc=_last_error(channel)
                )
                if not last.retryable:
                    raise ConnectError(last.message, retryable=False)
    finally:
        channel.unsubscribe(on_change)
    if last is None:
        last = diagnose_connection(target, transport, ca, cert=cert, key=key)
    raise ConnectError(f"{last.message} (gave up after {timeout:g} s)", retryable=last.retryable)
