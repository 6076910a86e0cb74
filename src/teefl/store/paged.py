"""Updates that live in their files, not in the aggregator's memory (``federation.memory: flat``).

Why: to aggregate a model of several GB, the aggregator cannot hold a copy of every update it
receives (docs/large-models.md). An update passes through a small receive window into its file
(`MappedUpdateFile`): the bytes sit in the file and the page cache, which the kernel may drop
once written back, never in the process's resident memory. It is then mapped to be checked and,
at the round's close, summed window by window (`teefl.strategy.windowed`); each window's pages
are given back once read (`MappedPayload.release_pages`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from teefl.runfiles import FILE_MODE
from teefl.store.atomic import DIRECT_ALIGN, pwrite_all
from teefl.store.files import digest_meta, write_meta

#: bytes received or summed before the pages behind them are given back
RELEASE_STEP = 64 << 20
PAGE = mmap.PAGESIZE


class MappedPayload(mmap.mmap):
    """A file mapped shared, whose resident pages can be given back range by range."""

    fd: int = -1

    @classmethod
    def of(cls, fd: int, size: int, writable: bool) -> MappedPayload:
        """Map ``size`` bytes of the open file ``fd`` (kept open for `release_pages`' advice).
        Not ``writable``: a private map, never written (tensor views want a writable buffer)."""
        flags = mmap.MAP_SHARED if writable else mmap.MAP_PRIVATE
        mem = cls(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mem.fd = fd
        # the descriptor goes with the map, however it goes (tensor views may outlive its user)
        weakref.finalize(mem, os.close, fd)
        return mem

    def release_pages(self, start: int, end: int) -> None:
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
            self.release_pages(start, end)
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


#: bytes of the window an update passes through on its way into its file (`MappedUpdateFile`)
WINDOW = 4 << 20


class MappedUpdateFile:
    """An update's file, written as the update passes through its receive `window`
    (`assembly.Assembler`'s ``window``), then mapped (`payload`) to be checked and summed.

    The temporary file is made at its full size (sparse until written). `write` (the receive's
    sink) is told of each piece once it is in the window; each time the window is full it is
    written at its place in one ``O_DIRECT`` write: the disk reads the window itself, nothing
    goes through the page cache -- whose dirty pages the kernel would otherwise make the receive
    wait for (a buffered write of two GPT-2 Large updates here ran at the disk's writeback
    speed, a third of ``O_DIRECT``'s; docs/decisions/009-flat-memory.md). Where the file system
    refuses ``O_DIRECT`` (tmpfs), and for the last partial page, the ordinary way. `commit`
    renames the file into place and writes its metadata last: once the last write returned the
    bytes are on disk or in the page cache, which outlives the aggregator process.
    """

    def __init__(self, final: Path, meta_path: Path, size: int) -> None:
        self.final, self.meta_path, self.size = final, meta_path, size
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        self.fd = os.open(
            self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
        )
        self.direct = -1
        self.placed = False
        try:
            os.ftruncate(self.fd, size)
            with contextlib.suppress(OSError, AttributeError):
                self.direct = os.open(self.tmp, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except BaseException:
            self.abort()
            raise
        self.window = mmap.mmap(-1, WINDOW)  # page-aligned, as O_DIRECT wants it
        self.written = 0  # bytes received so far (the window holds those past `flushed`)
        self.flushed = 0  # bytes written to the file (a multiple of WINDOW until the end)
        self._mem: MappedPayload | None = None

    def write(self, view: memoryview, offset: int) -> None:
        """A piece is in the window (pieces arrive in order and never cross its end)."""
        if offset != self.written:
            raise ValueError(f"update piece at {offset}, expected {self.written}")
        self.written += len(view)
        if self.written - self.flushed == WINDOW or self.written == self.size:
            self._flush()

    def _flush(self) -> None:
        start, n = self.flushed, self.written - self.flushed
        view = memoryview(self.window)[:n]
        aligned = n // DIRECT_ALIGN * DIRECT_ALIGN if self.direct >= 0 else 0
        try:
            if aligned:
                pwrite_all(self.direct, view[:aligned], start)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            os.close(self.direct)  # the file system wants another alignment: no more of it
            self.direct, aligned = -1, 0
        if aligned < n:
            pwrite_all(self.fd, view[aligned:], start + aligned)
        view.release()
        self.flushed = self.written

    def payload(self) -> MappedPayload:
        """The received file, mapped (its pages come from the page cache as they are read and
        are given back by whoever reads them: `checks.FlatUpdate`)."""
        if self._mem is None:
            self._mem = MappedPayload.of(os.dup(self.fd), self.size, writable=False)
        return self._mem

    def commit(self, meta: dict[str, Any], digests: dict[str, Any], verified: bool) -> None:
        """Complete and checked: the file into place, then its metadata (the commit point)."""
        if not digest_meta(digests):  # nothing claimed (an old sender over TLS): compute one
            digests, verified = {"sha256": self.payload().digests("sha256")}, True
        os.replace(self.tmp, self.final)
        self.placed = True
        self._close()
        write_meta(self.meta_path, meta, digests, verified)

    def abort(self) -> None:
        """Nothing of a refused or broken upload stays on disk (a map of it goes with its last
        reference)."""
        self._close()
        if not self.placed:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()

    def _close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct = -1


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
