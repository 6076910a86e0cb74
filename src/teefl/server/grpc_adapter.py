"""The gRPC control plane (and gRPC data path): the generated servicer mapped onto the
transport-neutral handlers of `teefl.server.service.Service`.

Here only: turning a call into a `base.Peer`, the status mapping of `base.Refused`, the lenient
parsing of requests that are not their RPC's message, the pre-serialized download chunks, the
upload GO metadata, and the server's TLS credentials.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.unknown_fields import UnknownFieldSet

from teefl.security.peer_identity import (
    client_cert,
    peer_certificate_pem,
    peer_identity,
    tls_version,
)
from teefl.server.intake import StaleUpdate
from teefl.server.service import Service
from teefl.server.upload import Upload
from teefl.transport.base import Peer, Refused
from teefl.wire import codec, peerinput, teefl_pb2, teefl_pb2_grpc
from teefl.wire.checks import UpdateRejected

log = logging.getLogger("teefl.aggregator")

#: initial-metadata key the aggregator sends once an upload holds a receive slot
UPLOAD_GO = "teefl-upload-go"

#: metadata key of the session token (hex) that every call after Join carries
SESSION_METADATA = "teefl-session"


class _Malformed:
    """A request whose bytes are not the message the RPC takes (see `add_to_server`)."""

    def __init__(self, what: str, error: Exception) -> None:
        self.what, self.error = what, error


def _lenient(message_type: Any) -> Any:
    """A request deserializer that never raises: gRPC logs a traceback for a deserializer's
    exception and answers INTERNAL; the handler answers a `_Malformed` INVALID_ARGUMENT."""
    parse = message_type.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or a nesting beyond its limit
            return _Malformed(message_type.DESCRIPTOR.name, exc)

    return deserialize


def _has_unknown_fields(msg: Any) -> bool:
    return len(UnknownFieldSet(msg)) > 0 or (
        msg.HasField("header") and len(UnknownFieldSet(msg.header)) > 0
    )


def call_token(context: grpc.ServicerContext) -> bytes | None:
    """The session token in the call's metadata, or None."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA:
            try:
                return bytes.fromhex(value if isinstance(value, str) else value.decode())
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def peer_of(context: grpc.ServicerContext, name: str) -> Peer:
    """What the call says about its peer; checked by `Identity.check`."""
    pem = peer_certificate_pem(context)
    return Peer(
        name=name,
        address=context.peer(),
        tls_version=tls_version(context),
        cn=peer_identity(context),
        cert=client_cert(pem) if pem else None,
        token=call_token(context),
        handle=context,
        on_end=context.add_callback,
    )


def _abort(context: grpc.ServicerContext, exc: Refused) -> None:
    context.abort(grpc.StatusCode[exc.status], exc.reason)


