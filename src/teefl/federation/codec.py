"""Tensors <-> one safetensors payload <-> a stream of chunks.

Why safetensors: it is a plain header + raw little-endian buffers, so decoding never runs code
(unlike pickle) and the receiver can check names, shapes and dtypes before using anything. Why one
payload per model instead of one message per tensor: per-message cost in gRPC dominates for models
with hundreds of small tensors (MobileNetV3-Small has 244), which is what makes OpenFL's
communication time scale with layer count rather than bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from teefl.errors import TeeflError

FORMAT = "safetensors"


class PayloadError(TeeflError):
    """A payload that is malformed, of the wrong size, or fails its checksum."""


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a state dict (moved to CPU, made contiguous) into one safetensors payload."""
    flat = {}
    for name, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        flat[name] = t.contiguous()
    return st_save(flat)


def decode_state(payload: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Parse a safetensors payload; any malformation becomes a `PayloadError`."""
    try:
        return st_load(bytes(payload))
    except Exception as exc:  # safetensors raises its own SafetensorError / ValueError kinds
        raise PayloadError(f"malformed safetensors payload: {exc}") from None


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def iter_chunks(payload: bytes | memoryview, chunk_size: int) -> Iterator[memoryview]:
    """Slices of the payload without copying it; the transport copies each slice once."""
    view = memoryview(payload)
    for offset in range(0, len(view), chunk_size):
        yield view[offset : offset + chunk_size]


class Assembler:
    """Receives chunks into a buffer allocated once from the announced size.

    Why preallocate: a growing bytes object copies the whole payload on every append; and a
    declared size lets the receiver refuse an oversized stream before buffering it.
    """

    def __init__(self, total_size: int, expected_sha256: bytes, limit: int) -> None:
        if total_size > limit:
            raise PayloadError(f"announced payload of {total_size} bytes exceeds limit {limit}")
        if len(expected_sha256) != 32:
            raise PayloadError("header carries no valid SHA-256")
        self.total = total_size
        self.expected = expected_sha256
        self.buf = bytearray(total_size)
        self.filled = 0

    def add(self, data: bytes) -> None:
        end = self.filled + len(data)
        if end > self.total:
            raise PayloadError(f"stream carries more than the announced {self.total} bytes")
        self.buf[self.filled : end] = data
        self.filled = end

    def finish(self) -> bytearray:
        if self.filled != self.total:
            raise PayloadError(
                f"stream ended after {self.filled} of {self.total} announced bytes (truncated)"
            )
        if sha256(self.buf) != self.expected:
            raise PayloadError("payload SHA-256 does not match its header (corrupted in transit)")
        return self.buf
