"""Timing events: one JSON line per span, per process, in ``<run>/events/<process>.jsonl``.

Why JSON lines and a monotonic clock: every process appends independently (no shared writer to
become a bottleneck or a single point of failure), a crash loses at most the span in progress, and
durations are immune to NTP steps. One ``anchor`` line per process ties its monotonic clock to the
wall clock so that runs from several hosts can be placed on one time line.

Record kinds (field ``type``):
- ``anchor``: ``t_mono``, ``t_wall``, ``pid``, ``host`` -- first line of every file.
- ``span``: ``round`` (int or null), ``phase``, ``t_start``, ``t_end`` (monotonic seconds),
  ``bytes`` (payload bytes moved, 0 if none), plus free-form extras (e.g. ``metrics``).
- ``info``: a point event (``t``) such as a refusal or a warning, with free-form extras.
Every record also carries ``run``, ``process`` and ``role``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from teefl.rundir import RunDir
from teefl.runfiles import append_private, private_dir

#: Phases defined by the brief; others may be added but these have fixed meanings.
PHASES = (
    "connect",
    "attest",
    "download",
    "validate_global",
    "train",
    "validate_local",
    "serialize",
    "upload",
    "wait",
    "aggregate",
    "checkpoint",
    "publish",
)


class EventRecorder:
    """Appends spans for one process; thread-safe, line-buffered, flushed per record."""

    def __init__(self, run_dir: Path | str, run_id: str, process: str, role: str) -> None:
        self.run_id, self.process, self.role = run_id, process, role
        if not Path(run_dir).is_dir():  # a party's own run directory: its owner's alone
            private_dir(run_dir)
        rd = RunDir(run_dir)
        private_dir(rd.events_dir)
        self.path = rd.events(process)
        self._lock = threading.Lock()
        # mode 0600; a line torn by a killed earlier process of this name is ended first, so
        # this process's anchor line stays readable
        fd = append_private(self.path)
        self._fh = open(fd, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._write(
            {
                "type": "anchor",
                "t_mono": time.monotonic(),
                "t_wall": time.time(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
        )

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(
            {"run": self.run_id, "process": self.process, "role": self.role, **record},
            separators=(",", ":"),
            default=str,
        )
        with self._lock:
            if not self._fh.closed:
                self._fh.write(line + "\n")

    def record(
        self,
        phase: str,
        t_start: float,
        t_end: float,
        round: int | None = None,
        bytes: int = 0,
        **extra: Any,
    ) -> None:
        """Record a span whose start and end were measured by the caller (``time.monotonic``)."""
        self._write(
            {
                "type": "span",
                "round": round,
                "phase": phase,
                "t_start": t_start,
                "t_end": t_end,
                "bytes": int(bytes),
                **extra,
            }
        )

    @contextmanager
    def span(self, phase: str, round: int | None = None, **extra: Any) -> Iterator[dict[str, Any]]:
        """Time the body; the yielded dict may be filled with ``bytes`` and other extras."""
        info: dict[str, Any] = dict(extra)
        t0 = time.monotonic()
        try:
            yield info
        finally:
            t1 = time.monotonic()
            nbytes = info.pop("bytes", 0)
            self.record(phase, t0, t1, round=round, bytes=nbytes, **info)

    def info(self, what: str, **extra: Any) -> None:
        """Record a point event (refusal, warning, state change)."""
        self._write({"type": "info", "what": what, "t": time.monotonic(), **extra})

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def read_events(path: Path | str) -> list[dict[str, Any]]:
    """Read one events file, skipping a torn last line left by a killed process."""
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
