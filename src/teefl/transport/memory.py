"""`MemoryTransport`: a collaborator's transport that hands each request straight to an
aggregator's `Service` in the same process -- no sockets, no gRPC, no threads of its own.

Why: round, intake and strategy logic can then be tested with a real `Aggregator` and real
`Collaborator`s in one process (tests/unit/server/test_memory_federation.py), without ports,
certificates or the timing of a network. It drives the service the way the adapters do
(`server.grpc_adapter`, `server.socket_adapter`): the same peer check, the same download and
upload steps, the round closed after the last acknowledgement (``close_soon``), and refusals
mapped to the client's neutral errors by `client.status_error`, as gRPC's codes are.

Layering: `teefl.transport` sits below `teefl.server`, so the service is duck-typed (`Service`
below names what is used); nothing here imports the server. What this does not carry: TLS
(``security.transport`` other than none is refused by the service's own peer check, as a
plaintext connection is) and the aggregator's attestation (it needs the pinned certificate of a
TLS connection).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from teefl.transport.base import Peer
from teefl.transport.base import Refused as ServerRefused
from teefl.transport.channels import payload_check
from teefl.transport.client import (
    Challenge,
    Connect,
    Disconnect,
    GetModel,
    Join,
    Lost,
    Model,
    Open,
    PutUpdate,
    Report,
    Request,
    WaitRound,
    status_error,
)
from teefl.wire import assembly, codec, compression, teefl_pb2
from teefl.wire.checks import UpdateRejected

#: the largest model a download may announce (as the other clients allow)
_MODEL_LIMIT = 1 << 40


class Service(Protocol):
    """What is used of `teefl.server.service.Service` (typed here: transport cannot import it).
    ``identity``, ``rounds`` and ``checkpointer`` are its parts of the same names."""

    plan: Any
    data_plane: str
    identity: Any
    rounds: Any
    checkpointer: Any

    def challenge(self, peer: Peer, request: teefl_pb2.ChallengeRequest) -> Any: ...

    def join(self, peer: Peer, request: teefl_pb2.JoinRequest) -> Any: ...

    def wait_round(self, peer: Peer, request: teefl_pb2.WaitRequest) -> Any: ...

    def download(
        self, name: str, rnd: int, cancel: Any, probe: Any = None, data_plane: bool = False
    ) -> Any: ...

    def upload(
        self, name: str, h: Any, cancel: Any, probe: Any, token: bytes | None, t0: float
    ) -> Any: ...


class _Call:
    """One request in flight, as the service sees it (a gRPC call's context): what a newer
    transfer or Join cancels, with the callbacks to run when it ends (``on_end``)."""

    def __init__(self) -> None:
        self.cancelled = False
        self._ends: list[Callable[[], None]] | None = []

    def cancel(self) -> None:
        self.cancelled = True

    def on_end(self, fn: Callable[[], None]) -> bool:
        if self._ends is None:
            return False  # already ended
        self._ends.append(fn)
        return True

    def end(self) -> None:
        ends, self._ends = self._ends or [], None
        for fn in ends:
            fn()


class MemoryTransport:
    """`teefl.transport.client.ClientTransport` onto a `Service` in this process.

    ``service``: the service, or a function returning the current one (None while the
    aggregator is down: every request is then `Lost`), so a test can restart the aggregator
    under running collaborators. ``name``: the collaborator this transport speaks for.
    ``requests``: every request handled, in order (as `MockTransport`'s).
    """

    def __init__(self, service: Service | Callable[[], Service | None], name: str) -> None:
        if hasattr(service, "join"):
            self._service: Callable[[], Service | None] = lambda: service  # type: ignore[return-value]
        else:
            self._service = service  # type: ignore[assignment]
        self.name = name
        self.token: bytes | None = None  # the session token of the latest Join
        self.requests: list[Request] = []
        self.closed = False

    # -- the seam ------------------------------------------------------------------------------
    def handle(self, request: Request) -> Any:
        self.requests.append(request)
        if self.closed:
            raise Lost("the transport is closed")
        match request:
            case Connect():
                self._svc()  # reached, or Lost; nothing to pin: no TLS here
                return None
            case Open() | Disconnect():
                if isinstance(request, Disconnect):
                    self.token = None
                return None  # no connection to open or drop
        svc = self._svc()
        call = _Call()
        try:
            match request:
                case Challenge():
                    msg = teefl_pb2.ChallengeRequest(
                        collaborator=self.name,
                        nonce=request.nonce,
                        want_evidence=request.want_evidence,
                    )
                    return svc.challenge(self._peer(call, enrol=True), msg)
                case Join():
                    return self._join(svc, request, call)
                case WaitRound():
                    msg = teefl_pb2.WaitRequest(
                        collaborator=self.name, after_round=request.after_round
                    )
                    return svc.wait_round(self._peer(call), msg)
                case GetModel():
                    return self._get_model(svc, request, call)
                case PutUpdate():
                    return self._put(svc, request.header, request.payload, call)
                case Report():
                    self._put(svc, request.header, None, call)
                    return None
        except ServerRefused as exc:
            raise status_error(exc.status, exc.reason, self.name) from None
        finally:
            call.end()
        raise TypeError(f"not a transport request: {request!r}")

    def close(self) -> None:
        self.closed = True
        self.token = None

    # -- helpers -------------------------------------------------------------------------------
    def _svc(self) -> Service:
        svc = self._service()
        if svc is None:
            raise Lost("the aggregator is not running")
        return svc

    def _peer(self, call: _Call, enrol: bool = False) -> Peer:
        """The collaborator as the service's peer check sees it: plaintext, in-process."""
        return Peer(
            name=self.name,
            address=f"memory:{self.name}",
            token=None if enrol else self.token,
            handle=call,
            on_end=call.on_end,
        )

    def _join(self, svc: Service, request: Join, call: _Call) -> teefl_pb2.JoinReply:
        self.token = None
        msg = teefl_pb2.JoinRequest(
            collaborator=self.name,
            plan_sections=request.plan_sections,
            workload_digest=request.workload_digest,
        )
        if request.evidence is not None:
            msg.evidence.CopyFrom(request.evidence)
            msg.nonce = request.nonce
            msg.session_key = request.session_key
        reply = svc.join(self._peer(call, enrol=True), msg)
        self.token = bytes(reply.session_token)
        return reply

    # -- the model -----------------------------------------------------------------------------
    def _get_model(self, svc: Service, request: GetModel, call: _Call) -> Model:
        """As the data plane's GET (or gRPC's GetModel): the slot, the header, the payload --
        copied into the resident model where the header is its layout, checked as received."""
        name = svc.identity.check(self._peer(call))
        data_plane = svc.data_plane == "socket"
        dl = svc.download(name, request.round, call.cancel, data_plane=data_plane)
        dl.acquire()
        try:
            dl.start()
            try:
                with svc.checkpointer.moving():
                    h = teefl_pb2.Header.FromString(dl.header.SerializeToString())
                    check = payload_check(svc.plan)
                    state, into_model = _receive(h, dl.payload, request.resident, check)
                    dl.transfer.touch()
            finally:
                dl.stop()
            dl.sent()
        finally:
            dl.release()
        dl.record()
        return Model(None if into_model else state, h.total_size)

    # -- updates -------------------------------------------------------------------------------
    def _put(
        self, svc: Service, header: teefl_pb2.Header, payload: Any, call: _Call
    ) -> teefl_pb2.UpdateAck:
        """One update (or, ``payload`` None, the evaluation report or a failure report), then
        the round's close once every update is in -- as both adapters answer first and close
        after."""
        try:
            return self._upload(svc, header, payload, call)
        finally:
            svc.rounds.close_soon()

    def _upload(
        self, svc: Service, header: teefl_pb2.Header, payload: Any, call: _Call
    ) -> teefl_pb2.UpdateAck:
        t0 = time.monotonic()
        h = teefl_pb2.Header.FromString(header.SerializeToString())  # what a wire would carry
        peer = self._peer(call)
        name = svc.identity.check(peer)
        data_plane = svc.data_plane == "socket" and not h.evaluate_only
        up = svc.upload(name, h, call.cancel, None, peer.token, t0)
        moving = contextlib.ExitStack()  # entered once the update's bytes flow
        try:
            up.acquire()
            if h.HasField("failure"):
                if payload is not None:
                    raise UpdateRejected("a failure report must not carry a payload")
                return up.failure()
            dup = up.open()
            if dup is not None:
                return dup
            if h.evaluate_only:
                if h.total_size or payload is not None:
                    raise UpdateRejected("evaluation report must not carry a payload")
                return up.report()
            if not data_plane and h.encoding:
                raise UpdateRejected("compressed updates travel over the data plane only")
            asm = up.prepare(data_plane=data_plane)
            moving.enter_context(svc.checkpointer.moving())
            self._feed(asm, payload, svc.plan.network.chunk_size, up.transfer, call)
            ack, add = up.complete(defer_add=data_plane)
            moving.close()
            if add is not None:
                add()  # after the acknowledgement, as the data plane settles it
            return ack
        except UpdateRejected as exc:
            up.reject(exc)
            stale = exc.stale
            code = "FAILED_PRECONDITION" if stale else "INVALID_ARGUMENT"
            raise status_error(
                code, f"update {'stale' if stale else 'rejected'}: {exc}", self.name
            ) from None
        finally:
            moving.close()
            up.close()

    def _feed(self, asm: Any, payload: Any, step: int, transfer: Any, call: _Call) -> None:
        """The payload in the plan's chunks; a cancelled call (a newer transfer or Join took
        its place) stops as a broken stream does."""
        for piece in codec.iter_chunks(payload, step):
            if call.cancelled:
                raise Lost(f"upload of {self.name} cancelled by the aggregator")
            try:
                asm.add(piece)
            except codec.PayloadError as exc:
                raise UpdateRejected(str(exc)) from None
            transfer.touch()
        if call.cancelled:
            raise Lost(f"upload of {self.name} cancelled by the aggregator")


def _receive(h: teefl_pb2.Header, payload: Any, resident: Any, check: str) -> tuple[Any, bool]:
    """(state, landed in ``resident``): the payload checked against its header first, as
    `socket_client.SocketData.get_model` receives it."""
    view = memoryview(payload).cast("B")
    if h.encoding:
        asm = assembly.Assembler.for_header(h, _MODEL_LIMIT, check)
        asm.add(view)
        raw: Any = compression.decompress(asm.finish(), h.raw_size, _MODEL_LIMIT)
    else:
        raw = None
    fits = (
        resident is not None
        and (h.raw_size if h.encoding else h.total_size) == len(resident.payload)
        and bytes((raw if raw is not None else view)[: len(resident.head)]) == resident.head
        and resident.intact()
    )
    if raw is not None:
        if fits:
            memoryview(resident.payload)[:] = raw
            return None, True
        return codec.decode_state(raw), False
    buffer = resident.payload if fits else None
    asm = assembly.Assembler.for_header(h, _MODEL_LIMIT, check, buffer=buffer)
    asm.add(view)
    received = asm.finish()  # a mismatch is corruption: fatal, as on the other clients
    if fits:
        return None, True
    return codec.decode_state(received), False
