"""The acknowledged updates of a run's open rounds, kept until their round's checkpoint is
durable.

Before an update is acknowledged its metadata (samples, metrics, digest) is stored under
``updates/round-NNNN/``, and its payload there too -- or in a shared-memory slot the metadata
names (`commit_staged`, see staging.py), moved there after the acknowledgement
(`StagedUpdate.settle`). A restarted aggregator replays the open round's acknowledged updates
from either place (`load_updates`), so no acknowledged update is lost. Updates are written
without fsync: they survive a crash of the aggregator process, not a crash of the host.

In a sealed run every payload is sealed bound to its run, round and collaborator and every
metadata file carries an HMAC: an edited one, or another round's update put in place, is
dropped. A sealed run never stages updates in shared memory, and never reads a staged file a
metadata file names. Nothing is read or removed outside the run directory and the staging
directory, whatever a metadata file says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teefl.errors import TeeflError
from teefl.rundir import RunDir
from teefl.runfiles import DIR_MODE, private_dir
from teefl.store.atomic import write_atomic
from teefl.store.files import UpdateFile, digest_meta, matches, meta_doc, write_meta
from teefl.store.paged import MappedUpdateFile, map_file
from teefl.store.sealing import FileSealer
from teefl.store.staging import Slot

log = logging.getLogger("teefl.durable")


class _Dropped(Exception):
    """A stored update that cannot be counted; the message says why."""


@dataclass
class StagedUpdate:
    """An acknowledged update whose only copy is its shared-memory slot (see
    `UpdateStore.commit_staged`)."""

    store: UpdateStore
    rnd: int
    name: str
    slot: Slot

    def settle(self) -> None:
        """Into the run directory (reusing a spare file's cached pages, as `UpdateFile`), then
        the slot back to a free slot. A crash at any point leaves a complete copy that
        `UpdateStore.load_updates` finds. The metadata keeps naming the staged file, which is
        gone: rewriting it in place costs ~180 us on ext4 (a rename over an existing file
        flushes it), and `load_updates` reads the run directory's copy where the staged file
        is missing (names are unique to a process, round and collaborator, so never reused)."""
        store, name = self.store, self.name
        d = store.round_dir(self.rnd)
        file = f"{name}{store.files.suffix()}"
        out = UpdateFile(
            d / file, d / f"{name}.json", self.slot.mem, reuse=store.spare_dir() / file
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


class UpdateStore:
    """The stored updates (and evaluation reports) of one run directory's open rounds.

    ``keep``: never drop a closed round's updates (kept for inspection). ``staging_dir``: the
    only directory a staged update is read from or removed in (None: staged names are ignored).
    ``mapped`` (``federation.memory: flat``): `load_updates` maps plain update files instead of
    reading them (`paged.map_file`), so a restart does not hold the round's updates in memory.
    """

    mapped = False

    def __init__(
        self, rd: RunDir, files: FileSealer, keep: bool = False, staging_dir: Path | None = None
    ) -> None:
        self.rd, self.files, self.keep, self.staging_dir = rd, files, keep, staging_dir

    def update_dirs(self) -> list[Path]:
        """Every round directory under ``updates/`` (never a symbolic link's target)."""
        updates = self.rd.updates_dir
        return [
            updates / e
            for e in listdir(updates)
            if (updates / e).is_dir() and not (updates / e).is_symlink()
        ]

    def stored_rounds(self) -> list[int]:
        """Rounds with a directory of stored updates, in order."""
        out = []
        for entry in listdir(self.rd.updates_dir):
            rnd = RunDir.updates_round(entry)
            if rnd is not None:
                out.append(rnd)
        return sorted(out)

    def round_dir(self, rnd: int) -> Path:
        return self.rd.round_updates(rnd)

    def _made_round_dir(self, rnd: int) -> Path:
        d = self.round_dir(rnd)
        try:
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        except FileNotFoundError:  # the first update of the run: updates/ too, 0700
            private_dir(d.parent)
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        return d

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
        d = self._made_round_dir(rnd)
        ctx = self.files.context("update", rnd, name)
        self.files.write(d / f"{name}{self.files.suffix()}", payload, fsync=False, context=ctx)
        digests = {k: v for k, v in (digests or {}).items() if v is not None and v != b""}
        if not digests:
            digests, verified = {"sha256": hashlib.sha256(payload).digest()}, True
        # the metadata is written last: an update counts only once both files exist
        doc = self.files.signed(meta_doc(meta, digests, verified), ctx)
        write_atomic(d / f"{name}.json", json.dumps(doc).encode(), fsync=False)

    def save_report(self, rnd: int, name: str, meta: dict[str, Any]) -> None:
        """Store an acknowledged evaluation report (samples and metrics, no payload) of the
        evaluation pass ``rnd``: a restart during that pass counts it instead of waiting for a
        report its collaborator will not send again. `load_updates` returns it with an empty
        payload and ``meta["report"]`` true."""
        d = self._made_round_dir(rnd)
        doc = self.files.signed({**meta, "report": True}, self.files.context("update", rnd, name))
        write_atomic(d / f"{name}.json", json.dumps(doc).encode(), fsync=False)

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
        its metadata naming the slot's file (a name in the staging directory, never a path),
        then the name itself -- the commit point, after which a crash of this process loses
        nothing. `StagedUpdate.settle` moves it into the run directory after the
        acknowledgement. (Metadata whose staged file is missing is an update that was never
        committed, hence never acknowledged: `load_updates` drops it.)"""
        assert not self.files.sealed  # sealed updates are stored as ciphertext, never staged
        d = self._made_round_dir(rnd)
        if not digest_meta(digests):  # nothing claimed (an old sender over TLS): compute one
            digests, verified = {"sha256": hashlib.sha256(slot.mem).digest()}, True
        staged = slot.name_for(rnd, name)
        write_meta(d / f"{name}.json", {**meta, "staged": staged}, digests, verified)
        try:
            slot.link(staged)
        except OSError:
            (d / f"{name}.json").unlink(missing_ok=True)  # not committed: not acknowledged
            raise
        return StagedUpdate(self, rnd, name, slot)

    def open_update(self, rnd: int, name: str, buffer: bytearray) -> UpdateFile | None:
        """The file an update received into ``buffer`` is written to while it arrives (see
        `UpdateFile`); None when sealed (the file holds ciphertext) or empty."""
        if self.files.sealed or not len(buffer):
            return None
        d = self._made_round_dir(rnd)
        file = f"{name}{self.files.suffix()}"
        return UpdateFile(d / file, d / f"{name}.json", buffer, reuse=self.spare_dir() / file)

    def open_mapped_update(self, rnd: int, name: str, size: int) -> MappedUpdateFile | None:
        """The file an update is received into through a shared map (``federation.memory:
        flat``, see `MappedUpdateFile`); None when sealed (the file holds ciphertext)."""
        if self.files.sealed or not size:
            return None
        d = self._made_round_dir(rnd)
        file = f"{name}{self.files.suffix()}"
        return MappedUpdateFile(d / file, d / f"{name}.json", size, self.spare_dir() / file)

    def spare_dir(self) -> Path:
        return self.rd.spare_dir

    def _staged_path(self, staged: Any) -> Path | None:
        """Where a staged update named in metadata is, or None where that name is not a file
        name inside the staging directory (a path elsewhere is never read or removed)."""
        if self.staging_dir is None or not isinstance(staged, str):
            return None
        name = staged
        if "/" in staged:  # an older teefl recorded the whole path
            if Path(staged).parent != self.staging_dir:
                return None
            name = Path(staged).name
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            return None
        return self.staging_dir / name

    def discard_update(self, rnd: int, name: str) -> None:
        """Forget an update that was stored but never counted (its round closed meanwhile), or
        one that cannot be counted (see `load_updates`)."""
        d = self.round_dir(rnd)
        meta_file = d / f"{name}.json"
        if self.staging_dir is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                where = self._staged_path(json.loads(meta_file.read_bytes()).get("staged"))
                if where is not None:
                    where.unlink(missing_ok=True)
        for path in (meta_file, d / f"{name}{self.files.suffix()}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def load_updates(
        self, rnd: int, drop: Callable[[str, str], None] | None = None
    ) -> list[SavedUpdate]:
        """The acknowledged updates of a round, each checked against its recorded digest.

        An update still staged in shared memory (the aggregator stopped between its
        acknowledgement and its move to the run directory) is read from there and moved now;
        one whose staged file is gone was never committed (or the host restarted since) and is
        dropped with a warning. Dropped too, each with a message (and ``drop(name, reason)``):
        unreadable metadata; in a sealed run, metadata whose HMAC fails (edited) or a payload
        that is not this run's, round's and collaborator's update (swapped in); a payload whose
        digest, claimed by its sender and never checked, is false. A payload that fails a
        digest checked on arrival stops the resume (the disk is corrupt).
        """
        d = self.round_dir(rnd)
        out: list[SavedUpdate] = []
        if not d.is_dir():
            return out
        for meta_file in sorted(d.glob("*.json")):
            name = meta_file.stem
            try:
                out.append(self._load_update(rnd, name, meta_file))
            except _Dropped as exc:
                log.warning("stored update of %s for round %d not counted: %s", name, rnd, exc)
                self.discard_update(rnd, name)
                if drop is not None:
                    drop(name, str(exc))
        return out

    def _load_update(self, rnd: int, name: str, meta_file: Path) -> SavedUpdate:
        try:
            meta = json.loads(meta_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise _Dropped(f"its metadata {meta_file} is unreadable ({exc})") from None
        if not isinstance(meta, dict):
            raise _Dropped(f"its metadata {meta_file} is not a JSON object")
        ctx = self.files.context("update", rnd, name)
        if self.files.mkey is not None:
            from teefl.security.sealed import SealedError

            try:
                meta = self.files.verified(meta, ctx)
            except SealedError as exc:
                raise _Dropped(f"its metadata {meta_file} {exc}") from None
        if meta.get("report") is True:  # an evaluation report: metadata only
            return SavedUpdate(name, b"", meta)
        staged = meta.pop("staged", None)
        file = meta_file.with_name(f"{name}{self.files.suffix()}")
        where = None
        if staged is not None:
            where = self._staged_path(staged)
            if where is None:
                log.warning(
                    "metadata %s names a staged file %r outside %s: not read",
                    meta_file,
                    staged,
                    self.staging_dir or "any staging directory (sealed, or none configured)",
                )
        payload, from_staged = None, False
        if where is not None:
            payload = _read_own_file(where)
            from_staged = payload is not None and matches(payload, meta)
        if not from_staged and (payload is None or file.exists()):
            try:
                if self.mapped and not self.files.sealed:
                    payload = map_file(file) or b""
                else:
                    payload = self.files.read(file, ctx)
            except FileNotFoundError:
                payload = None
            except OSError as exc:
                raise _Dropped(f"its payload {file} is unreadable ({exc})") from None
            except TeeflError as exc:  # sealed: tampered, another key's, another update's
                raise _Dropped(str(exc)) from None
        if payload is None:
            if staged is not None and where is None:
                raise _Dropped(
                    f"it names a staged file {staged!r} outside the staging directory (not "
                    "read) and has no copy in the run directory"
                )
            if staged is not None:
                raise _Dropped(
                    f"it was staged in {staged}, which is gone (never committed, or the host "
                    "restarted since)"
                )
            raise _Dropped(f"its payload {file} is missing (never committed)")
        if not from_staged and not matches(payload, meta):
            if meta.get("verified", True) is False:
                # its digest is the sender's claim, never checked (it came over TLS): the
                # sender's own digest was wrong, so the update is not trusted after all
                raise _Dropped("it does not match its sender's digest")
            raise TeeflError(f"stored update {meta_file} fails its checksum")
        if from_staged:  # into the run directory, out of shared memory, as `settle` does
            assert where is not None
            write_atomic(file, payload, fsync=False)
            where.unlink(missing_ok=True)
            write_atomic(meta_file, json.dumps(meta).encode(), fsync=False)
        return SavedUpdate(name, payload, meta)

    def drop_updates(self, rnd: int, last: bool = False) -> None:
        """Forget a closed round's updates; their payload files are kept aside as spares for
        the next round to receive into (`UpdateFile`, `MappedUpdateFile`), never read again as
        updates. ``last``:
        no round follows (the final round's checkpoint is durable): the spares go too, and
        ``updates/`` with them once it is empty."""
        if self.keep:
            return
        d = self.round_dir(rnd)
        if not self.files.sealed and d.is_dir() and not last:
            spare = self.spare_dir()
            spare.mkdir(mode=DIR_MODE, exist_ok=True)
            for path in d.glob(f"*{self.files.suffix()}"):
                os.replace(path, spare / path.name)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)
        if last:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.spare_dir())
            with contextlib.suppress(OSError):  # not empty: another round's, kept
                self.rd.updates_dir.rmdir()


def listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_own_file(path: Path) -> bytes | None:
    """The bytes of a regular file of ours at ``path``; None where it is missing, a symbolic
    link, not a regular file, or another user's (never followed, never trusted)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symbolic link in its place
        log.warning("staged file %s not read: %s", path, exc)
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            log.warning("staged file %s not read: not a regular file of this user", path)
            return None
        return fh.read()
