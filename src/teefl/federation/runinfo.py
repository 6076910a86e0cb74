"""``run.json``: what a run is (model, dataset, security configuration) and where it stands.

Why a separate small file next to the events: the analysis groups runs by configuration without
parsing events, and a run directory left by a crash or Ctrl-C still says how far it got.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teefl.runfiles import open_private, private_dir

if TYPE_CHECKING:  # teefl.plan costs ~0.4 s to import; `count_start` runs before it
    from teefl.plan import Plan

#: run.json is read, changed and written by more than one process (aggregator, launcher)
LOCK = ".run.json.lock"


def security_config(plan: Plan, tee: dict[str, Any] | None = None) -> dict[str, Any]:
    """The security axes of a run, as the overhead model names them.

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


def read_run_json(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Holds the run's run.json lock: a read-modify-write of one process never undoes
    another's (a restart counted by the aggregator while the launcher writes its status)."""
    fd = open_private(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(run_dir: Path, data: dict[str, Any], fsync: bool) -> None:
    path = Path(run_dir) / "run.json"
    tmp = path.with_name(f".run.json.tmp-{os.getpid()}")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, default=str) + "\n")
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def update_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into run.json atomically (temp file + rename, mode 0600, under a lock)."""
    with _locked(run_dir):
        data = read_run_json(run_dir)
        data.update(fields)
        data["updated_wall"] = time.time()
        _write(run_dir, data, fsync=False)
    return data


def count_start(run_dir: Path) -> int:
    """Count a start of the aggregator on ``run_dir`` in run.json's ``restarts`` (0 at the
    first start) and return it; durable (fsync) before it returns.

    Why first thing, before the plan is even loaded: a restart that is killed during its own
    start-up (loading the checkpoint, replaying the open round) is a restart too; counted
    later, it was lost (22: 3 kills, ``restarts=2``).
    """
    private_dir(run_dir)
    with _locked(run_dir):
        data = read_run_json(run_dir)
        restarts = data.get("restarts", -1)
        restarts = restarts if isinstance(restarts, int) else -1
        if data.get("status") == "completed":  # refused by the caller: not a start of the run
            return max(restarts, 0)
        restarts += 1
        data.update(restarts=restarts, updated_wall=time.time())
        _write(run_dir, data, fsync=True)
    return restarts


def first_anchor(events_file: Path) -> float | None:
    """Monotonic start of the first process that wrote this events file, on this host.

    A restarted aggregator uses it so that the run's wall-clock T spans the whole run. Clocks of
    another host or boot are not comparable: then None.
    """
    import socket

    try:
        with open(events_file, encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, json.JSONDecodeError):
        return None
    if first.get("type") != "anchor" or first.get("host") != socket.gethostname():
        return None
    t_mono = float(first["t_mono"])
    return t_mono if t_mono <= time.monotonic() else None
