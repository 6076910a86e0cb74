"""Receive buffers in shared memory that outlive the aggregator process: an update is
acknowledged without a disk write on the way.

Why: the aggregator may acknowledge an update only once a crash of its process can no longer
lose it. Writing each received piece to the update's file in the run directory made that so,
but cost a copy of every byte into the page cache on the receiving thread before the ack
(docs/decisions/008-durable-writes.md). A file in shared memory (tmpfs, ``/dev/shm``) is as durable
against a crash of the process as the page cache is -- the kernel keeps it -- and a mapping of
it *is* the receive buffer, so the update is stored the moment it has arrived. It is copied to
the run directory after the acknowledgement, with the FedAvg add, and the round closes only once
both are done.

A slot's file is named ``<pid>-<tag>-slot-<k>`` while it is free, and renamed (`Slot.link`)
to a name for its update while it holds an acknowledged update that is not yet in the run
directory; that name -- recorded in the update's metadata -- is what a restarted aggregator
reads (`updates.UpdateStore.load_updates`). Free slots of a process that died are removed by the
next aggregator that opens the same directory; a staged update stays until a restart on its
run directory reads it. (An unnamed ``O_TMPFILE`` per slot would vanish with the process by
itself, but Linux lets such a file be given a name only once, and a slot is reused every
round.) tmpfs pages are reserved up front (``posix_fallocate``), so a full ``/dev/shm``
refuses a slot instead of killing the process with SIGBUS on a page fault. Where any of this
is unavailable the aggregator writes updates to the run directory as they arrive, as before
(`files.UpdateFile`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from pathlib import Path

log = logging.getLogger("teefl.staging")

#: a slot's name while it holds no update (`StagingArea.next_free_name`), and the probe's
_FREE_NAME = re.compile(r"(\d+)-[0-9a-f]+-(?:slot-\d+|probe)")


class Slot:
    """One receive buffer: a file in the staging directory, mapped shared."""

    def __init__(self, area: StagingArea, size: int) -> None:
        # what it needs of its area, not the area itself: a free slot must not keep it alive
        self.directory, self.dir_fd, self.size = area.directory, area.dir_fd, size
        self.tag = area.tag
        #: its name while free (None once it lost its file: then it is never staged again)
        self.free_name: str | None = area.next_free_name()
        self.name: str | None = None  # its name while it holds an acknowledged update
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        self.fd = os.open(self.free_name, flags, 0o600, dir_fd=self.dir_fd)
        try:
            os.posix_fallocate(self.fd, 0, size)  # ENOSPC here, not SIGBUS later
            self.mem = mmap.mmap(self.fd, size)  # MAP_SHARED: the file's own pages
        except BaseException:
            os.close(self.fd)
            os.unlink(self.free_name, dir_fd=self.dir_fd)
            raise

    def name_for(self, rnd: int, collaborator: str) -> str:
        """The name it takes while it holds that update (unique to this process)."""
        return f"{self.tag}-round-{rnd:04d}-{collaborator}.safetensors"

    def _rename(self, old: str, new: str) -> None:
        os.rename(old, new, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def link(self, name: str) -> Path:
        """Name the file for its update (atomically): a restart finds it under that name."""
        if self.free_name is None:
            raise FileNotFoundError(f"staging slot lost its file in {self.directory}")
        try:
            self._rename(self.free_name, name)
        except FileNotFoundError:  # removed under us (another PID namespace's sweep?)
            self.free_name = None  # never staged again: `StagingArea.give` drops it
            raise
        self.name = name
        return self.directory / name

    def unlink(self) -> None:
        """Back to its free name (the update is in the run directory, or was refused)."""
        if self.name is not None:
            assert self.free_name is not None  # `link` named it from its free name
            try:
                self._rename(self.name, self.free_name)
            except FileNotFoundError:  # removed under us: unusable for staging from now on
                self.free_name = None
            self.name = None

    def close(self) -> None:
        """Unmap and close; a staged update's file stays (a restart reads it), a free one goes."""
        with contextlib.suppress(BufferError):  # a view still exported: freed with the process
            self.mem.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.name is None and self.free_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.free_name, dir_fd=self.dir_fd)


class UnsafeStagingDir(OSError):
    """The staging directory is not one only this user can use (said as a warning, not info)."""


