"""One update: every check before the first payload byte, receive, complete, settle.

The transport drives an `Upload`: ``acquire`` (a fair receive slot), ``open`` (the checks that need
no payload byte: a refused upload costs the uploader only its header), ``prepare`` (the receiver,
`receivers.choose`, and the assembler the transport fills), ``complete`` (checked, stored and
counted: the acknowledgement), ``settle`` (the deferred add, after the ACK went out), ``close``.
What every upload shares (slots, memory, the store) is the `intake.Intake` it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from teefl.server import receivers
from teefl.server.fairshare import Superseded
from teefl.server.intake import Intake
from teefl.server.transfers import Transfer
from teefl.transport.base import Cancelled
from teefl.wire import assembly, codec, teefl_pb2
from teefl.wire.checks import UpdateRejected


def crc_of(header: teefl_pb2.Header) -> int | None:
    return header.crc32c if header.HasField("crc32c") else None


def _sinks(*sinks: Any) -> Any:
    """One `assembly.Assembler` sink calling each of ``sinks`` that is not None, in order."""
    live = [s for s in sinks if s is not None]
    if len(live) < 2:
        return live[0] if live else None

    def both(piece: memoryview, offset: int) -> None:
        for sink in live:
            sink(piece, offset)

    return both


def finished(asm: assembly.Assembler) -> codec.ReceivedPayload:
    """The received payload, checked against the header's digest; a mismatch refuses it."""
    try:
        return asm.finish()
    except codec.PayloadError as exc:
        raise UpdateRejected(str(exc)) from None


class Upload:
    """One update in transit, driven by its transport (see the module docstring)."""

    def __init__(
        self,
        intake: Intake,
        name: str,
        h: Any,
        transfer: Transfer,
        token: bytes | None,
        t0: float,
        gate: Callable[[], None] | None = None,
    ) -> None:
        self.intake, self.name, self.h, self.transfer, self.token, self.t0 = (
            intake,
            name,
            h,
            transfer,
            token,
            t0,
        )
        #: raises `Refused` when this update may not be taken at all (its sender's attestation
        #: does not cover its round): run first in `acquire`, before a slot is taken
        self.gate = gate
        self.ticket: Any = None
        self.receiver: receivers.MemoryReceiver | None = None
        self.asm: assembly.Assembler | None = None
        self.scan: Any = None
        self.counted = False  # upload_started ran: `close` gives it back

    def acquire(self) -> None:
        """A receive slot: a bounded number of updates in memory at once, one per member."""
        if self.gate is not None:
            self.gate()
        try:
            self.ticket = self.intake.slots.acquire(self.name, self.transfer.supersede)
        except Superseded as exc:
            raise Cancelled(f"upload of {self.name}: {exc}") from None
        self.intake.rounds.upload_started()
        self.counted = True

    def open(self) -> teefl_pb2.UpdateAck | None:
        """The checks before any payload byte; a duplicate's ack (answered at once), else None."""
        return self.intake.open_update(self.name, self.h, self.transfer)

    def prepare(self, data_plane: bool) -> assembly.Assembler:
        """The receiver and the assembler the transport fills (checks on the announced size,
        digest and encoding first: before a file or a slot is made for it)."""
        intake, h = self.intake, self.h
        limit = intake.publisher.update_limit
        if not data_plane and not intake.flat:
            try:
                self.asm = assembly.Assembler.for_header(h, limit, intake.check)
            except codec.PayloadError as exc:
                raise UpdateRejected(str(exc)) from None
            self.receiver = receivers.MemoryReceiver()
            return self.asm
        try:
            assembly.Assembler.check_announced(h.total_size, h.sha256, limit, intake.check)
        except codec.PayloadError as exc:  # checked before a file is made for it
            raise UpdateRejected(str(exc)) from None
        zstd = data_plane and intake.encoding_of(h) == "zstd"
        self.receiver = rx = receivers.choose(
            intake.store,
            h.round,
            self.name,
            h.total_size,
            zstd,
            intake.staging,
            intake.rx_pool if data_plane else None,
            intake.flat,
        )
        # checked piece by piece where the pieces come from the socket (or a window), not
        # where gRPC messages may split an element
        received = rx.buffer is not None or rx.window is not None
        self.scan = intake.model.finite_scan(h.total_size) if received else None
        sink = _sinks(rx.file_sink, self.scan)
        try:
            self.asm = assembly.Assembler.for_header(
                h, limit, intake.check, rx.buffer, sink, rx.window, rx.window_slot
            )
        except codec.PayloadError as exc:  # a field the check needs is missing
            raise UpdateRejected(f"malformed update header: {exc}") from None
        return self.asm

    def complete(self, defer_add: bool) -> tuple[teefl_pb2.UpdateAck, Any]:
        """Every byte is in: checked, stored and counted; returns (ack, the deferred add)."""
        intake, h, rx = self.intake, self.h, self.receiver
        assert self.asm is not None and rx is not None
        payload, digest, crc = finished(self.asm), h.sha256, crc_of(h)
        if payload is None:  # received through a window into its file: read from there
            payload = rx.payload()
        if rx.zstd:
            payload, digest, crc = intake.decompressed(payload, h)
        # data plane: decoded in place, the tensors share the received buffer
        payload, state = intake.model.decode_update(payload, owned=defer_add, scan=self.scan)
        metrics = {k: float(v) for k, v in h.metrics.items()}
        return intake.accept(
            self.name,
            h.round,
            state,
            int(h.num_samples),
            metrics,
            payload,
            self.t0,
            digest,
            defer_add=defer_add,
            receiver=rx,
            crc=crc,
            token=self.token,
        )

    def report(self) -> teefl_pb2.UpdateAck:
        """An evaluation report (no payload): stored and counted."""
        h = self.h
        metrics = {k: float(v) for k, v in h.metrics.items()}
        samples = int(h.num_samples)
        return self.intake.accept(
            self.name, h.round, None, samples, metrics, None, self.t0, token=self.token
        )[0]

    def failure(self) -> teefl_pb2.UpdateAck:
        """A failure report (``Header.failure``, no payload): checked and counted out of its
        round (`Intake.report_failure`). The transport has checked that no data followed."""
        return self.intake.report_failure(self.name, self.h, self.token)

    def reject(self, exc: UpdateRejected) -> None:
        """Refused: nothing of it stays, and the refusal is logged and recorded."""
        if self.receiver is not None:
            self.receiver.abort()
        self.intake.report_rejected(self.name, self.h.round, exc)

    def close(self) -> None:
        """In every case, once: the receive memory, the in-flight entry and the slot go back."""
        intake = self.intake
        if self.receiver is not None:
            self.receiver.abort()  # not committed: its file goes
            self.receiver.release()
            self.receiver = None
        if self.counted:
            self.counted = False
            intake.rounds.upload_ended(self.name, self.transfer)
        else:
            intake.rounds.forget(self.name, self.transfer)
        if self.ticket is not None:
            intake.slots.release(self.ticket)
            self.ticket = None
