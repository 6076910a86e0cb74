"""Inside a Slurm job: ``teefl bench-cell OUT CELL`` runs one cell of the study stored in OUT, as
the driver would on its own host, under a lock that keeps a second job off the same cell, and
writes the exit status file the driver follows (`teefl.bench.slurm`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from teefl.bench.cell import (
    _signals_as_interrupt,
    cell_finished,
    run_cell,
)
from teefl.bench.matrix import plan_cells
from teefl.bench.study import study_from_dict
from teefl.errors import TeeflError

# -- inside the job: one cell -------------------------------------------------------------------


def _job_key() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


@contextlib.contextmanager
def _cell_lock(out: Path, name: str) -> Iterator[None]:
    """One job per cell: a second one (a hand-resubmitted script) stops instead of colliding.

    POSIX record locks (lockf), which network filesystems pass between nodes, unlike flock.
    """
    import fcntl

    path = out / "slurm" / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held while the cell runs
    try:
        locked = True
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                fh.seek(0)
                holder = fh.read().strip() or "?"
                raise TeeflError(f"cell {name} is being run by another job ({holder})") from None
            # a filesystem without POSIX locks: the driver's own jobs never overlap anyway
            print(f"warning: no lock on {path} ({exc.strerror}); running the cell without one")
            locked = False
        if locked:
            fh.seek(0)
            fh.truncate()
            fh.write(f"job {_job_key()} on {socket.gethostname()}, pid {os.getpid()}")
            fh.flush()
        yield
    finally:
        fh.close()


def _write_status(path: Path | None, status: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_cell_job(
    out: Path,
    name: str,
    *,
    data_dir: Path | None = None,
    status_file: Path | None = None,
    console: Console | None = None,
) -> int:
    """``teefl bench-cell``: run one cell of the study stored in OUT, as the driver would here.

    Writes ``status_file`` (exit code, error, job, node) at the end -- also when the job is
    cancelled (SIGTERM) -- and returns the exit code: 0 finished, 1 failed, 130 interrupted.
    """
    console = console or Console(highlight=False)
    out = out.resolve()
    status: dict[str, Any] = {"cell": name, "job": _job_key(), "node": socket.gethostname()}
    code, error = 1, None
    try:
        with _signals_as_interrupt():
            code, error = _run_one(out, name, data_dir, console)
    except KeyboardInterrupt:
        code, error = 130, "interrupted (the job was cancelled or reached its time limit)"
    except TeeflError as exc:
        code, error = 1, str(exc)
    finally:
        status.update(code=code, error=error, finished_wall=time.time())
        _write_status(status_file, status)
    if error:
        console.print(f"error: {error}", markup=False)
    return code


def _run_one(
    out: Path, name: str, data_dir: Path | None, console: Console
) -> tuple[int, str | None]:
    from teefl.plan import read_yaml

    path = out / "study.yaml"
    if not path.is_file():
        raise TeeflError(
            f"{path} not found on {socket.gethostname()}: put the study folder on a filesystem "
            "the nodes share with the login node"
        )
    study = study_from_dict(read_yaml(path, "study"), source=str(path))
    cells, _invalid = plan_cells(study, data_dir)
    cell = next((c for c in cells if c.name == name), None)
    if cell is None:
        raise TeeflError(
            f"{name} is not a cell of the study in {out} as {socket.gethostname()} sees it (a "
            "dataset missing on this node changes the cell names: put the datasets where every "
            "node reads them, or pass --data-dir)"
        )
    if cell.skip:
        raise TeeflError(f"{socket.gethostname()} cannot run cell {name}: {cell.skip}")
    with _cell_lock(out, name):
        if cell_finished(out / name):
            console.print(f"cell {name} is already finished in {out}: left as it is")
            return 0, None
        key_file = out / "keys" / "at-rest.key" if cell.config.at_rest == "sealed" else None
        o = run_cell(
            study,
            cell,
            out,
            data_dir=data_dir,
            console=console,
            key_file=key_file,
            executor={"kind": "slurm", "job": _job_key(), "node": socket.gethostname()},
        )
    if o.status != "completed":
        return 1, o.error
    acc = f"{100 * o.accuracy:.2f} %" if o.accuracy is not None else "-"
    t = f"{o.t_s:.1f} s" if o.t_s is not None else "-"
    console.print(f"cell {name} finished on {socket.gethostname()}: T {t}, accuracy {acc}")
    return 0, None
