"""A collaborator's data connection: TCP or TLS, then HELLO with its name and session token;
then the round's model down and updates up over it (`SocketData`)."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from typing import TYPE_CHECKING, Any

from teefl.errors import TeeflError
from teefl.faults import fault
from teefl.transport import framing
from teefl.transport.client import Lost, status_error
from teefl.transport.framing import (
    HANDSHAKE_TIMEOUT_S,
    HELLO,
    OK,
    Closed,
    expect,
    keepalive,
    send_frame,
)
from teefl.wire import assembly, codec, compression, teefl_pb2

if TYPE_CHECKING:
    import torch

    from teefl.client.resident import ResidentModel


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

                from teefl.security.attest import spki_der_of

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


class SocketData:
    """One session's data-plane connection: the round's model down (GET), an update up (PUT).

    Downloads are received straight into their final buffer -- the resident model itself when
    the payload's header is exactly its layout, else a receive buffer kept from round to round
    (faulting in 45 fresh MB costs ~30 ms, more than receiving into memory already mapped).
    Uploads send the payload as it is, the model's own memory included.
    """

    def __init__(self, sock: Any, name: str, check: str, compression: str) -> None:
        self.sock, self.name, self.check, self.compression = sock, name, check, compression
        #: the receive buffer for payloads that are not the resident model's layout. The tensors
        #: decoded from it live only until the collaborator has copied them into the model.
        self._rx: bytearray | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def put_update(self, header: teefl_pb2.Header, payload: Any, r: int) -> teefl_pb2.UpdateAck:
        """PUT header, wait for GO, the payload, wait for ACK."""
        sock = self.sock
        try:
            framing.send_frame(sock, framing.PUT, header.SerializeToString())
            kind, body = framing.recv_frame(sock)
            if kind == framing.ERROR:
                framing.raise_error(body)
            if kind == framing.ACK:  # already counted (e.g. we restarted after its ack)
                return teefl_pb2.UpdateAck.FromString(body)
            if kind != framing.GO:
                raise framing.Closed(f"unexpected frame {kind} instead of GO")
            framing.send_payload(sock, payload, tick=lambda: fault("upload", r))
            return teefl_pb2.UpdateAck.FromString(framing.expect(sock, framing.ACK))
        except framing.RemoteError as exc:
            raise status_error(exc.code, exc.message, self.name) from None
        except (framing.Closed, OSError) as exc:
            raise Lost(f"data plane: {exc}") from None

    def get_model(
        self, r: int, resident: ResidentModel | None
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        """The round's model and its size; the state is None when it was received straight
        into ``resident`` (nothing is left to load)."""
        sock = self.sock
        request = teefl_pb2.ModelRequest(collaborator=self.name, round=r)
        into_model = False
        try:
            framing.send_frame(sock, framing.GET, request.SerializeToString())
            h = teefl_pb2.Header.FromString(framing.expect(sock, framing.MODEL))
            if h.encoding:
                return self._get_frame(h, r, resident)
            head = b""
            if resident is not None and h.total_size == len(resident.payload):
                # the header first: only a byte-identical layout may be written into the model
                # (a broken connection after it leaves the model half-overwritten, which is
                # harmless: the model is used only after a complete, checked download)
                head = bytearray(len(resident.head))
                framing.recv_exact(sock, memoryview(head))
                into_model = head == resident.head and resident.intact()
            if into_model:
                assert resident is not None
                buffer = resident.payload
            else:
                if self._rx is None or len(self._rx) != h.total_size:
                    self._rx = bytearray(h.total_size)
                buffer = self._rx
            asm = assembly.Assembler.for_header(h, 1 << 40, self.check, buffer=buffer)
            asm.add(head)
            try:
                asm.receive(framing.reader(sock), framing.STEP, lambda: fault("download", r))
            except codec.PayloadError as exc:  # the connection ended mid-payload
                raise framing.Closed(str(exc)) from None
        except framing.RemoteError as exc:
            raise status_error(exc.code, exc.message, self.name) from None
        except (framing.Closed, OSError) as exc:
            raise Lost(f"data plane: {exc}") from None
        payload = asm.finish()  # a checksum mismatch here is corruption: fatal, not a retry
        if into_model:
            return None, h.total_size
        return codec.decode_state(payload, owned=True), h.total_size

    def _get_frame(
        self, h: teefl_pb2.Header, r: int, resident: ResidentModel | None
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        """A compressed model (``network.compression``): the frame, checked against the header,
        then decompressed into the model where its layout is the model's."""
        want = compression.encoding_of(self.compression)
        if h.encoding != want:
            raise TeeflError(
                f"the aggregator sent the model as {h.encoding!r}; this plan's "
                f"network.compression is {self.compression!r}"
            )
        asm = assembly.Assembler.for_header(h, 1 << 40, self.check)
        try:
            asm.receive(framing.reader(self.sock), framing.STEP, lambda: fault("download", r))
        except codec.PayloadError as exc:  # the connection ended mid-payload
            raise framing.Closed(str(exc)) from None
        # a checksum mismatch or a malformed frame here is corruption: fatal, not a retry
        raw = compression.decompress(asm.finish(), h.raw_size, 1 << 40)
        if (
            resident is not None
            and len(raw) == len(resident.payload)
            and raw[: len(resident.head)] == resident.head
            and resident.intact()
        ):
            memoryview(resident.payload)[:] = raw
            return None, h.total_size
        return codec.decode_state(raw), h.total_size
