"""The data plane: the model and the updates over one plain TCP or TLS 1.3 socket per collaborator.

Why not gRPC for the bulk bytes: Python gRPC moves a 45 MB model at ~300-400 MB/s here (protobuf
copies every 1 MiB message, then the gRPC core and its thread hand-offs copy it again), about a
quarter of what the same socket does. The control plane (Challenge, Join, WaitRound, the
evaluation report) stays on gRPC; only GET (the global model) and PUT (an update) come here.

How it is tied to the control plane's security:
- the socket speaks the plan's transport: plaintext for ``none``, TLS 1.3 with the aggregator's
  certificate for ``tls``, and with the collaborator's certificate required and verified against
  the plan's CA for ``mtls`` -- the same files, the same CA as the gRPC channel;
- a connection starts with HELLO: the collaborator's name and the 32-byte token the aggregator
  gave it in its (authorised, and with attestation, attested) Join reply. A token is replaced at
  every Join; with mtls the certificate's CN must also be the name, and with attestation the
  certificate's public key must be the one the collaborator's evidence was bound to. No model
  byte flows before that check passes;
- the collaborator checks the aggregator's certificate (CA and host name) and, when it required
  the aggregator's attestation, that the key is the attested one.

Framing: ``kind`` (1 byte) + body length (4 bytes, little endian) + body (a protobuf message of
`teefl.proto`, or JSON for HELLO/ERROR); a MODEL frame is followed by exactly the header's
``total_size`` payload bytes, and so is a GO frame on the uploader's side. Nothing here is ever
unpickled or evaluated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teefl.errors import TeeflError

log = logging.getLogger("teefl.dataplane")

HELLO, OK, GET, MODEL, PUT, GO, ACK, ERROR = range(1, 9)
_KINDS = {HELLO, OK, GET, MODEL, PUT, GO, ACK, ERROR}
_HEAD = struct.Struct("<BI")
#: the largest control frame (a header with metrics); payload bytes are never framed
MAX_FRAME = 1 << 20
#: payload bytes per send/receive call: small enough to notice progress (idle cuts, fault
#: injection), large enough that the per-call cost is nothing next to the copy
STEP = 4 << 20
#: a peer must finish its TLS handshake and HELLO within this many seconds
HANDSHAKE_TIMEOUT_S = 30.0


class Closed(ConnectionError):
    """The peer closed the connection or it broke: nothing half-received is ever used."""


class RemoteError(TeeflError):
    """The aggregator refused a request; ``code`` is a gRPC status code name, as on the RPCs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def send_frame(sock: Any, kind: int, body: bytes = b"") -> None:
    sock.sendall(_HEAD.pack(kind, len(body)) + body)


def recv_exact(sock: Any, view: memoryview) -> None:
    """Fill ``view`` from the socket or raise `Closed` (a clean EOF mid-message is a break)."""
    got, n = 0, len(view)
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except (OSError, ssl.SSLError) as exc:
            raise Closed(f"connection broke: {exc}") from None
        if k == 0:
            raise Closed("peer closed the connection")
        got += k


def recv_frame(sock: Any) -> tuple[int, bytes]:
    head = bytearray(_HEAD.size)
    recv_exact(sock, memoryview(head))
    kind, size = _HEAD.unpack(head)
    if kind not in _KINDS or size > MAX_FRAME:
        raise Closed(f"malformed frame (kind {kind}, {size} bytes): not a teefl peer")
    body = bytearray(size)
    recv_exact(sock, memoryview(body))
    return kind, bytes(body)


def send_error(sock: Any, code: str, message: str) -> None:
    send_frame(sock, ERROR, json.dumps({"code": code, "message": message}).encode())


