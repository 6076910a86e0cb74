"""Receive buffers and update files written piece by piece while an update arrives."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import threading
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from teefl.runfiles import FILE_MODE
from teefl.store.atomic import pwrite_all, write_atomic


class BufferPool:
    """Receive buffers for updates, kept from round to round (at most ``keep`` of them).

    Why: a fresh buffer's first write faults in every page, costing about as much as receiving
    into it (docs/decisions/006-kept-buffers.md); a buffer written before does not. The aggregator
    holds at most ``max_inflight_updates`` updates at once, so that many buffers suffice and
    memory does not grow with the number of collaborators.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[bytearray] = []
        self.lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self.lock:
            for i, buf in enumerate(self.free):
                if len(buf) == size:
                    return self.free.pop(i)
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """Return a buffer; the caller guarantees nothing reads or writes it any more."""
        with self.lock:
            if len(self.free) >= self.keep:
                self.free.pop(0)  # another size (the model changed): the oldest goes
            self.free.append(buf)


def open_reusing(tmp: Path, reuse: Path | None, access: int) -> int:
    """Open ``tmp`` to be written, taking the file ``reuse`` (a spare of a closed round) as it
    where there is one -- its blocks are allocated, so overwriting them costs about half of
    writing a new file (and into a new sparse file with ``O_DIRECT``, ext4 here: 2.5 against 4.2
    GB/s) -- else a new empty file."""
    flags = access | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if reuse is None:
            raise FileNotFoundError
        os.replace(reuse, tmp)
    except FileNotFoundError:
        flags |= os.O_TRUNC
    return os.open(tmp, flags, FILE_MODE)


class UpdateFile:
    """An update's file, written piece by piece while the update is being received.

    Each received piece (`assembly.Assembler`'s ``sink``) is written to the file at once, while it
    is still in the CPU cache; `commit` then only renames the file into place and writes the
    metadata -- the same crash guarantee as `save_update` (survives the aggregator process, not
    a power loss). Not used for sealed storage, whose file holds ciphertext.

    Why not a shared memory map of the file: the first write to every page of a mapping faults,
    and again after each writeback (docs/decisions/006-kept-buffers.md).

    ``reuse``: a file of an earlier round, consumed and dropped since (see
    `RoundStore.drop_updates`), to overwrite instead of making a new one: its blocks are
    allocated and its pages cached, so overwriting costs about half of writing a new file.
    """

    def __init__(
        self,
        final: Path,
        meta_path: Path,
        buffer: bytearray,
        reuse: Path | None = None,
    ) -> None:
        self.final, self.meta_path, self.buffer = final, meta_path, buffer
        self.size = len(buffer)
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        self.fd = open_reusing(self.tmp, reuse, os.O_WRONLY)
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            os.close(self.fd)
            raise
        self.written = 0  # bytes of the buffer's prefix already in the file

    def write(self, view: memoryview, offset: int) -> None:
        """Write one received piece (pieces arrive in order; the buffer holds them too)."""
        if offset != self.written:
            raise ValueError(f"update piece at {offset}, expected {self.written}")
        pwrite_all(self.fd, view, offset)
        self.written += len(view)

    def commit(self, meta: dict[str, Any], digests: dict[str, Any], verified: bool) -> None:
        """The payload is complete and checked: put it in place, then its metadata (last);
        ``digests`` and ``verified`` as in `RoundStore.save_update`."""
        self.place()
        if not digest_meta(digests):  # nothing claimed (an old sender over TLS): compute one
            digests, verified = {"sha256": hashlib.sha256(self.buffer).digest()}, True
        write_meta(self.meta_path, meta, digests, verified)

    def place(self) -> None:
        """Write what is not written yet and rename the file into place (no metadata)."""
        if self.written < self.size:  # filled without the sink: write the rest now
            self.write(memoryview(self.buffer)[self.written :], self.written)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        """Nothing of a refused or broken upload stays on disk."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def meta_doc(meta: dict[str, Any], digests: dict[str, Any], verified: bool) -> dict[str, Any]:
    """An update's metadata: what it claims, its digests, whether they were checked on arrival."""
    return {**meta, **digest_meta(digests), "verified": verified}


def write_meta(path: Path, meta: dict[str, Any], digests: dict[str, Any], verified: bool) -> None:
    write_atomic(path, json.dumps(meta_doc(meta, digests, verified)).encode(), fsync=False)


def digest_meta(digests: dict[str, Any]) -> dict[str, Any]:
    """``{"sha256": bytes, "crc32c": int}`` (either may be missing) as stored in JSON."""
    out: dict[str, Any] = {}
    if digests.get("sha256"):
        out["sha256"] = digests["sha256"].hex()
    if digests.get("crc32c") is not None:
        out["crc32c"] = int(digests["crc32c"])
    return out


def matches(payload: Any, meta: dict[str, Any]) -> bool:
    """Whether ``payload`` has the digest ``meta`` records (False where it records none)."""
    sha, crc = meta.get("sha256"), meta.get("crc32c")
    paged = getattr(payload, "digests", None)  # a mapped file: its pages given back as read
    if isinstance(sha, str):
        digest = paged("sha256") if paged else hashlib.sha256(payload).digest()
        return hmac.compare_digest(digest.hex(), sha)
    if isinstance(crc, int) and not isinstance(crc, bool):
        return (paged("crc32c") if paged else _crc32c.crc32c(payload)) == crc
    return False
