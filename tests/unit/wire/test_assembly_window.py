"""A payload received through a window (`Assembler(window=...)`): every byte reaches the sink
once, in order, at its offset; the digests are checked over all of it; the window is reused."""

from __future__ import annotations

import hashlib
import os

import crc32c
import pytest

from teefl.wire.assembly import HASH_PIECE, WINDOW_PIECE, Assembler
from teefl.wire.codec import PayloadError

SIZE = 3 * HASH_PIECE + 12345  # not a multiple of the window or a piece


def _collect():
    out = bytearray()

    def sink(piece: memoryview, offset: int) -> None:
        assert offset == len(out)
        out.extend(piece)

    return out, sink


@pytest.mark.parametrize("check", ["sha256", "crc32c"])
def test_chunks_through_a_window_reach_the_sink_whole(check: str) -> None:
    data = os.urandom(SIZE)
    out, sink = _collect()
    window = bytearray(HASH_PIECE + 7)  # chunks cross its end
    asm = Assembler(
        SIZE,
        hashlib.sha256(data).digest(),
        SIZE,
        check=check,
        expected_crc32c=crc32c.crc32c(data),
        sink=sink,
        window=window,
    )
    for i in range(0, SIZE, 100_003):
        asm.add(data[i : i + 100_003])
    assert asm.finish() is None  # nothing held: the sink has it
    assert bytes(out) == data


def _short_reads(data: bytes):
    """A socket's ``recv_into`` over ``data``: short reads, as a socket gives them."""
    pos = 0

    def recv_into(view: memoryview) -> int:
        nonlocal pos
        k = min(len(view), 70_001, len(data) - pos)
        view[:k] = data[pos : pos + k]
        pos += k
        return k

    return recv_into


def _crc_through(data: bytes, sink, window: bytearray, slot: int = 0) -> Assembler:
    """An assembler for ``data`` (checked by its CRC32C) through ``window`` into ``sink``."""
    return Assembler(
        len(data),
        b"",
        len(data),
        check="crc32c",
        expected_crc32c=crc32c.crc32c(data),
        sink=sink,
        window=window,
        window_slot=slot,
    )


def test_a_socket_stream_through_a_window_reaches_the_sink_whole() -> None:
    data = os.urandom(SIZE)
    out, sink = _collect()
    recv_into = _short_reads(data)

    asm = _crc_through(data, sink, bytearray(2 * HASH_PIECE))
    asm.receive(recv_into, 4 << 20, None)
    assert asm.finish() is None and bytes(out) == data


def test_a_corrupted_stream_through_a_window_is_refused() -> None:
    data = bytearray(os.urandom(SIZE))
    digest = hashlib.sha256(data).digest()
    data[HASH_PIECE + 3] ^= 1
    _, sink = _collect()
    asm = Assembler(SIZE, digest, SIZE, sink=sink, window=bytearray(HASH_PIECE))
    asm.add(data)
    with pytest.raises(PayloadError, match="SHA-256"):
        asm.finish()


def test_a_window_needs_a_sink_and_a_piece() -> None:
    with pytest.raises(ValueError, match="window"):
        Assembler(10, b"", 10, check="none", window=bytearray(HASH_PIECE))
    with pytest.raises(ValueError, match="window"):
        Assembler(10, b"", 10, check="none", sink=lambda p, o: None, window=bytearray(10))


@pytest.mark.parametrize("how", ["add", "receive"])
def test_no_piece_crosses_a_window_slot(how: str) -> None:
    """A window of slots (`MappedUpdateFile`: each full slot is written while the next fills):
    every piece lies inside one slot, at the window position of its offset, whatever the chunks
    or reads."""
    slot = HASH_PIECE
    window = bytearray(3 * slot)
    data = os.urandom(SIZE)
    out = bytearray()

    def sink(piece: memoryview, offset: int) -> None:
        assert offset == len(out)
        assert offset // slot == (offset + len(piece) - 1) // slot, "a piece crosses a slot"
        w = offset % len(window)
        assert bytes(window[w : w + len(piece)]) == bytes(piece)
        out.extend(piece)

    asm = _crc_through(data, sink, window, slot)
    if how == "add":
        for i in range(0, SIZE, 100_003):
            asm.add(data[i : i + 100_003])
    else:  # steps that are not a multiple of the piece
        asm.receive(_short_reads(data), 100_000, None)
    assert asm.finish() is None and bytes(out) == data


def test_a_window_holds_a_whole_number_of_slots() -> None:
    with pytest.raises(ValueError, match="whole number of slots"):
        Assembler(
            10,
            b"",
            10,
            check="none",
            sink=lambda p, o: None,
            window=bytearray(3 * HASH_PIECE),
            window_slot=2 * HASH_PIECE,
        )


def test_a_socket_stream_through_a_window_is_checked_in_window_pieces() -> None:
    """Through a window the receive hands on `WINDOW_PIECE` bytes at a time (fewer steps per
    byte for concurrent uploads), cut at slot ends; without one, `HASH_PIECE`."""
    slot = 2 * WINDOW_PIECE
    data = os.urandom(3 * slot + 12345)
    sizes: list[int] = []

    def sink(piece: memoryview, offset: int) -> None:
        sizes.append(len(piece))

    asm = _crc_through(data, sink, bytearray(2 * slot), slot)
    asm.receive(_short_reads(data), 4 << 20, None)
    assert asm.finish() is None
    assert max(sizes) == WINDOW_PIECE and sum(sizes) == len(data)
    assert sizes.count(WINDOW_PIECE) == len(data) // WINDOW_PIECE
    sizes.clear()
    plain = Assembler(
        len(data), b"", len(data), check="crc32c", expected_crc32c=crc32c.crc32c(data), sink=sink
    )
    plain.receive(_short_reads(data), 4 << 20, None)
    assert plain.finish() is not None and max(sizes) == HASH_PIECE
