"""The run directory: every path in it, ``run.json``, ``metrics.jsonl`` and its locks.

Why one module: a run directory is read by more parties than write it (the analysis, the bench,
``teefl report``, the Slurm watcher, a restarted aggregator), some of them on another host long
after the run. Its layout is a file format, so it is written down once, here, and every reader
and writer asks `RunDir` instead of joining path literals. This module imports neither torch nor
grpc nor any federation code: the analysis may import it.

Layout (names and formats are stable: runs written by older teefl read the same)::

    run.json            what the run is and where it stands (`RunDir.update`, `count_start`)
    plan.yaml           the plan the aggregator ran
    metrics.jsonl       one line per closed round and one for the final evaluation
    state.json          the last durable round and its checkpoint's checksum
    summary.json        derived by ``teefl summarize`` (never the ground truth)
    port                the aggregator's bound port, for ``teefl run``
    run.lock, aggregator.lock, .run.json.lock
    events/<process>.jsonl, env/<process>.json, logs/<process>.log, attestation/<party>.json
    model/round-NNNN.safetensors[.sealed], model/final.safetensors[.sealed]
    updates/round-NNNN/, updates/spare/
    pki/, gramine/, slurm/, bench.json (a bench cell)

Locking: POSIX record locks (``fcntl.lockf``) are per process and dropped by the kernel when the
holder dies, however it dies, so a crashed run never leaves a stale lock. A process must not
open and close a lock file a second time while it holds it (closing any descriptor of the file
drops a POSIX lock), hence the per-process registry `_held`. ``teefl run`` holds ``run.lock``;
every aggregator holds ``aggregator.lock`` (a second one on the same directory stops at once
with one line naming the holder). Under Gramine, an aggregator's lock lives in the enclave's
emulated file system; the launcher (always native) still holds ``run.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teefl.errors import TeeflError
from teefl.runfiles import append_private, open_private, private_dir

if TYPE_CHECKING:  # the plan is not needed to read a run, and `count_start` runs before it
    from teefl.plan import Plan

log = logging.getLogger("teefl.rundir")

RUN_JSON = "run.json"
RUN_JSON_LOCK = ".run.json.lock"  # run.json is changed by more than one process
PLAN = "plan.yaml"
METRICS = "metrics.jsonl"
STATE = "state.json"
SUMMARY = "summary.json"
PORT = "port"
RUN_LOCK = "run.lock"  # held by ``teefl run`` (the launcher)
AGGREGATOR_LOCK = "aggregator.lock"  # held by every aggregator
BENCH = "bench.json"
EVENTS, ENV, LOGS, MODEL, UPDATES = "events", "env", "logs", "model", "updates"
ATTESTATION, PKI, GRAMINE, SLURM = "attestation", "pki", "gramine", "slurm"
SPARE = "spare"  # under updates/: payload files of closed rounds, kept for reuse
#: a round's folder of stored updates under updates/ (`RunDir.round_updates`)
ROUND_UPDATES = re.compile(r"round-(\d{4,})")
AGGREGATOR = "aggregator"  # the aggregator's process name (events, env, log)


def collaborator_process(name: str) -> str:
    """A collaborator's process name: its events, env and log files are named after it."""
    return f"collaborator-{name}"


