"""The data plane's framing: ``kind`` (1 byte) + body length (4 bytes, little endian) + body.

A MODEL frame is followed by exactly the header's ``total_size`` payload bytes, and so is a GO
frame on the uploader's side. Nothing here is ever unpickled or evaluated.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teefl.errors import TeeflError
from teefl.wire import peerinput

log = logging.getLogger("teefl.dataplane")

HELLO, OK, GET, MODEL, PUT, GO, ACK, ERROR = range(1, 9)
_KINDS = {HELLO, OK, GET, MODEL, PUT, GO, ACK, ERROR}
HEAD = struct.Struct("<BI")
#: the largest control frame (a header with metrics); payload bytes are never framed
MAX_FRAME = 1 << 20
#: payload bytes per send/receive call: small enough to notice progress (idle cuts, fault
#: injection), large enough that the per-call cost is nothing next to the copy
STEP = 4 << 20
#: how long a collaborator waits for the aggregator to answer its HELLO (see `connect`)
HANDSHAKE_TIMEOUT_S = 30.0
#: a HELLO is a name and a token: a larger one is refused from its frame header, unread
MAX_HELLO = 4096
#: an ERROR frame is a status name and one line of text
MAX_ERROR = 64 << 10


class Closed(ConnectionError):
    """The peer closed the connection or it broke: nothing half-received is ever used."""


class Malformed(Closed):
    """The peer sent something that is not a teefl frame: answered (where it can be), then the
    connection is closed."""


class Idle(Closed):
    """Nothing arrived for the socket's timeout (an upload's ``idle_timeout``)."""


class RemoteError(TeeflError):
    """The aggregator refused a request; ``code`` is a gRPC status code name, as on the RPCs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def send_frame(sock: Any, kind: int, body: bytes = b"") -> None:
    sock.sendall(HEAD.pack(kind, len(body)) + body)


def recv_exact(sock: Any, view: memoryview) -> None:
    """Fill ``view`` from the socket or raise `Closed` (a clean EOF mid-message is a break)."""
    got, n = 0, len(view)
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise Idle("timed out: nothing arrived within the idle timeout") from None
        except (OSError, ssl.SSLError) as exc:
            raise Closed(f"connection broke: {exc}") from None
        if k == 0:
            raise Closed("peer closed the connection")
        got += k


def recv_frame(sock: Any) -> tuple[int, bytes]:
    head = bytearray(HEAD.size)
    recv_exact(sock, memoryview(head))
    kind, size = HEAD.unpack(head)
    if kind not in _KINDS or size > MAX_FRAME:
        raise Malformed(f"malformed frame (kind {kind}, {size} bytes): not a teefl peer")
    body = bytearray(size)
    recv_exact(sock, memoryview(body))
    return kind, bytes(body)


def send_error(sock: Any, code: str, message: str) -> None:
    send_frame(sock, ERROR, json.dumps({"code": code, "message": message}).encode())


def raise_error(body: bytes) -> None:
    try:
        err = peerinput.load_json_object(body, "error frame", MAX_ERROR)
    except peerinput.Malformed as exc:
        raise Malformed(str(exc)) from None
    code, message = err.get("code"), err.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise Malformed("malformed error frame: needs the strings code and message")
    raise RemoteError(code, message)


def expect(sock: Any, kind: int) -> bytes:
    """The body of the next frame, which must be ``kind``; an ERROR frame raises `RemoteError`."""
    got, body = recv_frame(sock)
    if got == ERROR:
        raise_error(body)
    if got != kind:
        raise Closed(f"unexpected frame {got} (expected {kind})")
    return body


def reader(sock: Any) -> Callable[[memoryview], int]:
    """``recv_into`` for `assembly.Assembler.receive`, with a broken connection as `Closed`."""

    def read(view: memoryview) -> int:
        try:
            return sock.recv_into(view)
        except TimeoutError:
            raise Idle("timed out: nothing arrived within the idle timeout") from None
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


#: where struct tcp_info (linux/tcp.h) keeps tcpi_bytes_acked and tcpi_bytes_received (u64)
_TCP_INFO_BYTES = struct.Struct("<QQ")
_TCP_INFO_AT, _TCP_INFO_LEN = 120, 136


def tcp_moved(sock: Any) -> int | None:
    """Bytes this TCP connection has moved so far: acknowledged by the peer plus received from
    it (Linux ``TCP_INFO``, kernel >= 4.2), or None where the kernel does not say.

    Why the kernel's count: "idle" must mean that no byte moved, however slowly bytes move, and
    a transfer's own progress is known only per piece it hands to or takes from the socket --
    a blocking ``sendall`` of 4 MiB to a 100 KB/s reader reports nothing for 40 s. Read twice a
    second by the aggregator's idle cut, it adds nothing to the transfer loops.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_AT)
    return acked + received


# -- TLS -----------------------------------------------------------------------------------------
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
