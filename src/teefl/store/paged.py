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
from concurrent import futures
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from teefl.runfiles import FILE_MODE
from teefl.store.atomic import DIRECT_ALIGN, pwrite_all, write_direct
from teefl.store.files import digest_meta, open_reusing, write_meta

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

    def read_ahead(self, start: int, end: int) -> None:
        """Start reading ``[start, end)`` from the file into the page cache, without waiting:
        the pages are there when they are touched."""
        lo = start // PAGE * PAGE
        hi = min(end, len(self))
        if hi > lo:
            self.madvise(mmap.MADV_WILLNEED, lo, hi - lo)

    def digests(self, kind: str) -> Any:
        """The map's ``"sha256"`` (bytes) or ``"crc32c"`` (int), its pages given back as they
        are read."""
        h, crc = hashlib.sha256(), 0
        for start in range(0, len(self), RELEASE_STEP):
            end = min(len(self), start + RELEASE_STEP)
            self.read_ahead(start, end + RELEASE_STEP)
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


#: the writers of every update's slots: two, as two ``O_DIRECT`` writes in flight are what this
#: disk needs to reach its speed (one 4 MiB write at a time: 1.45 GB/s here, two: 2.1 GB/s, more
#: gain nothing); made at the first flat upload, kept for the process's life
_WRITERS: futures.ThreadPoolExecutor | None = None
_WRITERS_LOCK = threading.Lock()


def _writers() -> futures.ThreadPoolExecutor:
    global _WRITERS
    with _WRITERS_LOCK:
        if _WRITERS is None:
            _WRITERS = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="update-disk")
        return _WRITERS


class MappedUpdateFile:
    """An update's file, written as the update passes through its receive `window`
    (`assembly.Assembler`'s ``window``, cut at ``window_slot`` = `SLOT`), then mapped
    (`payload`) to be checked and summed.

    The temporary file is made at its full size (sparse until written), or is a ``reuse``d
    file of a closed round (`RoundStore.drop_updates`) cut to that size. The window is a ring of
    `SLOTS` slots: `write` (the receive's sink) is told of each piece once it is in the window;
    each full slot is handed to a writer thread, which writes it at its place in one
    ``O_DIRECT`` write while the next slots fill -- the disk reads the slot itself, nothing goes
    through the page cache, whose dirty pages the kernel would otherwise make the receive wait
    for (docs/decisions/009-flat-memory.md), and the receive never waits for the disk unless
    the disk is the slower of the two. Where the file system refuses ``O_DIRECT`` (tmpfs), and
    for the last partial page, the ordinary way. The last slot's write ends `write`: once it
    returned every byte is on disk or in the page cache, which outlives the aggregator process.
    `commit` renames the file into place and writes its metadata last.
    """

    #: bytes per slot (one write), and slots in the window
    SLOT = 4 << 20
    SLOTS = 4

    def __init__(self, final: Path, meta_path: Path, size: int, reuse: Path | None = None) -> None:
        self.final, self.meta_path, self.size = final, meta_path, size
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        self.fd = open_reusing(self.tmp, reuse, os.O_RDWR)
        self.direct = self._direct_fd = -1  # the O_DIRECT descriptor: to use, to close
        self.placed = False
        #: the write of each slot still in flight (None: the slot is free)
        self.pending: list[futures.Future[None] | None] = [None] * self.SLOTS
        try:
            os.ftruncate(self.fd, size)
            with contextlib.suppress(OSError, AttributeError):
                self._direct_fd = os.open(self.tmp, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
                self.direct = self._direct_fd
        except BaseException:
            self.abort()
            raise
        # page-aligned, as O_DIRECT wants it
        self.window = mmap.mmap(-1, self.SLOT * self.SLOTS)
        self.written = 0  # bytes received so far
        self.flushed = 0  # bytes handed to the writers (a multiple of SLOT until the end)
        self._mem: MappedPayload | None = None

    def write(self, view: memoryview, offset: int) -> None:
        """A piece is in the window (pieces arrive in order and never cross a slot's end)."""
        if offset != self.written:
            raise ValueError(f"update piece at {offset}, expected {self.written}")
        self.written += len(view)
        if self.written - self.flushed == self.SLOT or self.written == self.size:
            slot = self.flushed // self.SLOT % self.SLOTS
            self.pending[slot] = _writers().submit(
                self._write_slot, slot, self.flushed, self.written - self.flushed
            )
            self.flushed = self.written
            if self.written == self.size:
                self._drain()
            else:  # the receive writes into the next slot as soon as this returns
                self._wait(self.flushed // self.SLOT % self.SLOTS)

    def _wait(self, slot: int) -> None:
        job, self.pending[slot] = self.pending[slot], None
        if job is not None:
            job.result()  # a failed write fails the upload

    def _drain(self, quiet: bool = False) -> None:
        for slot in range(self.SLOTS):
            try:
                self._wait(slot)
            except Exception:
                if not quiet:
                    raise

    def _write_slot(self, slot: int, start: int, n: int) -> None:
        view = memoryview(self.window)[slot * self.SLOT : slot * self.SLOT + n]
        try:
            direct = self.direct
            aligned = n // DIRECT_ALIGN * DIRECT_ALIGN if direct >= 0 else 0
            try:
                if aligned:
                    pwrite_all(direct, view[:aligned], start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct, aligned = -1, 0  # the file system wants another alignment
            if aligned < n:
                pwrite_all(self.fd, view[aligned:], start + aligned)
        finally:
            view.release()

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
        self._drain(quiet=True)  # no write may outlive its descriptors
        for fd in (self.fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct = self._direct_fd = -1


def spill(payload: Any, directory: Path) -> MappedPayload:
    """A copy of ``payload`` that lives in an unnamed file in ``directory`` (``O_TMPFILE``:
    gone with its last reference or a crash, never left behind), mapped read-only: kept without
    being held in memory -- a collaborator's kept update under ``federation.memory: flat``."""
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(payload).cast("B")
        # page-aligned memory (the resident model's payload) goes to the disk with O_DIRECT:
        # through the page cache, its writeback ran at a third of that speed here and was
        # still going when the next round's transfers began (docs/decisions/009)
        done = write_direct(fd, view, None)
        for start in range(done, len(view), RELEASE_STEP):
            pwrite_all(fd, view[start : start + RELEASE_STEP], start)
        # what went through the page cache is written back and dropped in the background
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, done, len(view) - done, os.POSIX_FADV_DONTNEED)
        return MappedPayload.of(fd, len(view), writable=False)
    except BaseException:
        os.close(fd)
        raise
