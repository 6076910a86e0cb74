"""The socket data plane's three requests (HELLO, GET, PUT; see `framing`) on the neutral
handlers of `teefl.server.service.Service`: this module moves the bytes, the service decides.

A PUT runs: header -> every check that needs no payload byte -> GO once a receive slot is ours
-> payload -> ACK -> the deferred add. A refused upload costs the uploader only its header, and
the connection stays in step after any refusal.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from google.protobuf.unknown_fields import UnknownFieldSet

from teefl.security.peer_identity import client_cert
from teefl.server.intake import StaleUpdate
from teefl.server.service import Service
from teefl.server.transfers import idle_cut
from teefl.transport import framing
from teefl.transport.base import Peer, Refused
from teefl.transport.socket_server import Connection
from teefl.wire import codec, teefl_pb2
from teefl.wire.checks import UpdateRejected

log = logging.getLogger("teefl.aggregator")


class DataHandlers:
    """``hello``, ``get`` and ``put`` for `socket_server.DataServer`."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.idle_timeout = service.plan.federation.idle_timeout

    def hello(self, conn: Connection, name: str, token: bytes) -> None:
        """Authorise a data connection as a call is (`Identity.check`); the connection is
        remembered with the session: a later Join cuts it."""
        cert = None
        if self.service.identity.transport == "mtls":
            der = conn.sock.getpeercert(binary_form=True)
            cert = client_cert(der) if der else None
        version = getattr(conn.sock, "version", None)
        peer = Peer(
            name=name,
            address=conn.peer,
            tls_version=version() if version is not None else None,
            cn=cert.cn if cert is not None else None,
            cert=cert,
            token=token,
            handle=conn,
            kind="data connection",
            connection=True,
        )
        try:
            self.service.identity.check(peer)
        except Refused as exc:  # logged (at a bounded rate) by the check
            raise framing.RemoteError(exc.status, exc.reason) from None

    def _refused(self, conn: Connection, what: str, status: str, reason: str) -> None:
        self.service.identity.refusals.refused(what, conn.peer, reason, collaborator=conn.name)
        framing.send_error(conn.sock, status, reason)

    def get(self, conn: Connection, body: bytes) -> None:
        """One download: the MODEL header, then the round's payload straight from memory."""
        svc = self.service
        try:
            req = teefl_pb2.ModelRequest.FromString(body)
        except Exception:  # protobuf's DecodeError, or worse: a malformed request
            self._refused(conn, "download", "INVALID_ARGUMENT", "malformed model request")
            return
        try:
            # a bounded number stream at once, one per collaborator, as on the gRPC path; one
            # that moves no byte for idle_timeout is cut (`Rounds.supervise`)
            dl = svc.download(conn.name, req.round, conn.cancel, conn.moved, data_plane=True)
            dl.acquire()
        except Refused as exc:
            framing.send_error(conn.sock, exc.status, exc.reason)
            return
        try:
            dl.start()
            try:
                framing.send_frame(conn.sock, framing.MODEL, dl.header.SerializeToString())
                with svc.checkpointer.moving():
                    framing.send_payload(conn.sock, dl.payload, dl.transfer.touch)
            finally:
                dl.stop()
            dl.sent()
        finally:
            dl.release()
        dl.record()

    def put(self, conn: Connection, body: bytes) -> None:
        """One upload (see the module docstring); the add runs after the ACK has gone out."""
        t0 = time.monotonic()
        svc, name = self.service, conn.name
        try:
            h = teefl_pb2.Header.FromString(body)
        except Exception:  # protobuf's DecodeError, or a nesting beyond its limit
            self._refused(conn, "upload", "INVALID_ARGUMENT", "malformed update header")
            return
        if h.collaborator != name:
            self._refused(conn, "upload", "PERMISSION_DENIED", f"this connection belongs to {name}")
            return
        token = svc.identity.conn_tokens.get(conn)
        up = svc.upload(name, h, conn.cancel, conn.moved, token, t0)
        moving = contextlib.ExitStack()  # entered once the upload's bytes may flow
        try:
            if len(UnknownFieldSet(h)) > 0:
                raise UpdateRejected("message carries unknown fields")
            if h.evaluate_only:
                raise UpdateRejected("evaluation reports travel over gRPC (PutUpdate)")
            if h.HasField("failure"):
                raise UpdateRejected("failure reports travel over gRPC (PutUpdate)")
            try:
                up.acquire()
            except Refused as exc:
                framing.send_error(conn.sock, exc.status, exc.reason)
                return
            try:
                dup = up.open()
                if dup is not None:
                    framing.send_frame(conn.sock, framing.ACK, dup.SerializeToString())
                    return
                asm = up.prepare(data_plane=True)
                # from GO to ACK the upload is "moving": a background checkpoint waits
                moving.enter_context(svc.checkpointer.moving())
                framing.send_frame(conn.sock, framing.GO)
                self._receive(conn, asm, up.transfer)
                ack, add = up.complete(defer_add=True)
                try:
                    framing.send_frame(conn.sock, framing.ACK, ack.SerializeToString())
                finally:
                    moving.close()
                    if add is not None:
                        add()  # even if the ACK was lost: the update is counted and stored
            finally:
                moving.close()
                up.close()  # summed and moved, or refused: nothing reads its memory now
            # this thread is back waiting for the next frame before the close takes the lock
            # (it holds it for the whole mean): the round's first GET used to find it blocked
            # here and was answered ~10 ms late
            svc.rounds.close_soon()
        except UpdateRejected as exc:
            up.reject(exc)
            stale = isinstance(exc, StaleUpdate)
            code = "FAILED_PRECONDITION" if stale else "INVALID_ARGUMENT"
            verdict = "stale" if stale else "rejected"
            framing.send_error(conn.sock, code, f"update {verdict}: {exc}")
        except framing.Closed:
            if not up.transfer.cut:  # else the idle cut or the newer upload has said so
                log.warning("upload of %s for round %d broke off; discarded", name, h.round)
                svc.rec.info("update_broken", collaborator=name, round=h.round)
            raise
        finally:
            up.close()  # idempotent

    def _receive(self, conn: Connection, asm: Any, transfer: Any) -> None:
        """The payload, each receive waiting at most idle_timeout for a byte: idle is "no byte
        moved", however slowly bytes move."""
        idle = self.idle_timeout
        conn.sock.settimeout(idle)
        try:
            asm.receive(framing.reader(conn.sock), framing.STEP, transfer.touch)
        except codec.PayloadError:  # the peer ended mid-payload
            raise framing.Closed("upload ended before its announced size") from None
        except framing.Idle:
            idle_cut(transfer, idle, self.service.rec)
            with contextlib.suppress(OSError, framing.Closed):
                framing.send_error(
                    conn.sock,
                    "DEADLINE_EXCEEDED",
                    f"upload moved no byte for {idle:g} s: cut off",
                )
            raise
        finally:
            conn.sock.settimeout(None)
