"""What the aggregator keeps on disk so that a crash loses no round and counts nothing twice.

- After every round: the checkpoint ``model/round-NNNN.safetensors`` (sealed when the plan says
  so) and ``state.json`` naming it with its SHA-256, both written atomically (temp file, fsync,
  rename). A restarted aggregator resumes from the last completed round.
- Before an update is acknowledged: its metadata (samples, metrics, digest) under
  ``updates/round-NNNN/``, and its payload there too -- or in a shared-memory slot the metadata
  names (`commit_staged`, see staging.py), moved there after the acknowledgement
  (`StagedUpdate.settle`). A restarted aggregator replays the open round's acknowledged updates
  from either place, so no acknowledged update is lost; a collaborator re-sending one is told it
  is already counted (uploads are idempotent per collaborator and round). Updates are written
  without fsync: they survive a crash of the aggregator process, not a crash of the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from teefl.errors import TeeflError
from teefl.federation.staging import Slot

STATE = "state.json"

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
    (`codec.PagePayload`) goes around the page cache, see `_write_direct`.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    view = memoryview(data).cast("B")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = _write_direct(fd, view, pause) if fsync else 0
        for start in range(done, len(view), WRITE_SLICE):
            if pause is not None:
                pause()
            _pwrite_all(fd, view[start : start + WRITE_SLICE], start)
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


def _write_direct(fd: int, view: memoryview, pause: Callable[[], None] | None) -> int:
    """Write the longest `DIRECT_ALIGN`-multiple prefix of ``view`` with ``O_DIRECT``; return
    how many bytes were written (0 where the memory is not page-aligned or the file system
    refuses ``O_DIRECT``: the caller writes the rest the ordinary way).

    Why: a checkpoint written through the page cache costs the CPU a copy of the whole model
    (~10 ms per 45 MB here) plus the writeback's; on 2 cores that came out of the next round's
    transfers. With ``O_DIRECT`` the disk reads the model's memory itself (~2 ms of CPU, 15 ms
    of waiting with the GIL released; benchmarks/comm_limit.py, docs/benchmarks.md).
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
            _pwrite_all(fd, view[done:end], done)
            done = end
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # the file system wants a coarser alignment: the rest goes through the page cache
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return done


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # never for a regular file; a loop that cannot end if it ever were
            raise OSError(errno.EIO, f"write of {len(view)} bytes at {offset} made no progress")
        view, offset = view[n:], offset + n


