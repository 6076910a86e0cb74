"""Optional zstd compression of a payload on the wire (``network.compression``).

Why checked before allocation: a small hostile frame must not make the receiver allocate a
large buffer (a "zip bomb").
"""

from __future__ import annotations

from typing import Any

from teefl.wire.codec import PayloadError


def encoding_of(compression: str) -> str:
    """The `Header.encoding` that ``network.compression`` sends: "" = the payload itself."""
    return "" if compression == "none" else compression


def compress(payload: Any, level: int = 1) -> bytes:
    """The payload as one zstd frame that records its size and a checksum of its content
    (``network.compression: zstd``): the wire's CRC32C or TLS covers the frame, the frame's own
    checksum what comes out of it."""
    import zstandard

    zc = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    return zc.compress(payload)


def decompress(data: Any, raw_size: int, limit: int) -> bytes:
    """The payload of a zstd frame announced to hold ``raw_size`` bytes.

    Checked before anything is allocated: the announced size within ``limit`` and equal to the
    size the frame itself records, so a small hostile frame cannot make us allocate more
    (a "zip bomb"); one frame and nothing after it.
    """
    import zstandard

    if raw_size > limit:
        raise PayloadError(f"announced payload of {raw_size} bytes exceeds limit {limit}")
    try:
        recorded = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"malformed zstd payload: {exc}") from None
    if recorded < 0:
        raise PayloadError("zstd frame does not record its size")
    if recorded != raw_size:
        raise PayloadError(f"zstd frame records {recorded} bytes, the header announced {raw_size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=raw_size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise PayloadError(f"malformed zstd payload: {exc}") from None
    if len(out) != raw_size:
        raise PayloadError(f"zstd payload holds {len(out)} bytes, announced {raw_size}")
    return out