class GrpcServicer(teefl_pb2_grpc.FederationServicer):
    """The generated servicer: each RPC -> one `Service` handler, `Refused` -> its status."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def _malformed(self, context: grpc.ServicerContext, request: _Malformed) -> None:
        """Answer a request that is not the message its RPC takes (see `add_to_server`)."""
        reason = f"malformed {request.what}: {peerinput.shown(str(request.error), 120)}"
        self.service.identity.refusals.refused("call", context.peer(), reason)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    def Challenge(self, request: teefl_pb2.ChallengeRequest, context: grpc.ServicerContext):
        try:
            return self.service.challenge(peer_of(context, request.collaborator), request)
        except Refused as exc:
            _abort(context, exc)

    def Join(self, request: teefl_pb2.JoinRequest, context: grpc.ServicerContext):
        try:
            return self.service.join(peer_of(context, request.collaborator), request)
        except Refused as exc:
            _abort(context, exc)

    def WaitRound(self, request: teefl_pb2.WaitRequest, context: grpc.ServicerContext):
        try:
            return self.service.wait_round(peer_of(context, request.collaborator), request)
        except Refused as exc:
            _abort(context, exc)

    def GetModel(self, request: teefl_pb2.ModelRequest, context: grpc.ServicerContext):
        svc = self.service
        try:
            peer = peer_of(context, request.collaborator)
            name = svc.identity.check(peer)
            if svc.data_plane == "socket":
                raise svc.refuse(
                    peer,
                    "the model travels over the data plane (network.data_plane: socket), not gRPC",
                    "FAILED_PRECONDITION",
                )
            dl = svc.download(name, request.round, context.cancel)
            # a bounded number of downloads stream at once, one per collaborator; the slot is
            # given back when the RPC ends for any reason (finished, cancelled, peer gone, cut as
            # idle), so it can never leak
            dl.acquire()
        except Refused as exc:
            _abort(context, exc)

        def ended() -> None:
            dl.release()
            dl.stop()

        dl.start()
        if not context.add_callback(ended):
            ended()  # the RPC already ended
        return self._stream(dl)

    @staticmethod
    def _stream(dl: Any) -> Iterator[Any]:
        yield teefl_pb2.Chunk(header=dl.header)
        transfer = dl.transfer
        for chunk in dl.chunks:  # progress per message: gRPC does not say how many bytes moved
            yield chunk
            transfer.last = time.monotonic()
        dl.sent()  # as on the data plane: a background checkpoint waits for downloads
        dl.record()

    def PutUpdate(self, request_iterator, context: grpc.ServicerContext):
        ack = self._put_update(request_iterator, context)
        self.service.rounds.close_soon()
        return ack

    def _put_update(self, request_iterator, context: grpc.ServicerContext):
        svc = self.service
        t0 = time.monotonic()
        try:
            first = next(request_iterator, None)
        except grpc.RpcError:
            return teefl_pb2.UpdateAck(accepted=False, message="stream broken")
        if isinstance(first, _Malformed):
            self._malformed(context, first)
        if first is None or not first.HasField("header"):
            reason = "update stream must start with a header"
            svc.identity.refusals.refused("upload", context.peer(), reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        h = first.header
        try:
            peer = peer_of(context, h.collaborator)
            name = svc.identity.check(peer)
            if svc.data_plane == "socket" and not (h.evaluate_only or h.HasField("failure")):
                raise svc.refuse(
                    peer,
                    "updates travel over the data plane (network.data_plane: socket); gRPC "
                    "PutUpdate carries only the evaluation report and failure reports",
                    "FAILED_PRECONDITION",
                )
        except Refused as exc:
            _abort(context, exc)
        up = svc.upload(name, h, context.cancel, None, peer.token, t0)
        try:
            if _has_unknown_fields(first):
                raise UpdateRejected("message carries unknown fields")
            try:
                up.acquire()
            except Refused as exc:
                _abort(context, exc)
            # tells the collaborator to start sending its data: an upload waiting for a slot has
            # sent only its header, so waiting uploads hold nothing in our HTTP/2 receive windows
            context.send_initial_metadata(((UPLOAD_GO, "1"),))
            return self._receive_upload(up, first, request_iterator)
        except UpdateRejected as exc:
            up.reject(exc)
            stale = isinstance(exc, StaleUpdate)
            code = (
                grpc.StatusCode.FAILED_PRECONDITION if stale else grpc.StatusCode.INVALID_ARGUMENT
            )
            context.abort(code, f"update {'stale' if stale else 'rejected'}: {exc}")
        except grpc.RpcError:  # the collaborator vanished mid-stream: nothing was applied
            if not up.transfer.cut:  # else the idle cut has said so
                log.warning("upload of %s for round %d broke off; discarded", name, h.round)
                svc.rec.info("update_broken", collaborator=name, round=h.round)
            return teefl_pb2.UpdateAck(accepted=False, message="stream broken")
        finally:
            up.close()

    def _receive(
        self, name: str, h, first, chunks, context, t0: float, token: bytes | None = None
    ) -> teefl_pb2.UpdateAck:
        """One gRPC update of an already checked ``name`` (tests drive this directly)."""
        up = self.service.upload(name, h, context.cancel, None, token, t0)
        try:
            return self._receive_upload(up, first, chunks)
        finally:
            up.close()

    @staticmethod
    def _receive_upload(up: Upload, first, chunks) -> teefl_pb2.UpdateAck:
        h = up.h
        if h.HasField("failure"):
            if first.data or next(chunks, None) is not None:
                raise UpdateRejected("a failure report must not carry a payload")
            return up.failure()
        dup = up.open()
        if dup is not None:
            return dup
        if h.evaluate_only:
            if h.total_size or first.data or next(chunks, None) is not None:
                raise UpdateRejected("evaluation report must not carry a payload")
            return up.report()
        asm = up.prepare(data_plane=False)
        if first.data:
            raise UpdateRejected("the header message must not carry data")
        if h.encoding:
            raise UpdateRejected("compressed updates travel over the data plane only")
        transfer = up.transfer
        for chunk in chunks:
            if isinstance(chunk, _Malformed):
                raise UpdateRejected(f"malformed {chunk.what} message in the stream")
            if chunk.HasField("header"):
                raise UpdateRejected("a second header inside the stream")
            if _has_unknown_fields(chunk):
                raise UpdateRejected("message carries unknown fields")
            if chunk.offset != asm.filled:
                raise UpdateRejected(
                    f"out-of-order chunk: offset {chunk.offset}, expected {asm.filled}"
                )
            try:
                asm.add(chunk.data)
            except codec.PayloadError as exc:
                raise UpdateRejected(str(exc)) from None
            transfer.last = time.monotonic()  # progress per message (gRPC hides the bytes)
        return up.complete(defer_add=False)[0]


def server_credentials(service: Service, plan: Any) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials: in-memory key, or the provisioned files (checked first, with
    readable messages); client certificates from `Identity.client_roots` under mtls."""
    ident = service.identity
    if ident.transport == "none" or ident.tls_chain is None:
        return None  # transport none, or bind() names the missing server certificate
    roots = ident.client_roots()
    cert, key = ident.tls_chain
    if isinstance(cert, bytes) and isinstance(key, bytes):
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=roots, require_client_auth=roots is not None
        )
    from teefl.security.tls import server_credentials as files_credentials

    tls = plan.security.tls
    assert tls.ca is not None
    return files_credentials(
        tls.ca,
        Path(cert),
        Path(key),
        require_client_cert=roots is not None,
        extra_roots=ident.session_ca.pem if ident.session_ca is not None else None,
    )


