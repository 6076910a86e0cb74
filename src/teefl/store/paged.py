"""Updates that live in their files, not in the aggregator's memory (``federation.memory: flat``).

Why: to aggregate a model of several GB, the aggregator cannot hold a copy of every update it
receives (docs/large-models.md). An update is received straight into its file through a shared
memory map, and the pages behind the receive are given back as it goes (`MappedPayload.release`):
the bytes sit in the file and the page cache, which the kernel may drop once written back, never
in the process's resident memory. The round's mean is summed from the same maps window by window
(`teefl.strategy.windowed`), giving each window's pages back once summed.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from teefl.runfiles import FILE_MODE
from teefl.store.atomic import pwrite_all
from teefl.store.files import digest_meta, write_meta

#: bytes received or summed before the pages behind them are given back
RELEASE_STEP = 64 << 20
PAGE = mmap.PAGESIZE


class MappedPayload(mmap.mmap):
    """A file mapped shared, whose resident pages can be given back range by range."""

    fd: int = -1

    @classmethod
    def of(cls, fd: int, size: int, writable: bool) -> MappedPayload:
        """Map ``size`` bytes of the open file ``fd`` (kept open for `release`'s advice).
        Not ``writable``: a private map, never written (tensor views want a writable buffer)."""
        flags = mmap.MAP_SHARED if writable else mmap.MAP_PRIVATE
        mem = cls(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mem.fd = fd
        # the descriptor goes with the map, however it goes (tensor views may outlive its user)
        weakref.finalize(mem, os.close, fd)
        return mem

    def release(self, start: int, end: int) -> None:
        """Give back the pages wholly inside ``[start, end)``: unmapped from this process (a
        dirty page stays dirty in the page cache: nothing written is lost) and, once written
        back, dropped from the cache too (the kernel starts that writeback here)."""
        lo = -(-start // PAGE) * PAGE
        hi = min(end, len(self)) // PAGE * PAGE
        if hi <= lo:
            return
        self.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def digests(self, kind: str) -> Any:
        """The map's ``"sha256"`` (bytes) or ``"crc32c"`` (int), its pages given back as they
        are read."""
        h, crc = hashlib.sha256(), 0
        for start in range(0, len(self), RELEASE_STEP):
            end = min(len(self), start + RELEASE_STEP)
            with memoryview(self) as view:
                if kind == "sha256":
                    h.update(view[start:end])
                else:
                    crc = _crc32c.crc32c(view[start:end], crc)
            self.release(start, end)
        return h.digest() if kind == "sha256" else crc


def map_file(path: Path) -> MappedPayload | None:
    """A stored update's file, mapped read-only (None: empty, nothing to map)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if not size:
            os.close(fd)
            return None
        return MappedPayload.of(fd, size, writable=False)
    except BaseException:
        os.close(fd)
        raise


class MappedUpdateFile:
    """An update's file, received into through a shared map (`MappedPayload`).

    The temporary file is made at its full size (sparse until written), mapped, and received
    into; `write` (the receive's sink) gives back the pages of every `RELEASE_STEP` received
    behind the piece it is called with. `commit` renames the file into place and writes its
    metadata last -- the same crash guarantee as `files.UpdateFile`: the bytes are in the page
    cache, which outlives the aggregator process.
    """

    def __init__(self, final: Path, meta_path: Path, size: int) -> None:
        self.final, self.meta_path, self.size = final, meta_path, size
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(
            self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
        )
        try:
            os.ftruncate(fd, size)
            self.mem = MappedPayload.of(fd, size, writable=True)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        self.released = 0  # the prefix whose pages are given back
        self.placed = False

    def write(self, view: memoryview, offset: int) -> None:
        """A piece is in the map (at ``offset``): give back what lies a step behind it (the
        piece itself may still be read by the checks after this sink)."""
        if offset - self.released >= RELEASE_STEP:
            self.mem.release(self.released, offset)
            self.released = offset // PAGE * PAGE

    def commit(self, meta: dict[str, Any], digests: dict[str, Any], verified: bool) -> None:
        """Complete and checked: the file into place, then its metadata (the commit point)."""
        if not digest_meta(digests):  # nothing claimed (an old sender over TLS): compute one
            digests, verified = {"sha256": self.mem.digests("sha256")}, True
        os.replace(self.tmp, self.final)
        self.placed = True
        write_meta(self.meta_path, meta, digests, verified)

    def abort(self) -> None:
        """Nothing of a refused or broken upload stays on disk (the map goes with its last
        reference: a tensor view may still hold it)."""
        if not self.placed:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()


def spill(payload: Any, directory: Path) -> MappedPayload:
    """A copy of ``payload`` that lives in an unnamed file in ``directory`` (``O_TMPFILE``:
    gone with its last reference or a crash, never left behind), mapped read-only: kept without
    being held in memory -- a collaborator's kept update under ``federation.memory: flat``."""
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(payload).cast("B")
        for start in range(0, len(view), RELEASE_STEP):
            pwrite_all(fd, view[start : start + RELEASE_STEP], start)
        # written back and dropped from the page cache in the background
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, len(view), os.POSIX_FADV_DONTNEED)
        return MappedPayload.of(fd, len(view), writable=False)
    except BaseException:
        os.close(fd)
        raise