class BufferPool:
    """Receive buffers for updates, kept from round to round (at most ``keep`` of them).

    Why: a fresh 45 MB buffer costs ~30 ms of page faults here on its first write, more than
    receiving into it; a buffer that was written before costs nothing more. The aggregator
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


class UpdateFile:
    """An update's file, written piece by piece while the update is being received.

    Each received piece (`codec.Assembler`'s ``sink``) is written to the file at once, while it
    is still in the CPU cache; `commit` then only renames the file into place and writes the
    metadata -- the same crash guarantee as `save_update` (survives the aggregator process, not
    a power loss). Not used for sealed storage, whose file holds ciphertext.

    Why not a shared memory map of the file (the previous design): the first write to every
    page of a mapping faults (~2.5 us per 4 KiB page here, and again after each writeback),
    which made receiving 45 MB into the map cost ~40 ms against ~9 ms into a kept buffer plus
    ~9 ms of ``pwrite`` (measured on this machine; docs/benchmarks.md).

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
        flags = os.O_WRONLY | os.O_CREAT
        try:
            if reuse is None:
                raise FileNotFoundError
            os.replace(reuse, self.tmp)
        except FileNotFoundError:
            flags |= os.O_TRUNC
        self.fd = os.open(self.tmp, flags, 0o600)
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
        _pwrite_all(self.fd, view, offset)
        self.written += len(view)

    def commit(self, meta: dict[str, Any], digests: dict[str, Any], verified: bool) -> None:
        """The payload is complete and checked: put it in place, then its metadata (last);
        ``digests`` and ``verified`` as in `RoundStore.save_update`."""
        self.place()
        if not _digest_meta(digests):  # nothing claimed (an old sender over TLS): compute one
            digests, verified = {"sha256": hashlib.sha256(self.buffer).digest()}, True
        _write_meta(self.meta_path, meta, digests, verified)

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


def _write_meta(path: Path, meta: dict[str, Any], digests: dict[str, Any], verified: bool) -> None:
    """An update's metadata: what it claims, its digests, whether they were checked on arrival."""
    meta = {**meta, **_digest_meta(digests), "verified": verified}
    write_atomic(path, json.dumps(meta).encode(), fsync=False)


def _digest_meta(digests: dict[str, Any]) -> dict[str, Any]:
    """``{"sha256": bytes, "crc32c": int}`` (either may be missing) as stored in JSON."""
    out: dict[str, Any] = {}
    if digests.get("sha256"):
        out["sha256"] = digests["sha256"].hex()
    if digests.get("crc32c") is not None:
        out["crc32c"] = int(digests["crc32c"])
    return out


def _matches(payload: bytes, meta: dict[str, Any]) -> bool:
    if "sha256" in meta:
        return hashlib.sha256(payload).hexdigest() == meta["sha256"]
    return _crc32c.crc32c(payload) == meta["crc32c"]


@dataclass
class StagedUpdate:
    """An acknowledged update whose only copy is its shared-memory slot (see
    `RoundStore.commit_staged`)."""

    store: RoundStore
    rnd: int
    name: str
    slot: Slot

    def settle(self) -> None:
        """Into the run directory (reusing a spare file's cached pages, as `UpdateFile`), then
        the slot back to a free slot. A crash at any point leaves a complete copy that
        `RoundStore.load_updates` finds. The metadata keeps naming the staged file, which is
        gone: rewriting it in place costs ~180 us on ext4 (a rename over an existing file
        flushes it), and `load_updates` reads the run directory's copy where the staged file
        is missing (names are unique to a process, round and collaborator, so never reused)."""
        store, name = self.store, self.name
        d = store._round_dir(self.rnd)
        file = f"{name}{store._suffix()}"
        out = UpdateFile(
            d / file, d / f"{name}.json", self.slot.mem, reuse=store._spare_dir() / file
        )
        try:
            out.place()
        except BaseException:
            out.abort()
            raise
        self.slot.unlink()


@dataclass
class SavedUpdate:
    name: str
    payload: bytes
    meta: dict[str, Any]


class RoundStore:
    """Checkpoints, the resume pointer and acknowledged updates of one run directory."""

    def __init__(self, run_dir: Path, seal_key: bytes | None = None, keep: bool = False) -> None:
        self.run_dir, self.seal_key, self.keep = Path(run_dir), seal_key, keep
        self.model_dir = self.run_dir / "model"
        self.model_dir.mkdir(parents=True, exist_ok=True)

    # -- payloads (sealed or plain) ------------------------------------------------------------
    def _suffix(self) -> str:
        return ".safetensors.sealed" if self.seal_key else ".safetensors"

    def _write(
        self,
        path: Path,
        payload: bytes | bytearray,
        fsync: bool = True,
        pause: Callable[[], None] | None = None,
    ) -> Path:
        if self.seal_key is None:
            write_atomic(path, payload, fsync, pause)
            return path
        from teefl.security.sealed import seal_bytes

        write_atomic(path, seal_bytes(bytes(payload), self.seal_key), fsync)
        return path

    def _read(self, path: Path) -> bytes:
        if self.seal_key is None:
            return path.read_bytes()
        from teefl.security.sealed import read_sealed

        return read_sealed(path, self.seal_key)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(
        self,
        rnd: int,
        payload: bytes,
        final: bool,
        sha256: bytes | None = None,
        crc32c: int | None = None,
        pause: Callable[[], None] | None = None,
    ) -> Path:
        """Checkpoint of a completed round, then the resume pointer; the final model too.

        The resume pointer records the payload's digest the caller already has -- its SHA-256,
        else its CRC32C (both computed to announce the download) -- and only without either is
        the model hashed here. A CRC catches the accidental corruption this check is for;
        sealed checkpoints are authenticated by AES-GCM as well. ``pause``: see `write_atomic`.
        """
        name = f"round-{rnd:04d}{self._suffix()}"
        path = self._write(self.model_dir / name, payload, True, pause)
        if final:
            path = self._write(self.model_dir / f"final{self._suffix()}", payload, True, pause)
        state: dict[str, Any] = {
            "completed_round": rnd,
            "checkpoint": str(path.relative_to(self.run_dir)),
            "final": final,
        }
        if sha256:
            state["sha256"] = sha256.hex()
        elif crc32c is not None:
            state["crc32c"] = int(crc32c)
        else:
            state["sha256"] = hashlib.sha256(payload).hexdigest()
        write_atomic(self.run_dir / STATE, json.dumps(state, indent=2).encode())
        return path

    def final_path(self) -> Path:
        return self.model_dir / f"final{self._suffix()}"

    def load_state(self) -> tuple[int, bytes] | None:
        """(last completed round, its global model payload), or None for a fresh run."""
        path = self.run_dir / STATE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            payload = self._read(self.run_dir / state["checkpoint"])
        except (OSError, ValueError, KeyError) as exc:
            raise TeeflError(f"cannot resume from {path}: {exc}") from None
        if not _matches(payload, state):
            raise TeeflError(f"cannot resume: checkpoint {state['checkpoint']} fails its checksum")
        return int(state["completed_round"]), payload

    # -- acknowledged updates ------------------------------------------------------------------
    def _round_dir(self, rnd: int) -> Path:
        return self.run_dir / "updates" / f"round-{rnd:04d}"

    def save_update(
        self,
        rnd: int,
        name: str,
        payload: bytes | bytearray,
        meta: dict[str, Any],
        digests: dict[str, Any] | None = None,
        verified: bool = True,
    ) -> None:
        """Store an acknowledged update with its digests (``{"sha256": bytes, "crc32c": int}``,
        either may be missing; with none, its SHA-256 is computed here). ``verified``: the
        digests were checked against the bytes received, else they are the sender's claim (a
        payload that came over TLS), see `load_updates`."""
        d = self._round_dir(rnd)
        d.mkdir(parents=True, exist_ok=True)
        self._write(d / f"{name}{self._suffix()}", payload, fsync=False)
        digests = {k: v for k, v in (digests or {}).items() if v is not None and v != b""}
        if not digests:
            digests, verified = {"sha256": hashlib.sha256(payload).digest()}, True
        # the metadata is written last: an update counts only once both files exist
        _write_meta(d / f"{name}.json", meta, digests, verified)

    def commit_staged(
        self,
        rnd: int,
        name: str,
        slot: Slot,
        meta: dict[str, Any],
        digests: dict[str, Any],
        verified: bool,
    ) -> StagedUpdate:
        """Store an update received (and checked) in a shared-memory slot (`staging.Slot`):
        its metadata naming the slot's file, then the name itself -- the commit point, after
        which a crash of this process loses nothing. `StagedUpdate.settle` moves it into the
        run directory after the acknowledgement. (Metadata whose staged file is missing is an
        update that was never committed, hence never acknowledged: `load_updates` drops it.)"""
        assert self.seal_key is None  # sealed updates are stored as ciphertext, never staged
        d = self._round_dir(rnd)
        d.mkdir(parents=True, exist_ok=True)
        if not _digest_meta(digests):  # nothing claimed (an old sender over TLS): compute one
            digests, verified = {"sha256": hashlib.sha256(slot.mem).digest()}, True
        staged = slot.name_for(rnd, name)
        _write_meta(
            d / f"{name}.json",
            {**meta, "staged": str(slot.directory / staged)},
            digests,
            verified,
        )
        try:
            slot.link(staged)
        except OSError:
            (d / f"{name}.json").unlink(missing_ok=True)  # not committed: not acknowledged
            raise
        return StagedUpdate(self, rnd, name, slot)

    def open_update(self, rnd: int, name: str, buffer: bytearray) -> UpdateFile | None:
        """The file an update received into ``buffer`` is written to while it arrives (see
        `UpdateFile`); None when sealed (the file holds ciphertext) or empty."""
        if self.seal_key is not None or not len(buffer):
            return None
        d = self._round_dir(rnd)
        d.mkdir(parents=True, exist_ok=True)
        file = f"{name}{self._suffix()}"
        return UpdateFile(d / file, d / f"{name}.json", buffer, reuse=self._spare_dir() / file)

    def _spare_dir(self) -> Path:
        return self.run_dir / "updates" / "spare"

    def discard_update(self, rnd: int, name: str) -> None:
        """Forget an update that was stored but never counted (its round closed meanwhile)."""
        d = self._round_dir(rnd)
        meta_file = d / f"{name}.json"
        with contextlib.suppress(OSError, ValueError):
            staged = json.loads(meta_file.read_text(encoding="utf-8")).get("staged")
            if staged:
                Path(staged).unlink(missing_ok=True)
        for path in (meta_file, d / f"{name}{self._suffix()}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def load_updates(self, rnd: int) -> list[SavedUpdate]:
        """The acknowledged updates of a round, each checked against its recorded digest.

        An update still staged in shared memory (the aggregator stopped between its
        acknowledgement and its move to the run directory) is read from there and moved now;
        one whose staged file is gone was never committed (or the host restarted since) and is
        dropped with a warning.
        """
        d = self._round_dir(rnd)
        out: list[SavedUpdate] = []
        if not d.is_dir():
            return out
        for meta_file in sorted(d.glob("*.json")):
            name = meta_file.stem
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            staged = meta.pop("staged", None)
            file = d / f"{name}{self._suffix()}"
            payload, from_staged, ok = None, False, False
            if staged:  # still staged, or moved here since (then its staged file is gone)
                with contextlib.suppress(FileNotFoundError):
                    payload, from_staged = Path(staged).read_bytes(), True
                ok = payload is not None and _matches(payload, meta)
                if not ok and file.exists():
                    payload, from_staged = self._read(file), False
                    ok = _matches(payload, meta)
                if payload is None:
                    log.warning(
                        "update of %s for round %d was staged in %s, which is gone (never "
                        "committed, or the host restarted since): not counted",
                        name,
                        rnd,
                        staged,
                    )
                    self.discard_update(rnd, name)
                    continue
            else:
                payload = self._read(file)
                ok = _matches(payload, meta)
            if not ok:
                if meta.get("verified", True) is False:
                    # its digest is the sender's claim, never checked (it came over TLS): the
                    # sender's own digest was wrong, so the update is not trusted after all
                    log.warning("stored update %s does not match its sender's digest", name)
                    self.discard_update(rnd, name)
                    continue
                raise TeeflError(f"stored update {meta_file} fails its checksum")
            if from_staged:  # into the run directory, out of shared memory, as `settle` does
                write_atomic(file, payload, fsync=False)
                Path(staged).unlink(missing_ok=True)
                write_atomic(meta_file, json.dumps(meta).encode(), fsync=False)
            out.append(SavedUpdate(name, payload, meta))
        return out

    def drop_updates(self, rnd: int) -> None:
        """Forget a closed round's updates; their payload files are kept aside as spares for
        the next round to receive into (`UpdateFile`), never read again as updates."""
        if self.keep:
            return
        d = self._round_dir(rnd)
        if self.seal_key is None and d.is_dir():
            spare = self._spare_dir()
            spare.mkdir(parents=True, exist_ok=True)
            for path in d.glob(f"*{self._suffix()}"):
                os.replace(path, spare / path.name)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)