def _chunk_to_wire(msg: teefl_pb2.Chunk | bytes) -> bytes:
    """GetModel's response serializer: data chunks arrive already serialized (`Publisher`)."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class _Handlers:
    """Captures the generated method handlers so one serializer can be swapped."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


#: the request message of each RPC (teefl.proto)
_REQUESTS = {
    "Challenge": teefl_pb2.ChallengeRequest,
    "Join": teefl_pb2.JoinRequest,
    "WaitRound": teefl_pb2.WaitRequest,
    "GetModel": teefl_pb2.ModelRequest,
    "PutUpdate": teefl_pb2.Chunk,
}


def _refusing_malformed(servicer: GrpcServicer, behaviour: Any) -> Any:
    """A unary-request handler that answers a `_Malformed` request itself."""

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            servicer._malformed(context, request)
        return behaviour(request, context)

    return handle


def add_to_server(servicer: Any, server: grpc.Server) -> None:
    """Register the servicer as the generated code does, but with GetModel sending pre-serialized
    chunks as they are (the wire format is unchanged: clients decode ordinary `Chunk`s), and
    with requests parsed by `_lenient`: bytes that are not the RPC's message get a defined
    answer (INVALID_ARGUMENT, a ``refused`` event) instead of a traceback in the log.
    ``servicer``: a `GrpcServicer`, or an `Aggregator` (its ``grpc``)."""
    servicer = getattr(servicer, "grpc", servicer)
    cap = _Handlers()
    teefl_pb2_grpc.add_FederationServicer_to_server(servicer, cap)
    handlers = dict(cap.handlers)
    for method, message_type in _REQUESTS.items():
        h = handlers[method]
        h = h._replace(request_deserializer=_lenient(message_type))
        if h.unary_unary is not None:
            h = h._replace(unary_unary=_refusing_malformed(servicer, h.unary_unary))
        elif h.unary_stream is not None:
            h = h._replace(unary_stream=_refusing_malformed(servicer, h.unary_stream))
        handlers[method] = h  # PutUpdate (stream request): `_put_update` checks each message
    handlers["GetModel"] = handlers["GetModel"]._replace(response_serializer=_chunk_to_wire)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(cap.service, handlers),))
    server.add_registered_method_handlers(cap.service, handlers)
