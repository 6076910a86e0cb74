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
- Sealed runs (``at_rest: sealed``): every payload file is sealed bound to its run, round,
  party and kind (`sealed.seal_bytes`'s context), and ``state.json`` and every update's
  metadata carry an HMAC under a key derived from the sealing key: a host that edits them, or
  puts an older checkpoint or another round's update in place, is refused (state) or has that
  update dropped (updates). A sealed run never stages updates in shared memory, and never reads
  a staged file a metadata file names.
- What a dead aggregator leaves behind is cleared by the next one on start-up (`clean_up`):
  temporary files, round directories whose checkpoint is durable, and ``metrics.jsonl`` lines of
  rounds it will close again.
- Files are the owner's alone (`teefl.runfiles`: directories 0700, files 0600), and nothing is
  read or removed outside the run directory and the staging directory, whatever a metadata file
  says.
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
from teefl.store.atomic import TEMP_NAME, write_atomic
from teefl.store.files import UpdateFile, digest_meta, matches, meta_doc, write_meta
from teefl.store.staging import Slot

log = logging.getLogger("teefl.durable")


class _Dropped(Exception):
    """A stored update that cannot be counted; the message says why."""


def _pid_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive (another user's), or we cannot tell: leave its files alone
        return False
    return False


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


@dataclass
class Resume:
    """What `RoundStore.load_resume` found: the last completed round, its checkpoint's payload,
    the strategy that made it (None: a run directory older than strategies) and that strategy's
    encoded state after it (None: it keeps none)."""

    round: int
    payload: bytes
    strategy: str | None = None
    strategy_state: bytes | None = None


class RoundStore:
    """Checkpoints, the resume pointer and acknowledged updates of one run directory.

    ``run_id``: bound into every sealed file and metadata MAC (sealed runs), so that another
    run's files are refused. ``staging_dir``: the only directory a staged update is read from
    or removed in (None: staged names are ignored); never used by a sealed store.
    """

    def __init__(
        self,
        run_dir: Path,
        seal_key: bytes | None = None,
        keep: bool = False,
        run_id: str = "",
        staging_dir: Path | None = None,
    ) -> None:
        self.run_dir, self.seal_key, self.keep = Path(run_dir), seal_key, keep
        self.rd = RunDir(self.run_dir)  # every path and name of the run directory
        self.run_id = run_id
        self.staging_dir = Path(staging_dir) if staging_dir and seal_key is None else None
        self.mkey: bytes | None = None
        if seal_key is not None:
            from teefl.security.sealed import metadata_key

            self.mkey = metadata_key(seal_key)
        private_dir(self.run_dir)
        self.model_dir = private_dir(self.rd.model_dir)

    # -- payloads (sealed or plain) ------------------------------------------------------------
    def _suffix(self) -> str:
        return ".safetensors.sealed" if self.seal_key else ".safetensors"

    def _context(self, kind: str, rnd: int | None = None, party: str = "aggregator") -> dict:
        """What a sealed file or a metadata MAC is bound to (see `sealed.seal_bytes`)."""
        ctx: dict[str, Any] = {"run": self.run_id, "kind": kind, "party": party}
        if rnd is not None:
            ctx["round"] = rnd
        return ctx

    def _write(
        self,
        path: Path,
        payload: bytes | bytearray,
        fsync: bool = True,
        pause: Callable[[], None] | None = None,
        context: dict[str, Any] | None = None,
    ) -> Path:
        if self.seal_key is None:
            write_atomic(path, payload, fsync, pause)
            return path
        from teefl.security.sealed import seal_bytes

        assert context is not None  # every sealed file of a run says what it is
        write_atomic(path, seal_bytes(bytes(payload), self.seal_key, context), fsync, pause)
        return path

    def _read(self, path: Path, context: dict[str, Any]) -> bytes:
        if self.seal_key is None:
            return path.read_bytes()
        from teefl.security.sealed import read_sealed

        return read_sealed(path, self.seal_key, expect=context)

    def _signed(self, doc: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        if self.mkey is None:
            return doc
        from teefl.security.sealed import sign_metadata

        return sign_metadata(doc, self.mkey, context)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_name(self, rnd: int, final: bool) -> str:
        return RunDir.checkpoint_name(rnd, final, sealed=self.seal_key is not None)

    def save_checkpoint(
        self,
        rnd: int,
        payload: bytes,
        final: bool,
        sha256: bytes | None = None,
        crc32c: int | None = None,
        pause: Callable[[], None] | None = None,
        strategy: str | None = None,
        strategy_state: bytes | None = None,
    ) -> Path:
        """Checkpoint of a completed round, then the resume pointer; the final model too.

        ``strategy``: the name of the strategy that made the round; ``strategy_state``: its
        encoded state after the round (`teefl.strategy.encode_state`; None: it keeps none),
        written durably before the resume pointer, which names both -- so the state a restart
        restores always belongs to the checkpoint it resumes from.

        The resume pointer records the payload's digest the caller already has -- its SHA-256,
        else its CRC32C (both computed to announce the download) -- and only without either is
        the model hashed here. A CRC catches the accidental corruption this check is for;
        sealed checkpoints are authenticated by AES-GCM as well, bound to their run and round,
        and the pointer by its HMAC. ``pause``: see `write_atomic`.
        """
        path = self._write(
            self.run_dir / self._checkpoint_name(rnd, False),
            payload,
            True,
            pause,
            self._context("checkpoint", rnd),
        )
        if final:
            path = self._write(self.final_path(), payload, True, pause, self._context("final", rnd))
        state: dict[str, Any] = {
            "completed_round": rnd,
            "checkpoint": str(path.relative_to(self.run_dir)),
            "final": final,
        }
        if strategy is not None:
            state["strategy"] = strategy
        if strategy_state is not None:
            name = self._strategy_name(rnd)
            self._write(
                self.run_dir / name, strategy_state, True, pause, self._context("strategy", rnd)
            )
            state["strategy_state"] = name
            state["strategy_sha256"] = hashlib.sha256(strategy_state).hexdigest()
        if sha256:
            state["sha256"] = sha256.hex()
        elif crc32c is not None:
            state["crc32c"] = int(crc32c)
        else:
            state["sha256"] = hashlib.sha256(payload).hexdigest()
        state = self._signed(state, self._context("state"))
        write_atomic(self.rd.state, json.dumps(state, indent=2).encode())
        return path

    def _strategy_name(self, rnd: int) -> str:
        return f"model/strategy-round-{rnd:04d}{self._suffix()}"

    def final_path(self) -> Path:
        return self.rd.final_model(sealed=self.seal_key is not None)

    def load_state(self) -> tuple[int, bytes] | None:
        """(last completed round, its global model payload), or None for a fresh run (see
        `load_resume`)."""
        resume = self.load_resume()
        return None if resume is None else (resume.round, resume.payload)

    def load_resume(self) -> Resume | None:
        """What a restart resumes from, or None for a fresh run: the last completed round, its
        global model payload, and the strategy state saved with it.

        Refused with one line naming the fault: a ``state.json`` that does not parse, that names
        any other file than its round's checkpoint (never a path outside ``model/``), or, in a
        sealed run, whose HMAC fails (edited, or another run's); a checkpoint that is not that
        round's of this run (a rollback), or that fails its checksum.
        """
        path = self.rd.state
        if not path.exists():
            return None
        from teefl.security.sealed import SealedError

        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            if self.mkey is not None:
                from teefl.security.sealed import verify_metadata

                state = verify_metadata(state, self.mkey, self._context("state"))
            rnd, final = state["completed_round"], state.get("final", False)
            if type(rnd) is not int or rnd < 1 or type(final) is not bool:
                raise ValueError(f"completed_round {rnd!r} / final {final!r} are not valid")
            name = self._checkpoint_name(rnd, final)
            if state["checkpoint"] != name:
                raise ValueError(f"it names checkpoint {state['checkpoint']!r}, expected {name!r}")
            kind = "final" if final else "checkpoint"
            payload = self._read(self.run_dir / name, self._context(kind, rnd))
            strategy, sstate = state.get("strategy"), None
            if strategy is not None and not isinstance(strategy, str):
                raise ValueError(f"strategy {strategy!r} is not a name")
            if "strategy_state" in state:
                sname = self._strategy_name(rnd)
                if state["strategy_state"] != sname:
                    raise ValueError(
                        f"it names strategy state {state['strategy_state']!r}, expected {sname!r}"
                    )
                sstate = self._read(self.run_dir / sname, self._context("strategy", rnd))
                if hashlib.sha256(sstate).hexdigest() != state.get("strategy_sha256"):
                    raise TeeflError(f"cannot resume: strategy state {sname} fails its checksum")
        except SealedError as exc:
            raise TeeflError(f"cannot resume from {path}: {exc}; refusing to resume") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TeeflError(f"cannot resume from {path}: {exc}") from None
        if not matches(payload, state):
            raise TeeflError(f"cannot resume: checkpoint {name} fails its checksum")
        return Resume(rnd, payload, strategy, sstate)

    # -- what a dead aggregator left -----------------------------------------------------------
    def clean_up(self, completed: int, final: bool = False) -> None:
        """On start-up, before anything is written: remove what a dead aggregator left.

        - temporary files (`write_atomic`, `UpdateFile`): every one in ``model/`` and
          ``updates/`` (only the aggregator writes there), and those of dead processes at the
          top of the run directory (where the launcher writes run.json too);
        - the updates of rounds up to ``completed``, whose checkpoint is durable (a crash
          between the checkpoint and `drop_updates`), and after the final round
          (``final``) the spare files, which no round will reuse;
        - ``metrics.jsonl`` lines of rounds after ``completed``: those rounds are closed again
          (from their stored updates) and write their line again, once.
        """
        for directory in (self.model_dir, *self._update_dirs()):
            for entry in _listdir(directory):
                if TEMP_NAME.match(entry):
                    _unlink(directory / entry)
        for entry in _listdir(self.run_dir):
            m = TEMP_NAME.match(entry)
            if m and _pid_gone(int(m.group(1))):
                _unlink(self.run_dir / entry)
        if not self.keep:
            for rnd in self.stored_rounds():
                if rnd <= completed:
                    self.drop_updates(rnd, last=final)
            if final:
                self.drop_updates(completed, last=True)
        self.truncate_metrics(completed)

    def _update_dirs(self) -> list[Path]:
        updates = self.rd.updates_dir
        return [
            updates / e
            for e in _listdir(updates)
            if (updates / e).is_dir() and not (updates / e).is_symlink()
        ]

    def stored_rounds(self) -> list[int]:
        """Rounds with a directory of stored updates, in order."""
        out = []
        for entry in _listdir(self.rd.updates_dir):
            rnd = RunDir.updates_round(entry)
            if rnd is not None:
                out.append(rnd)
        return sorted(out)

    def truncate_metrics(self, completed: int) -> None:
        """Keep one ``metrics.jsonl`` line per round up to ``completed`` (the first of each; a
        torn line goes too): the lines a restart will write again are removed, atomically."""
        path = self.rd.metrics
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            return
        kept, seen = [], set()
        for line in old.splitlines():
            try:
                rnd = json.loads(line).get("round")
            except (ValueError, AttributeError):
                continue
            if type(rnd) is int and rnd <= completed and rnd not in seen:
                seen.add(rnd)
                kept.append(line + b"\n")
        new = b"".join(kept)
        if new != old:
            write_atomic(path, new)

    # -- acknowledged updates ------------------------------------------------------------------
    def _round_dir(self, rnd: int) -> Path:
        return self.rd.round_updates(rnd)

    def _made_round_dir(self, rnd: int) -> Path:
        d = self._round_dir(rnd)
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
        ctx = self._context("update", rnd, name)
        self._write(d / f"{name}{self._suffix()}", payload, fsync=False, context=ctx)
        digests = {k: v for k, v in (digests or {}).items() if v is not None and v != b""}
        if not digests:
            digests, verified = {"sha256": hashlib.sha256(payload).digest()}, True
        # the metadata is written last: an update counts only once both files exist
        doc = self._signed(meta_doc(meta, digests, verified), ctx)
        write_atomic(d / f"{name}.json", json.dumps(doc).encode(), fsync=False)

    def save_report(self, rnd: int, name: str, meta: dict[str, Any]) -> None:
        """Store an acknowledged evaluation report (samples and metrics, no payload) of the
        evaluation pass ``rnd``: a restart during that pass counts it instead of waiting for a
        report its collaborator will not send again. `load_updates` returns it with an empty
        payload and ``meta["report"]`` true."""
        d = self._made_round_dir(rnd)
        doc = self._signed({**meta, "report": True}, self._context("update", rnd, name))
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
        assert self.seal_key is None  # sealed updates are stored as ciphertext, never staged
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
        if self.seal_key is not None or not len(buffer):
            return None
        d = self._made_round_dir(rnd)
        file = f"{name}{self._suffix()}"
        return UpdateFile(d / file, d / f"{name}.json", buffer, reuse=self._spare_dir() / file)

    def _spare_dir(self) -> Path:
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
        d = self._round_dir(rnd)
        meta_file = d / f"{name}.json"
        if self.staging_dir is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                where = self._staged_path(json.loads(meta_file.read_bytes()).get("staged"))
                if where is not None:
                    where.unlink(missing_ok=True)
        for path in (meta_file, d / f"{name}{self._suffix()}"):
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
        d = self._round_dir(rnd)
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
        ctx = self._context("update", rnd, name)
        if self.mkey is not None:
            from teefl.security.sealed import SealedError, verify_metadata

            try:
                meta = verify_metadata(meta, self.mkey, ctx)
            except SealedError as exc:
                raise _Dropped(f"its metadata {meta_file} {exc}") from None
        if meta.get("report") is True:  # an evaluation report: metadata only
            return SavedUpdate(name, b"", meta)
        staged = meta.pop("staged", None)
        file = meta_file.with_name(f"{name}{self._suffix()}")
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
                payload = self._read(file, ctx)
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
        the next round to receive into (`UpdateFile`), never read again as updates. ``last``:
        no round follows (the final round's checkpoint is durable): the spares go too, and
        ``updates/`` with them once it is empty."""
        if self.keep:
            return
        d = self._round_dir(rnd)
        if self.seal_key is None and d.is_dir() and not last:
            spare = self._spare_dir()
            spare.mkdir(mode=DIR_MODE, exist_ok=True)
            for path in d.glob(f"*{self._suffix()}"):
                os.replace(path, spare / path.name)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)
        if last:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self._spare_dir())
            with contextlib.suppress(OSError):  # not empty: another round's, kept
                self.rd.updates_dir.rmdir()


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        path.unlink()


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
