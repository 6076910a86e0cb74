"""Admission to the data plane: every connection from accept() to a parsed HELLO, on one thread.

Before a connection is authorised it costs the aggregator a file descriptor and a few KB, never a
thread: one thread (`Admission`'s) runs every TLS handshake and reads every HELLO without
blocking, under one deadline for the whole handshake (accept -> TLS -> HELLO -> OK), with at most
``max_pending`` such connections and ``max_pending_per_address`` from one address (the oldest is
closed to make room). A HELLO is at most `MAX_HELLO` bytes, refused from its frame header before
anything is allocated for it, and parsed with a depth bound (`peerinput.load_json_object`). Why
JSON stays for HELLO/ERROR rather than a protobuf message or a binary header: both are flat
objects of two strings; with the size and depth bounds JSON has nothing left a protobuf message
would bound better, it stays readable in a packet capture, and the proto does not change.
An ``accept()`` that fails (EMFILE: out of file descriptors) closes the oldest unauthorised
connection and is retried with backoff; it never ends the server.

What happens once a HELLO is parsed (asking the aggregator, answering OK, serving) is
`socket_server.DataServer`'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from teefl.errors import TeeflError
from teefl.transport.framing import ERROR, HEAD, HELLO, MAX_HELLO, keepalive
from teefl.wire import peerinput

log = logging.getLogger("teefl.dataplane")


@dataclass(frozen=True)
class Limits:
    """What a connection may cost the aggregator before it is authorised (plan ``network``)."""

    #: seconds from accept() to the HELLO answered (TLS handshake included), in all
    handshake_timeout: float = 10.0
    #: connections accepted and not yet authorised, in all
    max_pending: int = 256
    #: of those, from one IP address
    max_pending_per_address: int = 64
    #: authorised connections of one collaborator (it uses one; a reconnect briefly two)
    max_per_name: int = 2


def log_refusal(what: str, peer: str, reason: str, **fields: Any) -> None:
    log.warning("refused %s from %s: %s", what, peer, reason)


def close_for_peer(sock: Any) -> None:
    """Close so that the peer sees the end: FIN after what was sent, then close."""
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pending:
    """A connection accepted and not yet authorised: its TLS handshake, then its HELLO frame
    (header, then body), read without blocking."""

    __slots__ = ("buf", "deadline", "got", "head", "host", "mask", "peer", "sock", "tls_done")

    def __init__(self, sock: Any, peer: str, host: str, deadline: float, tls: bool) -> None:
        self.sock, self.peer, self.host, self.deadline = sock, peer, host, deadline
        self.tls_done = not tls
        self.buf = bytearray(HEAD.size)
        self.got = 0
        self.head = True  # reading the frame header (else the HELLO's body)
        self.mask = selectors.EVENT_READ


_LISTEN, _WAKE = object(), object()
#: accept() errors that are the peer's (it gave up before we accepted): just accept the next
_PEER_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
#: the longest pause between two accept() attempts after errors (EMFILE, ENFILE, ENOBUFS, ...)
MAX_ACCEPT_BACKOFF_S = 2.0

#: ``admitted(sock, peer, name, token, deadline)``: a connection whose HELLO parsed, handed over
#: (blocking mode not yet restored; ``deadline`` is what is left for the answer)
Admitted = Callable[[Any, str, str, bytes, float], None]


class Admission:
    """Listens, accepts, and carries each connection through TLS and its HELLO without blocking,
    within the bounds of ``limits``; hands each connection whose HELLO parsed to ``admitted``
    and refuses (``refused(what, peer, reason, **fields)``, then closes) every other one."""

    def __init__(
        self,
        listen: str,
        port: int,
        tls: ssl.SSLContext | None,
        limits: Limits,
        refused: Callable[..., None],
        admitted: Admitted,
    ) -> None:
        self.tls, self.limits = tls, limits
        self._refused, self._admitted = refused, admitted
        try:
            self.sock = socket.create_server((listen, port), backlog=128)
        except OSError as exc:
            raise TeeflError(
                f"cannot listen for the data plane on {listen}:{port}: {exc.strerror or exc}"
            ) from None
        self.sock.setblocking(False)
        self._accept = self.sock.accept  # the one accept() call (a test injects errors here)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        #: unauthorised connections, oldest first; touched by the accept thread only
        self.pending: dict[int, _Pending] = {}
        self._by_host: dict[str, list[_Pending]] = {}
        self.accept_errors = 0  # accept() calls that failed for want of resources, in all
        self._backoff = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.thread = threading.Thread(target=self._loop, name="data-accept", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the accept thread (closing every unauthorised connection) and stop listening."""
        self.stopped = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(5.0)
        self.sock.close()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        sel.register(self.sock, selectors.EVENT_READ, _LISTEN)
        paused_until = 0.0  # accept() failed: listen again then
        try:
            while not self.stopped:
                now = time.monotonic()
                if paused_until and now >= paused_until:
                    sel.register(self.sock, selectors.EVENT_READ, _LISTEN)
                    paused_until = 0.0
                wait = 1.0
                if self.pending:
                    wait = min(wait, next(iter(self.pending.values())).deadline - now)
                if paused_until:
                    wait = min(wait, paused_until - now)
                for key, _ in sel.select(max(wait, 0.0)):
                    if key.data is _WAKE:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    elif key.data is _LISTEN:
                        if not self._accept_ready(sel):
                            sel.unregister(self.sock)
                            paused_until = time.monotonic() + self._backoff
                    elif self.pending.get(key.fileobj.fileno()) is key.data:  # not closed
                        self._step(sel, key.data)
                self._expire(sel, time.monotonic())
        finally:
            for p in list(self.pending.values()):
                self._forget(sel, p)
                with contextlib.suppress(OSError):
                    p.sock.close()
            sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept_ready(self, sel: selectors.BaseSelector) -> bool:
        """Accept what is waiting (up to 64 at a time); False: accept() failed for want of
        resources, pause for `_backoff` seconds."""
        for _ in range(64):
            try:
                raw, addr = self._accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if self.stopped:
                    return True
                if exc.errno in _PEER_ACCEPT_ERRORS:
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays in the backlog. Close
                # the oldest unauthorised connection to free a descriptor, retry after a pause
                self.accept_errors += 1
                first = self._backoff == 0.0
                self._backoff = min(max(2 * self._backoff, 0.05), MAX_ACCEPT_BACKOFF_S)
                if first:  # one line per episode, not one per retry
                    log.warning(
                        "data plane: accept() failed: %s; retrying with backoff (up to %g s), "
                        "closing the oldest unauthorised connections",
                        exc.strerror or exc,
                        MAX_ACCEPT_BACKOFF_S,
                    )
                if self.pending:
                    oldest = next(iter(self.pending.values()))
                    self._refuse(sel, oldest, None, "closed: the aggregator is out of descriptors")
                return False
            if self._backoff:
                log.warning(
                    "data plane: accepting again (%d failed accept() so far)", self.accept_errors
                )
                self._backoff = 0.0
            try:
                self._admit(sel, raw, addr)
            except Exception:  # a bug must not end the accept loop
                log.exception("data plane: admitting a connection from %s failed", addr)
                with contextlib.suppress(OSError):
                    raw.close()
        return True

    def _admit(self, sel: selectors.BaseSelector, raw: socket.socket, addr: Any) -> None:
        host = str(addr[0])
        peer = f"{host}:{addr[1]}"
        lim = self.limits
        mine = self._by_host.get(host, [])
        if len(mine) >= lim.max_pending_per_address:
            self._refuse(
                sel,
                mine[0],
                None,
                f"closed: more than {lim.max_pending_per_address} unauthorised connections "
                f"from {host}",
            )
        elif len(self.pending) >= lim.max_pending:
            busiest = max(self._by_host.values(), key=len)
            self._refuse(
                sel,
                busiest[0],
                None,
                f"closed: more than {lim.max_pending} unauthorised connections",
            )
        raw.setblocking(False)
        sock: Any = raw
        try:
            keepalive(raw)
            if self.tls is not None:
                sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError):  # the peer is gone already
            raw.close()
            return
        p = _Pending(sock, peer, host, time.monotonic() + lim.handshake_timeout, tls=bool(self.tls))
        self.pending[sock.fileno()] = p
        self._by_host.setdefault(host, []).append(p)
        sel.register(sock, selectors.EVENT_READ, p)

    def _step(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        """Advance one connection's handshake as far as the bytes that arrived allow."""
        try:
            if not p.tls_done:
                try:
                    p.sock.do_handshake()
                except ssl.SSLWantReadError:
                    return self._watch(sel, p, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    return self._watch(sel, p, selectors.EVENT_WRITE)
                p.tls_done = True
            while True:
                if p.got < len(p.buf):
                    try:
                        k = p.sock.recv_into(memoryview(p.buf)[p.got :])
                    except (ssl.SSLWantReadError, BlockingIOError):
                        return self._watch(sel, p, selectors.EVENT_READ)
                    except ssl.SSLWantWriteError:
                        return self._watch(sel, p, selectors.EVENT_WRITE)
                    if k == 0:
                        return self._refuse(sel, p, None, "closed by the peer before its HELLO")
                    p.got += k
                    continue
                if not p.head:
                    return self._parse_hello(sel, p)
                kind, size = HEAD.unpack(p.buf)
                if kind != HELLO:
                    return self._refuse(
                        sel,
                        p,
                        "UNAUTHENTICATED",
                        f"a data connection must start with HELLO (got frame kind {kind})",
                    )
                if size > MAX_HELLO:
                    return self._refuse(
                        sel,
                        p,
                        "INVALID_ARGUMENT",
                        f"HELLO of {size} bytes exceeds the limit of {MAX_HELLO}",
                    )
                p.head, p.buf, p.got = False, bytearray(size), 0
        except ssl.SSLError as exc:
            self._refuse(sel, p, None, f"TLS handshake failed: {exc.reason or exc}")
        except OSError as exc:
            self._refuse(sel, p, None, f"connection broke before its HELLO: {exc.strerror or exc}")

    def _watch(self, sel: selectors.BaseSelector, p: _Pending, mask: int) -> None:
        if mask != p.mask:
            sel.modify(p.sock, mask, p)
            p.mask = mask

    def _expire(self, sel: selectors.BaseSelector, now: float) -> None:
        """Close every connection whose handshake deadline has passed (oldest first)."""
        while self.pending:
            p = next(iter(self.pending.values()))
            if p.deadline > now:
                return
            self._refuse(
                sel,
                p,
                "DEADLINE_EXCEEDED" if p.tls_done else None,
                f"no HELLO within {self.limits.handshake_timeout:g} s of connecting",
            )

    def _forget(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            sel.unregister(p.sock)
        with contextlib.suppress(OSError, ValueError):
            self.pending.pop(p.sock.fileno(), None)
        mine = self._by_host.get(p.host)
        if mine is not None:
            with contextlib.suppress(ValueError):
                mine.remove(p)
            if not mine:
                del self._by_host[p.host]

    def _refuse(
        self,
        sel: selectors.BaseSelector,
        p: _Pending,
        code: str | None,
        reason: str,
        **fields: Any,
    ) -> None:
        """Answer (``code``: where the connection can still carry a frame), record, close."""
        self._forget(sel, p)
        if code is not None and p.tls_done:
            body = json.dumps({"code": code, "message": reason}).encode()
            frame = HEAD.pack(ERROR, len(body)) + body
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                p.sock.send(frame)  # a fresh connection's send buffer holds it
        self._refused("data connection", p.peer, reason, **fields)
        close_for_peer(p.sock)

    def _parse_hello(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        """The whole HELLO is in: parse it and hand the connection to ``admitted``."""
        try:
            hello = peerinput.load_json_object(bytes(p.buf), "HELLO", MAX_HELLO)
            name, token_hex = hello.get("collaborator"), hello.get("token")
            if not isinstance(name, str) or not isinstance(token_hex, str):
                raise peerinput.Malformed("malformed HELLO: needs the strings collaborator, token")
            if not peerinput.valid_name(name):
                raise peerinput.Malformed(
                    f"malformed HELLO: {peerinput.shown(name)} is not a collaborator name"
                )
            try:
                token = bytes.fromhex(token_hex)
            except ValueError:
                raise peerinput.Malformed("malformed HELLO: the token is not hex") from None
        except peerinput.Malformed as exc:
            return self._refuse(sel, p, "INVALID_ARGUMENT", str(exc))
        self._forget(sel, p)
        self._admitted(p.sock, p.peer, name, token, p.deadline)
