"""A run's files are its owner's alone: directories 0700, files 0600.

Why: a run directory holds the global model, every checkpoint and (until their round's
checkpoint is durable) the collaborators' updates, which can leak training data; its logs, events
and metrics say who took part and how well each one's data trained. None of it is meant for the
other users of a shared host (an HPC login node, a lab server). The modes are set where each file
is created, not through the process's umask, so that they hold whoever starts the process and
whatever its umask is; a directory or file left by an older teefl is narrowed when it is opened
again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path | str) -> Path:
    """``mkdir -p`` whose last directory is 0700; an existing one of ours is narrowed to 0700
    (one of another user's, or on a read-only file system, is left as it is)."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if st.st_uid == os.getuid() and st.st_mode & 0o777 != DIR_MODE:
            os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path | str, flags: int) -> int:
    """``os.open`` of a file that is created 0600, or narrowed to 0600 if it exists (an older
    teefl's); ``O_NOFOLLOW``: a planted symbolic link is refused, never written through."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    with contextlib.suppress(OSError):  # another user's file: not ours to change
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    return fd


def write_private(path: Path | str, data: bytes | str) -> None:
    """Write a whole small file (text as UTF-8), mode 0600."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)


def append_private(path: Path | str) -> int:
    """A file descriptor appending to ``path`` (mode 0600) whose content ends with a newline:
    the torn last line a killed writer left is ended first, so the next line stays whole."""
    fd = open_private(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")
    except BaseException:
        os.close(fd)
        raise
    return fd
