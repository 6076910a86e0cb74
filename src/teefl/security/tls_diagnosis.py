"""Why a channel to the aggregator does not come up, in one line.

A client sees "failed to connect to all addresses" or "Socket closed" for half a dozen distinct
mistakes. `diagnose_connection` probes the target with Python's `ssl` module (what does it speak?
which certificate does it present? does it accept our client certificate?) and compares with the
configured CA and host; `wait_for_channel` waits for a channel and raises `ConnectError` with
that line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from teefl.errors import TeeflError
from teefl.security import certificates

#: the HTTP/2 client preface plus an empty SETTINGS frame: any gRPC server answers with SETTINGS
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x04


class ConnectError(TeeflError):
    """The channel to the aggregator did not come up; ``retryable`` when waiting may help
    (nothing listening yet, no answer) as opposed to a configuration mistake."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


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