class RunDir:
    """One run directory: its paths (properties and methods), run.json, metrics and locks.

    Constructing one touches nothing on disk; `create` makes the directory (mode 0700).
    """

    __slots__ = ("path",)

    def __init__(self, path: Path | str | RunDir) -> None:
        self.path = path.path if isinstance(path, RunDir) else Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def create(self) -> RunDir:
        private_dir(self.path)
        return self

    def is_run(self) -> bool:
        """A run directory has run.json, or at least an events/ folder."""
        return self.run_json.is_file() or self.events_dir.is_dir()

    # -- files at the top ----------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def plan(self) -> Path:
        return self.path / PLAN

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def port_file(self) -> Path:
        return self.path / PORT

    @property
    def bench_record(self) -> Path:
        return self.path / BENCH

    # -- folders ---------------------------------------------------------------------------------
    @property
    def events_dir(self) -> Path:
        return self.path / EVENTS

    @property
    def env_dir(self) -> Path:
        return self.path / ENV

    @property
    def logs_dir(self) -> Path:
        return self.path / LOGS

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL

    @property
    def updates_dir(self) -> Path:
        return self.path / UPDATES

    @property
    def spare_dir(self) -> Path:
        """Update files of closed rounds kept for reuse (their blocks already allocated)."""
        return self.updates_dir / SPARE

    @property
    def attestation_dir(self) -> Path:
        return self.path / ATTESTATION

    @property
    def pki_dir(self) -> Path:
        return self.path / PKI

    @property
    def gramine_dir(self) -> Path:
        return self.path / GRAMINE

    @property
    def slurm_dir(self) -> Path:
        return self.path / SLURM

    # -- per process, per round ------------------------------------------------------------------
    def events(self, process: str = AGGREGATOR) -> Path:
        return self.events_dir / f"{process}.jsonl"

    def event_files(self) -> list[Path]:
        return sorted(self.events_dir.glob("*.jsonl"))

    def env(self, process: str) -> Path:
        return self.env_dir / f"{process}.json"

    def env_files(self, prefix: str = "") -> list[Path]:
        return sorted(self.env_dir.glob(f"{prefix}*.json"))

    def log(self, process: str) -> Path:
        return self.logs_dir / f"{process}.log"

    def verdicts(self, party: str) -> Path:
        """Every attestation verdict (accepted or refused) of ``party``, a JSON list."""
        return self.attestation_dir / f"{party}.json"

    @staticmethod
    def checkpoint_name(rnd: int, final: bool = False, sealed: bool = False) -> str:
        """``model/round-NNNN.safetensors`` or ``model/final…``, relative (as state.json names
        it)."""
        stem = "final" if final else f"round-{rnd:04d}"
        return f"{MODEL}/{stem}.safetensors{'.sealed' if sealed else ''}"

    def checkpoint(self, rnd: int, sealed: bool = False) -> Path:
        return self.path / self.checkpoint_name(rnd, sealed=sealed)

    def final_model(self, sealed: bool = False) -> Path:
        return self.path / self.checkpoint_name(0, final=True, sealed=sealed)

    def round_updates(self, rnd: int) -> Path:
        return self.updates_dir / f"round-{rnd:04d}"

    @staticmethod
    def updates_round(name: str) -> int | None:
        """The round of a folder name under updates/ (``round-0007`` -> 7); None for others."""
        m = ROUND_UPDATES.fullmatch(name)
        return int(m.group(1)) if m else None

    # -- run.json --------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """run.json as a dict; ``{}`` when it is missing or unreadable (a run killed early)."""
        try:
            data = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _json_locked(self) -> Iterator[None]:
        """A read-modify-write of one process never undoes another's (a restart counted by the
        aggregator while the launcher writes its status)."""
        fd = open_private(self.path / RUN_JSON_LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: dict[str, Any], fsync: bool) -> None:
        tmp = self.path / f".{RUN_JSON}.tmp-{os.getpid()}"
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, default=str) + "\n")
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.run_json)

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge fields into run.json atomically (temp file + rename, mode 0600, under a lock)
        and stamp ``updated_wall``; returns the new content."""
        with self._json_locked():
            data = self.read()
            data.update(fields)
            data["updated_wall"] = time.time()
            self._write(data, fsync=False)
        return data

    def count_start(self) -> int:
        """Count a start of the aggregator in run.json's ``restarts`` (0 at the first start) and
        return it; durable (fsync) before it returns.

        Why first thing, before the plan is even loaded: a restart killed during its own start-up
        (loading the checkpoint, replaying the open round) is a restart too.
        """
        self.create()
        with self._json_locked():
            data = self.read()
            restarts = data.get("restarts", -1)
            restarts = restarts if isinstance(restarts, int) else -1
            if data.get("status") == "completed":  # refused by the caller: not a start
                return max(restarts, 0)
            restarts += 1
            data.update(restarts=restarts, updated_wall=time.time())
            self._write(data, fsync=True)
        return restarts

    # -- metrics.jsonl ---------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line (mode 0600); a line torn by a killed writer is ended first."""
        fd = append_private(self.metrics)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every whole JSON object line of metrics.jsonl (a torn or foreign line is skipped)."""
        try:
            lines = self.metrics.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    # -- events ----------------------------------------------------------------------------------
    def first_anchor(self, process: str = AGGREGATOR) -> float | None:
        """Monotonic start of the first process that wrote ``process``'s events, on this host.

        A restarted aggregator uses it so that the run's wall-clock T spans the whole run.
        Clocks of another host or boot are not comparable: then None.
        """
        try:
            with open(self.events(process), encoding="utf-8") as fh:
                first = json.loads(fh.readline())
        except (OSError, json.JSONDecodeError):
            return None
        if first.get("type") != "anchor" or first.get("host") != socket.gethostname():
            return None
        t_mono = float(first["t_mono"])
        return t_mono if t_mono <= time.monotonic() else None

    # -- one process per run directory -----------------------------------------------------------
    def acquire(self, name: str, who: str) -> Path | None:
        """Lock ``name`` (`RUN_LOCK`, `AGGREGATOR_LOCK`) for this process; see `acquire`."""
        return acquire(self.path, name, who)

    @contextlib.contextmanager
    def hold(self, name: str, who: str) -> Iterator[Path | None]:
        """`acquire` for the duration of a ``with`` block."""
        path = acquire(self.path, name, who)
        try:
            yield path
        finally:
            release(path)


def security_config(plan: Plan, tee: dict[str, Any] | None = None) -> dict[str, Any]:
    """run.json's ``config``: the security axes of a run, as the overhead model names them.

    The TEE label is the aggregator host's detection record (or the user's stated label, kept
    as stated); it is never inferred from the plan's wishes.
    """
    tee = tee or {}
    att = plan.security.attestation
    return {
        "transport": plan.security.transport or "none",
        "launcher": plan.runtime.launcher,
        "attestation": "required" if att.enabled else "off",
        "attestation_detail": {
            "collaborators": att.collaborators,
            "aggregator": att.aggregator,
            "provider": att.provider,
        },
        "at_rest": plan.security.at_rest.mode,
        "tee": tee.get("label", "none"),
        "tee_source": tee.get("source", "none"),
    }


# -- locks (module level: one registry per process, whichever RunDir object asks) ---------------
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


def acquire(run_dir: Path | str, name: str, who: str) -> Path | None:
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
