"""Sealed files of any size (format version 3): a payload over what one AES-GCM message can
hold (2**31 - 1 bytes in ``cryptography``) is sealed as a sequence of messages, each bound to
the header, its place and whether it is the last -- no reordering, dropping, repeating or
cutting off goes unnoticed. The small tests shrink the limits; the slow one seals 2 GiB + 1."""

from __future__ import annotations

import os

import pytest

from teefl.security import sealed, sealstream
from teefl.security.sealed import (
    ContextMismatchError,
    SealedError,
    TamperedError,
    TruncatedError,
    generate_key,
    open_sealed,
    seal_bytes,
    unseal_bytes,
)

CTX = {"run": "r1", "kind": "checkpoint", "party": "aggregator", "round": 2}


@pytest.fixture
def small(monkeypatch):
    """One message holds at most 100 bytes; a stream message carries 32."""
    monkeypatch.setattr(sealed, "SINGLE_MAX", 100)
    monkeypatch.setattr(sealstream, "STREAM_CHUNK", 32)


def _body_start(blob: bytes) -> int:
    (ctx_len,) = sealed._CTX_LEN.unpack_from(blob, sealed.HEADER_SIZE)
    return sealed.HEADER_SIZE + sealed._CTX_LEN.size + ctx_len + sealstream._CHUNK_SIZE.size


@pytest.mark.parametrize("size", [101, 128, 129, 1000])
def test_a_payload_over_one_message_round_trips(small, size: int) -> None:
    key, data = generate_key(), os.urandom(size)
    blob = bytes(seal_bytes(data, key, CTX))
    assert blob[len(sealed.MAGIC)] == sealed.STREAM_VERSION
    messages = -(-size // 32)
    assert len(blob) == _body_start(blob) + size + messages * sealed.TAG_SIZE
    plain, ctx = open_sealed(blob, key)
    assert plain == data and ctx == CTX
    assert unseal_bytes(blob, key, CTX) == data
    with pytest.raises(ContextMismatchError):
        unseal_bytes(blob, key, {**CTX, "round": 3})


def test_one_message_stays_version_2(small) -> None:
    blob = seal_bytes(b"x" * 100, generate_key(), CTX)
    assert blob[len(sealed.MAGIC)] == sealed.FORMAT_VERSION


def test_every_bit_flip_of_a_stream_is_refused(small) -> None:
    key = generate_key()
    blob = bytes(seal_bytes(os.urandom(70), key, CTX))  # 3 messages
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(SealedError):
            open_sealed(bytes(bad), key)


def test_messages_cannot_be_swapped_dropped_or_cut_off(small) -> None:
    key = generate_key()
    blob = bytes(seal_bytes(os.urandom(96), key, CTX))  # 3 full messages of 32 + 16
    start, m = _body_start(blob), 32 + sealed.TAG_SIZE
    head, msgs = blob[:start], [blob[start + i * m : start + (i + 1) * m] for i in range(3)]
    with pytest.raises(TamperedError):  # reordered
        open_sealed(head + msgs[1] + msgs[0] + msgs[2], key)
    with pytest.raises(TamperedError):  # a message repeated in place of another
        open_sealed(head + msgs[0] + msgs[0] + msgs[2], key)
    with pytest.raises(TruncatedError):  # the last one cut off
        open_sealed(head + msgs[0] + msgs[1], key)
    # cut off at a message boundary with the header's length edited to match: the second
    # message was not sealed as the last one (and the header is authenticated anyway)
    short = bytearray(head)
    short[sealed.HEADER_SIZE - 8 : sealed.HEADER_SIZE] = (2 * m).to_bytes(8, "big")
    with pytest.raises(TamperedError):
        open_sealed(bytes(short) + msgs[0] + msgs[1], key)


@pytest.mark.slow
def test_a_payload_over_2_gib_is_sealed_and_opened() -> None:
    """The real limits: 2**31 bytes, one more than one AES-GCM message of ``cryptography``
    takes (format version 2 raised OverflowError here). ~6 GiB of memory, a few seconds."""
    key = generate_key()
    data = bytearray(2**31)
    data[-3:] = b"end"
    blob = seal_bytes(data, key, CTX)
    assert blob[len(sealed.MAGIC)] == sealed.STREAM_VERSION
    del data
    plain = unseal_bytes(blob, key, CTX)
    assert len(plain) == 2**31 and plain[-3:] == b"end" and plain[:4] == bytes(4)