def open_private_dir(directory: Path) -> int:
    """Open ``directory`` -- ours alone, mode 0700 -- creating it if absent; returns its fd.

    Why this way: the directory sits in a world-writable tmpfs where another local user can plant
    a symbolic link or a directory of their own under its name before us, and read or swap every
    update staged there. So the directory itself is never followed through a link (lstat, then
    ``O_NOFOLLOW``), the checks are made on the opened descriptor (``fstat``: what is checked is
    what is used, whatever is renamed meanwhile), and every later access goes through that
    descriptor. A directory we created gets mode 0700 whatever the umask; one that already
    existed with another mode is refused rather than changed (someone chose it).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    created = False
    try:
        os.mkdir(directory, 0o700)
        created = True
    except FileExistsError:
        pass
    if stat.S_ISLNK(os.lstat(directory).st_mode):
        raise UnsafeStagingDir(f"{directory} is a symbolic link")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise UnsafeStagingDir(f"{directory} belongs to another user (uid {st.st_uid})")
        mode = stat.S_IMODE(st.st_mode)
        if mode != 0o700:
            if not created:
                raise UnsafeStagingDir(
                    f"{directory} has mode {mode:04o}, not 0700 (fix: chmod 700 {directory})"
                )
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StagingArea:
    """Slots in one directory of a tmpfs, at most ``keep`` kept free from round to round (the
    aggregator receives at most ``max_inflight_updates`` updates at once).

    Why keep them: a slot's first use faults in and zeroes its pages (docs/decisions/006);
    a slot written before costs nothing more, as for the receive buffers it replaces.
    """

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory, self.keep = Path(directory), keep
        self.dir_fd = open_private_dir(self.directory)
        #: a prefix no other process uses for its names in the shared directory
        self.tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.free: list[Slot] = []
        self.lock = threading.Lock()
        self._count = 0
        self.refused = False  # a slot was refused for want of room (warned once)
        try:
            self._sweep()
            probe = Slot(self, mmap.PAGESIZE)  # a slot's whole life once, before relying on it
            try:
                probe.mem[:1] = b"\x01"
                probe.link(f"{self.tag}-probe")
                probe.unlink()
            finally:
                probe.close()
        except BaseException:
            os.close(self.dir_fd)
            raise
        # an aggregator dropped without `close` (tests, errors) still frees its slots
        self._finalizer = weakref.finalize(self, _release, self.free, self.dir_fd)

    def next_free_name(self) -> str:
        with self.lock:
            self._count += 1
            return f"{self.tag}-slot-{self._count}"

    def _sweep(self) -> None:
        """Remove the free slots (and a probe) of aggregators that died; their staged updates
        stay, whatever their collaborator's name (``a-slot-1`` is a valid one): only the exact
        free-slot and probe names are removed."""
        for entry in os.listdir(self.dir_fd):
            m = _FREE_NAME.fullmatch(entry)
            if m is None:
                continue
            pid = m.group(1)
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=self.dir_fd)
            except PermissionError:  # alive, another user's (cannot be: the folder is ours)
                pass

    @classmethod
    def open(cls, directory: Path, keep: int) -> StagingArea | None:
        """The staging area, or None (said once in the log) where the directory cannot hold one:
        missing, not writable, no ``posix_fallocate`` there, another user's."""
        try:
            return cls(directory, keep)
        except OSError as exc:
            log.log(
                logging.WARNING if isinstance(exc, UnsafeStagingDir) else logging.INFO,
                "no update staging in %s (%s): updates are written to the run directory as they "
                "arrive",
                directory,
                exc,
            )
            return None

    def take(self, size: int) -> Slot | None:
        """A free slot of exactly ``size`` bytes, or None where the tmpfs has no room for one
        (the caller then receives the update the disk way)."""
        with self.lock:
            for i, slot in enumerate(self.free):
                if slot.size == size:
                    return self.free.pop(i)
        try:
            return Slot(self, size)
        except OSError as exc:
            # said once (a small /dev/shm, e.g. Docker's 64 MB, would say it every upload)
            level = logging.DEBUG if self.refused else logging.WARNING
            self.refused = True
            log.log(
                level,
                "cannot stage a %d-byte update in %s (%s): such updates are written to the run "
                "directory as they arrive",
                size,
                self.directory,
                exc,
            )
            return None

    def give(self, slot: Slot) -> None:
        """Return a slot nothing reads or writes any more. A slot still named for its update
        holds the only copy of an acknowledged update (its move to the run directory failed):
        it is left in place for a restart, never reused."""
        if slot.name is not None or slot.free_name is None:
            slot.close()
            return
        with self.lock:
            self.free.append(slot)
            while len(self.free) > self.keep:
                self.free.pop(0).close()  # another size (the model changed): the oldest goes

    def close(self) -> None:
        with self.lock:
            self._finalizer()


def _release(free: list[Slot], dir_fd: int) -> None:
    for slot in free:
        slot.close()
    free.clear()
    with contextlib.suppress(OSError):
        os.close(dir_fd)
