"""Sealed file format version 3: a payload too big for one AES-GCM message.

AES-GCM in ``cryptography`` seals at most 2**31 - 1 bytes per message, so a checkpoint or update
over 2 GiB is sealed as a sequence of messages of `STREAM_CHUNK` plaintext bytes each. Each
message's nonce is the file's random nonce with its last 8 bytes advanced by the message's
index; its associated data is the whole header (magic, version, key id, nonce, length, context,
message size), its index and whether it is the last -- so messages cannot be reordered, dropped,
repeated or cut off without failing authentication. Everything else is `teefl.security.sealed`'s.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teefl.security.sealformat import (
    _CTX_LEN,
    _HEADER,
    MAGIC,
    STREAM_VERSION,
    TAG_SIZE,
    TamperedError,
    TruncatedError,
    key_id,
)

#: plaintext bytes per AES-GCM message
STREAM_CHUNK = 64 << 20
_CHUNK_SIZE = struct.Struct(">I")


def _chunk_nonce(nonce: bytes, index: int) -> bytes:
    """Message ``index``'s nonce: the file's random nonce with its last 8 bytes advanced."""
    counter = (int.from_bytes(nonce[4:], "big") + index) % 2**64
    return nonce[:4] + counter.to_bytes(8, "big")


def _chunk_aad(header: bytes, index: int, last: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


def seal_stream(view: memoryview, key: bytes, nonce: bytes, ctx: bytes) -> bytearray:
    """Format version 3 (see `STREAM_VERSION`): written into one buffer, chunk by chunk."""
    chunk, n = STREAM_CHUNK, len(view)
    count = -(-n // chunk)
    header = _HEADER.pack(MAGIC, STREAM_VERSION, key_id(key), nonce, n + count * TAG_SIZE)
    header += _CTX_LEN.pack(len(ctx)) + ctx + _CHUNK_SIZE.pack(chunk)
    out = bytearray(len(header) + n + count * TAG_SIZE)
    out[: len(header)] = header
    aead, pos = AESGCM(key), len(header)
    for i in range(count):
        piece = view[i * chunk : (i + 1) * chunk]
        sealed = aead.encrypt(_chunk_nonce(nonce, i), piece, _chunk_aad(header, i, i == count - 1))
        out[pos : pos + len(sealed)] = sealed
        pos += len(sealed)
    return out


def open_stream(blob: Any, key: bytes, nonce: bytes, end: int, length: int) -> bytearray:
    """The plaintext of a version-3 body (``blob[end:]`` after the chunk size)."""
    if len(blob) < end + _CHUNK_SIZE.size:
        raise TruncatedError("sealed file truncated inside its header")
    (chunk,) = _CHUNK_SIZE.unpack_from(blob, end)
    end += _CHUNK_SIZE.size
    header = bytes(blob[:end])
    body = memoryview(blob)[end:]
    if len(body) < length:
        raise TruncatedError(f"sealed file truncated: {len(body)} of {length} bytes after header")
    count = -(-length // (chunk + TAG_SIZE)) if chunk else 0
    plain_len = length - count * TAG_SIZE
    if len(body) > length or not count or plain_len <= (count - 1) * chunk:
        raise TamperedError(
            f"sealed file modified: {len(body)} bytes after header, header says {length} in "
            f"messages of {chunk}"
        )
    out = bytearray(plain_len)
    aead = AESGCM(key)
    for i in range(count):
        lo = i * (chunk + TAG_SIZE)
        piece = body[lo : min(len(body), lo + chunk + TAG_SIZE)]
        try:
            plain = aead.decrypt(
                _chunk_nonce(nonce, i), piece, _chunk_aad(header, i, i == count - 1)
            )
        except InvalidTag as exc:
            raise TamperedError(
                "sealed file failed authentication: it was modified after sealing"
            ) from exc
        out[i * chunk : i * chunk + len(plain)] = plain
    return out
