"""One process at a time per run directory: an fcntl lock on a file in it, held for as long as
the process works on the run.

Why: two ``teefl run`` (or two ``teefl aggregator``) on one run directory were both accepted;
they overwrote each other's plan, port file and run.json, and both hung waiting for
collaborators that had joined the other one. The second now stops at once with one line that
names the holder's pid.

Two lock files, because ``teefl run`` starts an aggregator on its own run directory: the
launcher holds ``run.lock`` (a second ``teefl run``), every aggregator holds ``aggregator.lock``
(a second aggregator, whether started by hand or by another launcher). POSIX record locks
(``fcntl.lockf``) are per process: the kernel drops them when the holder dies, however it dies,
so a crashed run never leaves a stale lock behind. A process must not open and close the lock
file a second time while it holds the lock (closing any descriptor of the file drops a POSIX
lock), hence the per-process registry below.

Under Gramine, an aggregator's lock lives inside the enclave's emulated file system and does not
reach the host; the launcher (``teefl run``, always native) still holds ``run.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from teefl.errors import TeeflError

log = logging.getLogger("teefl.runlock")

RUN_LOCK = "run.lock"
AGGREGATOR_LOCK = "aggregator.lock"

_held: dict[Path, list[int]] = {}  # lock file -> [fd, how many holders in this process]
_guard = threading.Lock()


def _holder(fd: int) -> str:
    """What the holder wrote into the file: ``pid <n> (<who>)``, or a plain description."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if text and text[0].isdigit():
        who = " ".join(text[1:])
        return f"pid {text[0]}" + (f", {who}" if who else "")
    return "another process"


def acquire(run_dir: Path, name: str, who: str) -> Path | None:
    """Lock ``run_dir/name`` for this process (re-entrant); a `TeeflError` if another holds it.

    Returns the lock file, or None where the file system cannot lock (then the run goes on
    unlocked, said once in the log: refusing to run on such a file system would be worse).
    """
    path = (Path(run_dir) / name).absolute()
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise TeeflError(
                    f"run directory {run_dir} is in use by {holder} (lock {path}); wait for it "
                    "to end or stop it, or use another run directory / --run-id"
                ) from None
            log.warning("cannot lock %s (%s): going on without the lock", path, exc.strerror)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {who}\n".encode(), 0)
        _held[path] = [fd, 1]
        return path


def release(path: Path | None) -> None:
    """Drop one hold; the last one unlocks (the file stays: removing it would race a waiter)."""
    if path is None:
        return
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            os.close(entry[0])  # closing the descriptor drops the lock


@contextlib.contextmanager
def hold(run_dir: Path, name: str, who: str) -> Iterator[Path | None]:
    """`acquire` for the duration of a ``with`` block."""
    path = acquire(run_dir, name, who)
    try:
        yield path
    finally:
        release(path)
