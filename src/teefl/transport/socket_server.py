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

Until its HELLO is parsed a connection is `admission.Admission`'s (one thread, no blocking, bounded
in number and time); from there on it is this module's: the aggregator's ``hello`` decides, and an
authorised connection gets a handler thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teefl.errors import TeeflError
from teefl.transport.admission import Admission, Limits, close_for_peer, log_refusal
from teefl.transport.framing import (
    GET,
    OK,
    PUT,
    Closed,
    Malformed,
    RemoteError,
    recv_frame,
    send_error,
    send_frame,
    tcp_moved,
)

log = logging.getLogger("teefl.dataplane")


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


class Connection:
    """One collaborator's data connection, as the aggregator's handlers see it."""

    def __init__(self, sock: Any, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.name = ""

    def cancel(self) -> None:
        """Cut the connection from another thread (idle transfer, superseded, shutdown): the
        handler's blocked receive or send fails at once and nothing half-received is used; the
        peer sees the connection end. (The plain socket's shutdown, also under TLS:
        `ssl.SSLSocket.shutdown` would drop the TLS state that the handler thread still uses.)"""
        with contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def moved(self) -> int | None:
        """See `tcp_moved`."""
        return tcp_moved(self.sock)


class DataServer:
    """Accepts data connections, authorises them, and runs one handler thread per authorised one.

    ``hello(conn, name, token)`` authorises a connection (raises `RemoteError` to refuse it),
    ``get(conn, body)`` serves one download and ``put(conn, body)`` receives one upload; each
    answers on the connection itself. A handler that raises `Closed` ends the connection
    quietly. ``refused(what, peer, reason, **fields)`` logs and records a refusal (the
    aggregator's is rate-limited); every value in it that came from the peer is `shown`.

    Until its HELLO is parsed, a connection is `Admission`'s (see `teefl.transport.admission`),
    within the bounds of ``limits``.
    """

    def __init__(
        self,
        listen: str,
        port: int,
        tls: ssl.SSLContext | None,
        hello: Callable[[Connection, str, bytes], None],
        get: Callable[[Connection, bytes], None],
        put: Callable[[Connection, bytes], None],
        limits: Limits | None = None,
        refused: Callable[..., None] | None = None,
    ) -> None:
        self._hello, self._get, self._put = hello, get, put
        self.limits = limits or Limits()
        self._refused = refused or log_refusal
        self.admission = Admission(
            listen, port, tls, self.limits, self._refused, admitted=self._authorise
        )
        self.port = self.admission.port
        self.conns: set[Connection] = set()  # authorised
        self._by_name: dict[str, list[Connection]] = {}
        self.lock = threading.Lock()
        self.stopped = False

    def start(self) -> None:
        self.admission.start()

    def stop(self) -> None:
        self.stopped = True
        self.admission.stop()
        with self.lock:
            for conn in list(self.conns):
                conn.cancel()

    def _authorise(self, sock: Any, peer: str, name: str, token: bytes, deadline: float) -> None:
        """On the accept thread, for a connection whose HELLO parsed: ask ``hello``, answer OK
        and hand the connection to a handler thread of its own."""
        conn = Connection(sock, peer)
        conn.name = name
        try:
            # blocking again, for what is left of the deadline (the answer is a few bytes)
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                self._hello(conn, name, token)
            except RemoteError as exc:  # refused: ``hello`` has said why in the log and events
                send_error(sock, exc.code, exc.message)
                close_for_peer(sock)
                return
            send_frame(sock, OK)
            sock.settimeout(None)  # waits for a round may be long; keepalive finds dead peers
        except (OSError, ssl.SSLError) as exc:
            log.info("data connection of %s from %s ended: %s", name, peer, exc)
            close_for_peer(sock)
            return
        except Exception:  # a bug in ``hello``: the peer gets an answer, the log a traceback
            log.exception("data connection of %s from %s: authorisation failed", name, peer)
            with contextlib.suppress(OSError, ssl.SSLError):
                send_error(sock, "INTERNAL", "internal error; see the aggregator's log")
            close_for_peer(sock)
            return
        self._register(conn)
        try:
            threading.Thread(
                target=self._serve, args=(conn,), name=f"data-{name}", daemon=True
            ).start()
        except RuntimeError as exc:  # no thread to be had: the connection cannot be served
            log.error("data connection of %s: cannot start its thread: %s", name, exc)
            self._unregister(conn)
            close_for_peer(sock)

    # -- authorised connections ------------------------------------------------------------------
    def _register(self, conn: Connection) -> None:
        """Count the connection under its collaborator; the oldest beyond ``max_per_name`` is
        cut (a collaborator uses one connection: a newer one means the older is dead or
        misused)."""
        with self.lock:
            self.conns.add(conn)
            mine = self._by_name.setdefault(conn.name, [])
            mine.append(conn)
            extra = mine[: -self.limits.max_per_name]
            del mine[: -self.limits.max_per_name]
        for old in extra:
            log.info(
                "data connection of %s from %s closed: a newer one came (at most %d each)",
                old.name,
                old.peer,
                self.limits.max_per_name,
            )
            old.cancel()

    def _unregister(self, conn: Connection) -> None:
        with self.lock:
            self.conns.discard(conn)
            mine = self._by_name.get(conn.name)
            if mine is not None and conn in mine:
                mine.remove(conn)
                if not mine:
                    del self._by_name[conn.name]

    def _serve(self, conn: Connection) -> None:
        sock = conn.sock
        try:
            while not self.stopped:
                try:
                    kind, body = recv_frame(sock)
                except Malformed as exc:
                    self._refused("data frame", conn.peer, str(exc), collaborator=conn.name)
                    send_error(sock, "INVALID_ARGUMENT", str(exc))
                    return
                if kind == GET:
                    self._get(conn, body)
                elif kind == PUT:
                    self._put(conn, body)
                else:
                    reason = f"unexpected frame kind {kind}"
                    self._refused("data frame", conn.peer, reason, collaborator=conn.name)
                    send_error(sock, "INVALID_ARGUMENT", reason)
                    return
        except Closed:
            pass
        except (OSError, ssl.SSLError) as exc:
            log.info("data connection of %s from %s ended: %s", conn.name, conn.peer, exc)
        except Exception:  # a bug: the peer gets an answer, the log the traceback
            log.exception("data connection of %s from %s: internal error", conn.name, conn.peer)
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                send_error(sock, "INTERNAL", "internal error; see the aggregator's log")
        finally:
            self._unregister(conn)
            close_for_peer(sock)
