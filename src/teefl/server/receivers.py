"""Where an update's bytes go while they arrive, and how it is stored before the acknowledgement.

Six ways, one class each, chosen in ONE place (`choose`):

- `StagedReceiver`: into a shared-memory slot (staging.py); committed there, moved to the run
  directory after the ACK with the deferred add;
- `FileReceiver`: into a pooled buffer, each piece written to the update's file as it arrives;
  committed by writing its metadata;
- `SealedReceiver`: into a pooled buffer, sealed and written once complete (a sealed file holds
  ciphertext, so nothing can be written before the last byte);
- `ZstdReceiver`: the compressed frame in memory, decompressed, then written;
- `MemoryReceiver`: assembled in memory (gRPC uploads), then written;
- `MappedReceiver` (``federation.memory: flat``, either data plane): through a small window
  into the update's own file, then mapped to be checked and summed (store/paged.py).

Every receiver stores the update before the acknowledgement: a crash after the ACK loses nothing.
"""

from __future__ import annotations

from typing import Any

from teefl.store.files import BufferPool
from teefl.store.paged import MappedUpdateFile
from teefl.store.rounds import RoundStore
from teefl.store.staging import StagingArea
from teefl.store.updates import StagedUpdate


class MemoryReceiver:
    """The assembler allocates the payload; stored whole once checked."""

    buffer: Any = None  # what the assembler receives into (None: it allocates)
    window: Any = None  # or the window it passes through into ``file_sink`` (then no buffer)
    window_slot = 0  # no piece crosses a multiple of it (0: the window's end)
    file_sink: Any = None  # called with each received piece (``(view, offset)``), or None
    zstd = False

    def commit(
        self,
        store: RoundStore,
        rnd: int,
        name: str,
        payload: Any,
        meta: dict[str, Any],
        digests: dict[str, Any],
        verified: bool,
    ) -> StagedUpdate | None:
        """Store the checked update; returns what is still to be settled after the ACK."""
        store.save_update(rnd, name, payload, meta, digests, verified)
        return None

    def abort(self) -> None:
        """Refused or broken off before its commit: nothing of it stays."""

    def release(self) -> None:
        """Summed or refused: the receive memory goes back (runs last, in every case)."""


class ZstdReceiver(MemoryReceiver):
    """The zstd frame in memory; the payload decompressed into a buffer of its own, stored."""

    zstd = True


class SealedReceiver(MemoryReceiver):
    """A pooled buffer; sealed and stored once complete (no plain bytes on disk)."""

    def __init__(self, pool: BufferPool, buffer: bytearray) -> None:
        self.pool, self.buffer = pool, buffer

    def release(self) -> None:
        self.pool.give(self.buffer)


class FileReceiver(SealedReceiver):
    """A pooled buffer whose pieces go to the update's file as they arrive (`UpdateFile`)."""

    def __init__(self, pool: BufferPool, buffer: bytearray, target: Any) -> None:
        super().__init__(pool, buffer)
        self.target = target
        self.file_sink = target.write

    def commit(self, store, rnd, name, payload, meta, digests, verified) -> None:  # type: ignore[override]
        self.target.commit(meta, digests, verified)
        self.target = None  # committed: its file is the stored update now
        return None

    def abort(self) -> None:
        if self.target is not None:  # gone before the uploader hears of the refusal
            self.target.abort()
            self.target = None


class StagedReceiver(MemoryReceiver):
    """A shared-memory slot: committed there; moved into the run directory after the ACK."""

    def __init__(self, staging: StagingArea, slot: Any) -> None:
        self.staging, self.slot = staging, slot
        self.buffer = slot.mem

    def commit(self, store, rnd, name, payload, meta, digests, verified) -> StagedUpdate:  # type: ignore[override]
        return store.commit_staged(rnd, name, self.slot, meta, digests, verified)

    def release(self) -> None:
        self.staging.give(self.slot)


class MappedReceiver(MemoryReceiver):
    """Through a small window into the update's own file, then mapped (`MappedUpdateFile`):
    committed by renaming it into place; the map stays with the update (its tensors are views
    of it) until its round is summed."""

    def __init__(self, target: MappedUpdateFile) -> None:
        self.target = target
        self.window, self.window_slot = target.window, target.SLOT
        self.file_sink = target.write

    def payload(self) -> Any:
        return self.target.payload()

    def commit(self, store, rnd, name, payload, meta, digests, verified) -> None:  # type: ignore[override]
        self.target.commit(meta, digests, verified)
        return None

    def abort(self) -> None:
        self.target.abort()


def choose(
    store: RoundStore,
    rnd: int,
    name: str,
    size: int,
    zstd: bool,
    staging: StagingArea | None,
    pool: BufferPool | None,
    flat: bool = False,
) -> MemoryReceiver:
    """The receiver of one update: THE place the store-before-ack path is decided.

    ``flat`` (``federation.memory: flat``): into its mapped file, over either data plane,
    unless sealed (ciphertext cannot be received into) or compressed (the frame is decompressed
    in memory). Else ``pool`` None: a gRPC upload (assembled in memory). Else the data plane: a
    zstd frame in memory; a shared-memory slot where staging is on and one is free; else a
    pooled buffer, written to its file as it arrives unless sealed (or empty).
    """
    if flat and not zstd and size:
        target = store.open_mapped_update(rnd, name, size)
        if target is not None:
            return MappedReceiver(target)
    if pool is None:
        return MemoryReceiver()
    if zstd:
        return ZstdReceiver()
    if staging is not None and size:
        slot = staging.take(size)
        if slot is not None:
            return StagedReceiver(staging, slot)
    buffer = pool.take(size)
    target = store.open_update(rnd, name, buffer)
    if target is None:  # sealed (ciphertext), or an empty payload
        return SealedReceiver(pool, buffer)
    return FileReceiver(pool, buffer, target)