def raise_error(body: bytes) -> None:
    try:
        err = json.loads(body)
        raise RemoteError(str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        raise Closed("malformed error frame") from None


def expect(sock: Any, kind: int) -> bytes:
    """The body of the next frame, which must be ``kind``; an ERROR frame raises `RemoteError`."""
    got, body = recv_frame(sock)
    if got == ERROR:
        raise_error(body)
    if got != kind:
        raise Closed(f"unexpected frame {got} (expected {kind})")
    return body


def reader(sock: Any) -> Callable[[memoryview], int]:
    """``recv_into`` for `codec.Assembler.receive`, with a broken connection as `Closed`."""

    def read(view: memoryview) -> int:
        try:
            return sock.recv_into(view)
        except (OSError, ssl.SSLError) as exc:
            raise Closed(f"connection broke: {exc}") from None

    return read


def send_payload(sock: Any, payload: bytes | bytearray | memoryview, tick=None) -> None:
    """Send the payload straight from its memory (no copy in Python), in `STEP` slices."""
    view = memoryview(payload)
    try:
        for start in range(0, len(view), STEP):
            sock.sendall(view[start : start + STEP])
            if tick is not None:
                tick()
    except (OSError, ssl.SSLError) as exc:
        raise Closed(f"connection broke: {exc}") from None


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive, so a peer that vanished (power, network) is noticed within ~1 minute, and
    no Nagle delay on the small frames (as gRPC does)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


# -- TLS -----------------------------------------------------------------------------------------
def server_context(
    ca: Path | None, cert: Path, key: Path, require_client_cert: bool
) -> ssl.SSLContext:
    """TLS 1.3 only, as the gRPC side requires; client certificates verified against the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    if require_client_cert:
        if ca is None:
            raise TeeflError("transport mtls needs security.tls.ca to verify collaborators")
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def common_name(cert: dict[str, Any] | None) -> str | None:
    """CN of a certificate as `ssl.SSLSocket.getpeercert` returns it (verified by the handshake)."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


# -- server --------------------------------------------------------------------------------------
class Connection:
    """One collaborator's data connection, as the aggregator's handlers see it."""

    def __init__(self, sock: Any, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.name = ""

    def cancel(self) -> None:
        """Cut the connection from another thread (idle upload, shutdown): the handler's
        blocked receive fails at once and nothing half-received is used."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class DataServer:
    """Accepts data connections and runs one handler thread per connection.

    ``hello(conn, name, token)`` authorises a connection (raises to refuse it), ``get(conn,
    body)`` serves one download and ``put(conn, body)`` receives one upload; each answers on the
    connection itself. A handler that raises `Closed` ends the connection quietly.
    """

    def __init__(
        self,
        listen: str,
        port: int,
        tls: ssl.SSLContext | None,
        hello: Callable[[Connection, str, bytes], None],
        get: Callable[[Connection, bytes], None],
        put: Callable[[Connection, bytes], None],
    ) -> None:
        self.tls, self._hello, self._get, self._put = tls, hello, get, put
        try:
            self.sock = socket.create_server((listen, port), backlog=128)
        except OSError as exc:
            raise TeeflError(
                f"cannot listen for the data plane on {listen}:{port}: {exc.strerror or exc}"
            ) from None
        self.port = self.sock.getsockname()[1]
        self.conns: set[Connection] = set()
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, name="data-accept", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            for conn in list(self.conns):
                conn.cancel()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                raw, addr = self.sock.accept()
            except OSError:
                return
            peer = f"{addr[0]}:{addr[1]}"
            threading.Thread(
                target=self._serve, args=(raw, peer), name=f"data-{peer}", daemon=True
            ).start()

    def _serve(self, raw: socket.socket, peer: str) -> None:
        conn: Connection | None = None
        try:
            keepalive(raw)
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            sock: Any = raw
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(raw, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("data connection from %s: TLS handshake failed: %s", peer, exc)
                    return
            conn = Connection(sock, peer)
            with self.lock:
                self.conns.add(conn)
            kind, body = recv_frame(sock)
            if kind != HELLO:
                send_error(sock, "UNAUTHENTICATED", "a data connection must start with HELLO")
                return
            try:
                hello = json.loads(body)
                name, token = str(hello["collaborator"]), bytes.fromhex(hello["token"])
            except (ValueError, KeyError, TypeError):
                send_error(sock, "INVALID_ARGUMENT", "malformed HELLO")
                return
            conn.name = name
            try:
                self._hello(conn, name, token)
            except RemoteError as exc:
                send_error(sock, exc.code, exc.message)
                return
            send_frame(sock, OK)
            sock.settimeout(None)  # waits for a round may be long; keepalive finds dead peers
            while not self.stopped:
                kind, body = recv_frame(sock)
                if kind == GET:
                    self._get(conn, body)
                elif kind == PUT:
                    self._put(conn, body)
                else:
                    send_error(sock, "INVALID_ARGUMENT", f"unexpected frame kind {kind}")
                    return
        except Closed:
            pass
        except (OSError, ssl.SSLError) as exc:
            log.info("data connection from %s ended: %s", peer, exc)
        finally:
            if conn is not None:
                with self.lock:
                    self.conns.discard(conn)
            with contextlib.suppress(OSError):
                raw.close()


# -- client --------------------------------------------------------------------------------------
def connect(
    host: str,
    port: int,
    name: str,
    token: bytes,
    tls: ssl.SSLContext | None,
    expected_spki: bytes | None = None,
    timeout: float = HANDSHAKE_TIMEOUT_S,
) -> Any:
    """Open and authorise a collaborator's data connection; returns the socket.

    ``expected_spki``: the aggregator's attested public key (DER SubjectPublicKeyInfo); the
    connection is refused unless the server's certificate carries exactly that key.
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise Closed(f"cannot reach the data plane at {host}:{port}: {exc}") from None
    try:
        keepalive(raw)
        sock: Any = raw
        if tls is not None:
            try:
                sock = tls.wrap_socket(raw, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                raise TeeflError(f"data plane at {host}:{port}: {exc.verify_message}") from None
            except (OSError, ssl.SSLError) as exc:
                raise Closed(f"TLS handshake with the data plane failed: {exc}") from None
            if expected_spki is not None:
                from cryptography import x509

                from teefl.federation.attest import spki_der_of

                der = sock.getpeercert(binary_form=True)
                if spki_der_of(x509.load_der_x509_certificate(der)) != expected_spki:
                    raise TeeflError(
                        "the data plane's TLS key is not the key the aggregator's attestation "
                        "was bound to: refusing to send or receive model data"
                    )
        send_frame(sock, HELLO, json.dumps({"collaborator": name, "token": token.hex()}).encode())
        expect(sock, OK)
        sock.settimeout(None)
        return sock
    except BaseException:
        raw.close()
        raise
