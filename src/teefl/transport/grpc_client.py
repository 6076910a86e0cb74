"""The collaborator's transport over gRPC: the control plane, and the model data over gRPC
streams or over the socket data plane (`socket_client.SocketData`), as the plan's
``network.data_plane`` says.

Channels (see docs/security.md, "Where each key is born"): the *enrolment* channel carries
Challenge and Join -- under mtls with the certificate the plan's CA issued to this collaborator.
When collaborators must attest, the collaborator makes its TLS key in memory at start-up, binds
its evidence to it at Join, and opens a second channel (and its data-plane socket) with the
session certificate the aggregator issued for that key: only that one may carry model data.
When the aggregator must attest, every channel and the data-plane socket trust exactly the
certificate whose key the aggregator's evidence was verified for (pinned), nothing else.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from teefl.errors import TeeflError
from teefl.faults import fault
from teefl.plan import Plan
from teefl.security import attest
from teefl.security import session as session_keys
from teefl.security.tls_diagnosis import ConnectError, split_target
from teefl.transport import framing, socket_client
from teefl.transport.channels import client_certs, open_channel, payload_check
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
    Refused,
    Report,
    Request,
    WaitRound,
    status_error,
)
from teefl.wire import assembly, codec, teefl_pb2, teefl_pb2_grpc

#: metadata key of the session token (hex) on every call after Join (see aggregator.py)
SESSION_METADATA = "teefl-session"

#: what a dropped connection surfaces as below gRPC (a reset TCP connection, a TLS record cut
#: off, an early EOF): each is a `Lost`
_SOCKET_ERRORS = (ConnectionError, TimeoutError, ssl.SSLError, EOFError)


class GrpcClient:
    """`teefl.transport.client.ClientTransport` over gRPC (plus the socket data plane)."""

    def __init__(self, plan: Plan, name: str, address: str, session_key: Any = None) -> None:
        self.plan, self.name, self.address = plan, name, address
        #: this collaborator's in-memory TLS key when it must attest (its session certificate
        #: is issued for it at every Join)
        self.session_key = session_key
        self._session_key_pem = (
            session_keys.key_pem(session_key) if session_key is not None else None
        )
        self.session_cert: bytes | None = None
        #: the aggregator's own certificate (PEM) when it must attest: every channel and the
        #: data plane trust exactly this certificate
        self.pin: bytes | None = None
        self.enrol: grpc.Channel | None = None  # Challenge and Join
        self.session_channel: grpc.Channel | None = None  # model traffic, attested session
        self.stub: teefl_pb2_grpc.FederationStub | None = None  # the model traffic's stub
        self._md: tuple[tuple[str, str], ...] = ()  # the session token, on every call
        self.data: socket_client.SocketData | None = None  # None: model data over gRPC
        self.check = payload_check(plan)  # what downloads are checked against

    def handle(self, request: Request) -> Any:
        try:
            match request:
                case WaitRound():
                    return self._call(
                        self.stub.WaitRound,  # type: ignore[union-attr]
                        teefl_pb2.WaitRequest(
                            collaborator=self.name, after_round=request.after_round
                        ),
                    )
                case GetModel():
                    if self.data is not None:
                        return Model(*self.data.get_model(request.round, request.resident))
                    return self._get_model(request.round)
                case PutUpdate():
                    if self.data is not None:
                        return self.data.put_update(request.header, request.payload, request.round)
                    return self._put_update(request.header, request.payload, request.round)
                case Report():
                    self._call(
                        self.stub.PutUpdate,  # type: ignore[union-attr]
                        iter([teefl_pb2.Chunk(header=request.header)]),
                    )
                    return None
                case Challenge():
                    return self._call(
                        self._enrol_stub().Challenge,
                        teefl_pb2.ChallengeRequest(
                            collaborator=self.name,
                            nonce=request.nonce,
                            want_evidence=request.want_evidence,
                        ),
                        metadata=(),
                    )
                case Join():
                    return self._join(request)
                case Open():
                    self._open_session(request.reply)
                    self._open_data(request.reply, request.aggregator_key)
                    return None
                case Connect():
                    return self._connect(request.patience)
                case Disconnect():
                    self._close_data()
                    self._close_session()
                    if self.pin is not None:  # a restarted aggregator has a new key: fetch,
                        self._close_enrol()  # verify and pin it again
                    return None
        except _SOCKET_ERRORS as exc:
            raise Lost(str(exc)) from None
        raise TypeError(f"not a transport request: {request!r}")

    def close(self) -> None:
        self._close_data()
        self._close_session()
        self._close_enrol()

    # -- channels ----------------------------------------------------------------------------
    def _connect(self, patience: float | None) -> bytes | None:
        """The enrolment channel; with the aggregator's attestation required, pinned to the
        certificate it presents now (checked at Challenge, before anything else is asked)."""
        if self.enrol is not None:
            return self.pin
        required = self.plan.security.attestation.aggregator == "required"
        if patience is not None:  # the first contact: anything but a timeout is an error
            if required:
                self.pin = self._fetch_pin(patience)
            self.enrol = open_channel(self.plan, self.name, self.address, patience, pin=self.pin)
            self.stub = teefl_pb2_grpc.FederationStub(self.enrol)
            return self.pin
        try:  # a rejoin: anything that may pass by waiting is a `Lost`
            if required:
                try:
                    self.pin = attest.fetch_server_certificate(self.address, timeout=5.0)
                except ConnectionError as exc:
                    raise Lost(str(exc)) from None
            self.enrol = open_channel(self.plan, self.name, self.address, 10.0, pin=self.pin)
            self.stub = teefl_pb2_grpc.FederationStub(self.enrol)
        except ConnectError as exc:
            if not exc.retryable:
                raise
            raise Lost(str(exc)) from None
        return self.pin

    def _fetch_pin(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return attest.fetch_server_certificate(self.address, timeout=5.0)
            except ConnectionError as exc:
                if time.monotonic() >= deadline:
                    raise TeeflError(str(exc)) from None
                time.sleep(0.5)

    def _enrol_stub(self) -> teefl_pb2_grpc.FederationStub:
        assert self.enrol is not None, "Connect first"
        return teefl_pb2_grpc.FederationStub(self.enrol)

    def _join(self, request: Join) -> teefl_pb2.JoinReply:
        self._md = ()
        msg = teefl_pb2.JoinRequest(
            collaborator=self.name,
            plan_sections=request.plan_sections,
            workload_digest=request.workload_digest,
        )
        if request.evidence is not None:
            msg.evidence.CopyFrom(request.evidence)
            msg.nonce = request.nonce
            msg.session_key = request.session_key
        reply = self._call(self._enrol_stub().Join, msg)
        self._md = ((SESSION_METADATA, bytes(reply.session_token).hex()),)
        return reply

    def _close_enrol(self) -> None:
        if self.enrol is not None:
            self.enrol.close()
            self.enrol = None

    def _close_session(self) -> None:
        if self.session_channel is not None:
            self.session_channel.close()
            self.session_channel = None

    def _close_data(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None

    def _open_session(self, reply: teefl_pb2.JoinReply) -> None:
        """The channel for model traffic: the enrolment channel itself, or -- when this
        collaborator must attest -- a new one with the session certificate just issued for
        its in-memory key (the aggregator refuses model calls over any other certificate)."""
        self._close_session()
        if self.session_key is None:
            assert self.enrol is not None
            self.stub = teefl_pb2_grpc.FederationStub(self.enrol)
            return
        from cryptography import x509

        from teefl.security import certificates

        pem = bytes(reply.session_cert)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise TeeflError("the aggregator's Join reply carries no session certificate") from None
        if session_keys.spki_of(cert) != session_keys.spki_of(self.session_key) or (
            certificates.common_name(cert) != self.name
        ):
            raise TeeflError("the session certificate is not for this collaborator's key")
        self.session_cert = pem
        assert self._session_key_pem is not None
        try:
            self.session_channel = open_channel(
                self.plan,
                self.name,
                self.address,
                30.0,
                pin=self.pin,
                client=(pem, self._session_key_pem),
            )
        except ConnectError as exc:
            if not exc.retryable:
                raise
            raise Lost(str(exc)) from None
        self.stub = teefl_pb2_grpc.FederationStub(self.session_channel)

    def _open_data(self, reply: teefl_pb2.JoinReply, aggregator_key: bytes | None) -> None:
        """The data-plane connection (see framing.py) when the plan says
        ``network.data_plane: socket``: a reply that offers none is refused, not taken as a
        reason to move model data over another path (a downgrade the plan did not ask for)."""
        self._close_data()
        if self.plan.network.data_plane != "socket":
            return
        if not reply.data_port:
            raise TeeflError(
                "the aggregator's Join reply offers no data plane, but the plan says "
                "network.data_plane: socket; refusing to move model data over another path"
            )
        host, _ = split_target(self.address)
        tls = None
        certs = client_certs(self.plan, self.name)
        if certs is not None:
            chain: tuple[bytes, bytes] | tuple[Path, Path] | None = None
            if self.session_key is not None:
                assert self.session_cert is not None and self._session_key_pem is not None
                chain = (self.session_cert, self._session_key_pem)
            elif certs.cert is not None and certs.key is not None:
                chain = (certs.cert, certs.key)
            roots = self.pin if self.pin is not None else certs.ca.read_bytes()
            tls = session_keys.client_ssl_context(roots, chain, pinned=self.pin is not None)
        try:
            sock = socket_client.connect(
                host, reply.data_port, self.name, reply.session_token, tls, aggregator_key
            )
        except framing.Closed as exc:
            raise Lost(str(exc)) from None
        except framing.RemoteError as exc:
            raise status_error(exc.code, exc.message, self.name) from None
        net = self.plan.network
        self.data = socket_client.SocketData(sock, self.name, self.check, net.compression)

    # -- calls -------------------------------------------------------------------------------
    def _call(self, method: Any, request: Any, metadata: Any = None) -> Any:
        try:
            return method(request, metadata=self._md if metadata is None else metadata)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc) from None

    def _rpc_error(self, exc: grpc.RpcError) -> Exception:
        code = exc.code()
        if code is None:  # no status at all: nothing says waiting would help
            return Refused(self.name, exc.details() or "")
        return status_error(code.name, exc.details() or "", self.name)

    def _put_update(self, header: teefl_pb2.Header, payload: Any, r: int) -> teefl_pb2.UpdateAck:
        """Send one update and wait for its acknowledgement.

        The header goes first; the data follows only once the aggregator has given this upload
        a receive slot (it says so in the call's initial metadata). Without that, every upload
        queued behind the aggregator's bound would park up to a whole HTTP/2 window of data in
        the aggregator's memory, and its memory would grow with the number of collaborators.
        """
        started = threading.Event()
        holder: list[Any] = []
        assert self.stub is not None
        call = self.stub.PutUpdate.future(
            self._upload_stream(header, payload, r, started, holder), metadata=self._md
        )
        holder.append(call)
        started.set()
        try:
            return call.result()
        except grpc.RpcError as exc:
            raise self._rpc_error(exc) from None

    def _upload_stream(
        self,
        header: teefl_pb2.Header,
        payload: Any,
        r: int,
        started: threading.Event,
        holder: list[Any],
    ) -> Iterator[Any]:
        """The update's messages; ``holder[0]`` is the call, set before ``started`` is."""
        yield teefl_pb2.Chunk(header=header)
        started.wait()
        holder[0].initial_metadata()  # returns once a slot is ours (or the call has ended)
        if not holder[0].is_active():
            return
        offset = 0
        for piece in codec.iter_chunks(payload, self.plan.network.chunk_size):
            yield teefl_pb2.Chunk(data=bytes(piece), offset=offset)
            offset += len(piece)
            fault("upload", r)

    def _get_model(self, r: int) -> Model:
        assert self.stub is not None
        stream = self.stub.GetModel(
            teefl_pb2.ModelRequest(collaborator=self.name, round=r), metadata=self._md
        )
        try:
            first = next(stream)
            if not first.HasField("header"):
                raise TeeflError("model stream did not start with a header")
            h = first.header
            asm = assembly.Assembler.for_header(h, 1 << 40, self.check)
            for chunk in stream:
                if chunk.offset != asm.filled:
                    raise TeeflError(f"model stream out of order at offset {chunk.offset}")
                asm.add(chunk.data)
                fault("download", r)
            payload = asm.finish()
        except grpc.RpcError as exc:
            raise self._rpc_error(exc) from None
        return Model(codec.decode_state(payload), h.total_size)
