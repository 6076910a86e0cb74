"""The round's published model: its payload, digests, zstd frame, gRPC chunks and spare buffers.

Why serialized once per round: every download streams the same bytes, so the model is encoded,
hashed and compressed once when the round opens, never per collaborator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from teefl.wire import codec, compression, teefl_pb2


class Publisher:
    """Holds what the open round's downloads send. Read under the round lock (`rounds.Rounds`):
    `publish` replaces every field at once while that lock is held."""

    def __init__(self, check: str, network: Any, flat: bool = False) -> None:
        self.check = check  # the plan's payload check: "sha256", "crc32c" or "none"
        self.chunk_size = network.chunk_size
        self.compression, self.level = network.compression, network.compression_level
        #: ``federation.memory: flat``: one spare payload, and gRPC chunks made per download
        #: instead of kept (each would be one more model size held for the round)
        self.flat = flat
        self.spares = codec.Spares(keep=1 if flat else 2)  # earlier payloads, reused when free
        self.payload: codec.Buffer = b""
        self.digest = b""
        self.crc = 0
        self.update_limit = 0
        self.compressed: tuple[bytes, bytes, int] | None = None  # (zstd frame, SHA-256, CRC32C)
        self._wire: list[bytes] | None = None

    def publish(
        self, state: dict[str, torch.Tensor], payload: codec.Buffer | None = None
    ) -> codec.Buffer:
        """Serialize the global model once per round; returns the previous payload.

        ``payload``: the global model's tensors already live in it (the round close). The data
        chunks for gRPC downloads are serialized once per round, on first use, and shared by
        every download (see `wire_chunks`).
        """
        previous = self.payload
        self.payload = codec.encode_state(state) if payload is None else payload
        # the SHA-256 only where a collaborator checks it; the checkpoint's own is then computed
        # by the background writer, off the critical path
        self.digest = codec.sha256(self.payload) if self.check == "sha256" else b""
        self.crc = codec.crc32c(self.payload)
        self.update_limit = len(self.payload) + (64 << 10)
        self._wire = None  # made by the round's first gRPC download
        self.compressed = None
        if self.compression == "zstd":  # compressed once per round, sent to everyone
            frame = compression.compress(self.payload, self.level)
            sha = codec.sha256(frame) if self.check == "sha256" else b""
            self.compressed = (frame, sha, codec.crc32c(frame))
        return previous

    def retire(self, previous: codec.Buffer) -> None:
        """Keep an earlier round's payload as a spare (reused once nothing refers to it)."""
        if len(previous):
            self.spares.give(previous)

    def spare(self, layout: codec.Layout, wait: Callable[[], bool] | None = None) -> codec.Buffer:
        """A payload buffer of ``layout`` for the next round's mean (see `codec.Spares`).

        Under flat memory, where an earlier round's payload is still being checkpointed (the
        checkpoint gives way to transfers, so on short rounds it falls behind), the close waits
        for it -- ``wait()``: one checkpoint written, False where none is queued -- instead of
        making a third model: the aggregator's memory stays its base + 1 model size."""
        while True:
            buf = self.spares.free(layout)
            if buf is not None:
                return buf
            if not self.flat or wait is None or not wait():
                return layout.allocate()

    @property
    def wire_chunks(self) -> Iterable[bytes]:
        """The payload as serialized gRPC chunk messages, made once per round on first use:
        with the data plane nobody downloads over gRPC, and this would be one more model copy.
        Under ``flat`` memory they are made as each download sends them, never kept."""
        if self.flat:
            return self._chunks(self.payload)
        if self._wire is None:
            self._wire = list(self._chunks(self.payload))
        return self._wire

    def _chunks(self, payload: codec.Buffer) -> Iterator[bytes]:
        size = self.chunk_size
        for i, piece in enumerate(codec.iter_chunks(payload, size)):
            yield teefl_pb2.Chunk(data=bytes(piece), offset=i * size).SerializeToString()
