"""A payload received as chunks: preallocated from its announced size, hashed on arrival."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import crc32c as _crc32c

from teefl.wire.codec import CHECKS, PayloadError, ReceivedPayload

#: bytes hashed at a time while receiving from a socket: small enough that they are hashed
#: while still in the CPU cache the receive just wrote them through (docs/decisions/007)
HASH_PIECE = 256 << 10
#: the same through a receive window (`teefl.store.paged.MappedUpdateFile`): each piece's
#: bytes are still checked there while in cache, but several uploads at once each take the GIL
#: back after every receive, checksum and check: larger pieces, fewer hand-offs
#: (docs/decisions/009-flat-memory.md)
WINDOW_PIECE = 1 << 20


class Assembler:
    """Receives chunks into a buffer allocated once from the announced size.

    Why preallocate: a growing bytes object copies the whole payload on every append; and a
    declared size lets the receiver refuse an oversized stream before buffering it. Why hash on
    arrival: the SHA-256 of each chunk is computed while gRPC receives the next one (hashlib
    releases the GIL), instead of one pass over the whole payload after the last chunk.

    ``check`` (one of `CHECKS`): "sha256" verifies ``expected_sha256``; "crc32c" verifies
    ``expected_crc32c`` instead (a fraction of SHA-256's cost, docs/decisions/007: enough
    against accidental corruption, which is all a checksum can catch on a connection without
    TLS); "none" for a payload that came over TLS, whose records are each authenticated by
    their AEAD tag.
    ``buffer``: receive into this writable buffer of exactly ``total_size`` bytes (a buffer
    kept from round to round) instead of a fresh one. ``sink(piece, offset)``: called with each
    piece once it is in the buffer and checksummed, in order (the aggregator writes it to the
    update's file while it is still in the CPU cache).
    """

    def __init__(
        self,
        total_size: int,
        expected_sha256: bytes,
        limit: int,
        *,
        check: str = "sha256",
        expected_crc32c: int | None = None,
        buffer: Any = None,
        sink: Callable[[memoryview, int], None] | None = None,
        window: Any = None,
        window_slot: int = 0,
    ) -> None:
        self.check_announced(total_size, expected_sha256, limit, check)
        if check not in CHECKS:
            raise ValueError(f"unknown payload check {check!r}")
        if check == "crc32c" and expected_crc32c is None:
            raise PayloadError("header carries no CRC32C (the receiver checks one)")
        self.total = total_size
        self.expected = expected_sha256
        self.expected_crc = expected_crc32c
        self.check = check
        self._crc = 0
        #: ``window``: the payload passes through this buffer, piece after piece, and lives
        #: only where ``sink`` puts it (`finish` then returns None); else ``buffer`` holds it.
        #: ``window_slot``: no piece crosses a multiple of it (a window of several slots, each
        #: handed on whole while the next one fills: `teefl.store.paged.MappedUpdateFile`)
        self._wrap = self._cut = 0
        if window is not None:
            self.buf = None
            self._view = memoryview(window).cast("B")
            self._wrap = len(self._view)
            self._cut = window_slot or self._wrap
            if self._cut < HASH_PIECE or self._wrap % self._cut or sink is None:
                raise ValueError(
                    "a receive window needs a sink and at least one piece (per slot), "
                    "and a whole number of slots"
                )
        else:
            self.buf = ReceivedPayload(total_size) if buffer is None else buffer
            self._view = memoryview(self.buf).cast("B")
            if len(self._view) != total_size:
                raise ValueError("receive buffer does not have the announced size")
        self._hash = hashlib.sha256()
        self.filled = 0
        self.sink = sink

    @classmethod
    def for_header(
        cls,
        header: Any,
        limit: int,
        check: str,
        buffer: Any = None,
        sink: Callable[[memoryview, int], None] | None = None,
        window: Any = None,
        window_slot: int = 0,
    ) -> Assembler:
        """The assembler a wire `Header` (teefl.proto) announces: its size and digests."""
        crc = header.crc32c if header.HasField("crc32c") else None
        return cls(
            header.total_size,
            header.sha256,
            limit,
            check=check,
            expected_crc32c=crc,
            buffer=buffer,
            sink=sink,
            window=window,
            window_slot=window_slot,
        )

    @staticmethod
    def check_announced(
        total_size: int, expected_sha256: bytes, limit: int, check: str = "sha256"
    ) -> None:
        """The header checks, before any buffer (or file) is made for the payload. A sender
        leaves the SHA-256 out (empty) where nobody checks it (`CHECKS`)."""
        if total_size > limit:
            raise PayloadError(f"announced payload of {total_size} bytes exceeds limit {limit}")
        if len(expected_sha256) != 32 and (check == "sha256" or expected_sha256):
            raise PayloadError("header carries no valid SHA-256")

    def _at(self, start: int, stop: int) -> memoryview:
        """Where payload bytes ``start:stop`` go: the buffer's, or the window's (never across
        its end: callers cut pieces at `_room`)."""
        if not self._wrap:
            return self._view[start:stop]
        w = start % self._wrap
        return self._view[w : w + stop - start]

    def _room(self, start: int) -> int:
        """Bytes from ``start`` to the end of its window slot (unbounded without a window)."""
        return self._cut - start % self._cut if self._cut else self.total - start

    def add(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        end = self.filled + n
        if end > self.total:
            raise PayloadError(f"stream carries more than the announced {self.total} bytes")
        src, done = memoryview(data).cast("B"), 0
        while done < n:
            start = self.filled + done
            k = min(n - done, self._room(start))
            dst = self._at(start, start + k)
            dst[:] = src[done : done + k]
            self._digest(dst)
            if self.sink is not None:
                self.sink(dst, start)
            done += k
        self.filled = end

    def _digest(self, data: bytes | bytearray | memoryview) -> None:
        if self.check == "sha256":
            self._hash.update(data)
        elif self.check == "crc32c":
            self._crc = _crc32c.crc32c(data, self._crc)

    def receive(
        self, recv_into: Callable[[memoryview], int], step: int, tick: Callable[[], None] | None
    ) -> None:
        """Fill the rest of the buffer straight from a socket (no intermediate copy).

        ``recv_into(view)`` returns the bytes it wrote into ``view`` (0 at end of stream); the
        bytes are hashed in `HASH_PIECE` pieces (`WINDOW_PIECE` through a window) as they come
        in, and ``tick`` reports progress after every ``step`` bytes.
        """
        piece = min(step, WINDOW_PIECE if self._wrap else HASH_PIECE)
        while self.filled < self.total:
            end = min(self.total, self.filled + step)
            while self.filled < end:
                start = pos = self.filled
                stop = min(end, start + piece, start + self._room(start))
                dst = self._at(start, stop)
                while pos < stop:
                    k = recv_into(dst[pos - start :])
                    if k == 0:
                        raise PayloadError(
                            f"stream ended after {pos} of {self.total} announced bytes (truncated)"
                        )
                    pos += k
                self._digest(dst)
                if self.sink is not None:
                    self.sink(dst, start)
                self.filled = stop
            if tick is not None:
                tick()

    def finish(self) -> ReceivedPayload | None:
        if self.filled != self.total:
            raise PayloadError(
                f"stream ended after {self.filled} of {self.total} announced bytes (truncated)"
            )
        if self.check == "sha256" and self._hash.digest() != self.expected:
            raise PayloadError("payload SHA-256 does not match its header (corrupted in transit)")
        if self.check == "crc32c" and self._crc != self.expected_crc:
            raise PayloadError("payload CRC32C does not match its header (corrupted in transit)")
        self._view.release()
        return self.buf
