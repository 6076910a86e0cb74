"""Files written whole or not at all: temp file, fsync, rename (and O_DIRECT for big ones)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teefl.rundir import METRICS, STATE  # noqa: F401 - the run directory's names, re-exported
from teefl.runfiles import FILE_MODE

#: temporary files of this module's writers (`write_atomic`, `UpdateFile`, RunDir's):
#: ``.<name>.tmp-<pid>`` or ``.<name>.tmp-<pid>-<thread>``
TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(?:-\d+)?$")

log = logging.getLogger("teefl.durable")


#: bytes per write() when a writer yields between slices (see `write_atomic`)
WRITE_SLICE = 4 << 20


def write_atomic(
    path: Path,
    data: Any,
    fsync: bool = True,
    pause: Callable[[], None] | None = None,
) -> None:
    """Temp file, (fsync), rename: a crash leaves either the old file or the new one, never half.

    ``data``: any bytes-like object. ``pause``: called before each `WRITE_SLICE` bytes, so a
    background writer can give way. A durable write (``fsync``) of page-aligned memory
    (`codec.PagePayload`) goes around the page cache, see `write_direct`.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    view = memoryview(data).cast("B")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        done = write_direct(fd, view, pause) if fsync else 0
        for start in range(done, len(view), WRITE_SLICE):
            if pause is not None:
                pause()
            pwrite_all(fd, view[start : start + WRITE_SLICE], start)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # a failed write leaves no half file behind either
        raise
    os.close(fd)
    os.replace(tmp, path)


#: alignment of memory, file offset and length that every Linux file system's O_DIRECT accepts
DIRECT_ALIGN = 4096


def write_direct(fd: int, view: memoryview, pause: Callable[[], None] | None) -> int:
    """Write the longest `DIRECT_ALIGN`-multiple prefix of ``view`` with ``O_DIRECT``; return
    how many bytes were written (0 where the memory is not page-aligned or the file system
    refuses ``O_DIRECT``: the caller writes the rest the ordinary way).

    Why: through the page cache the CPU copies the whole model, which comes out of the next
    round's transfers; with ``O_DIRECT`` the disk reads the model's memory itself, with the GIL
    released (docs/decisions/008-durable-writes.md).
    """
    n = len(view) // DIRECT_ALIGN * DIRECT_ALIGN
    if not n or view.readonly or not hasattr(os, "O_DIRECT"):
        return 0
    if ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN:
        return 0  # a bytearray's memory starts 16 bytes past a page here
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return 0  # e.g. tmpfs
    done = 0
    try:
        while done < n:
            if pause is not None:
                pause()
            end = min(done + WRITE_SLICE, n)
            pwrite_all(fd, view[done:end], done)
            done = end
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # the file system wants a coarser alignment: the rest goes through the page cache
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return done


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # never for a regular file; a loop that cannot end if it ever were
            raise OSError(errno.EIO, f"write of {len(view)} bytes at {offset} made no progress")
        view, offset = view[n:], offset + n
