"""The Slurm executor of ``teefl bench``: every cell a job, the driver follows them.

Each cell is a whole federation (1 aggregator + N collaborator processes) inside one allocation
of one node, run by ``teefl bench-cell OUT CELL`` -- the same `run_cell` as on this host, so the
cell directory is the same. The cells go to Slurm as one job array whose throttle (``%1`` by
default) lets one cell run at a time: a cell's timings are what is measured, and a second cell on
the same node (or on the same switch, the same file server) would be load that is not in the
study. Cells that need other resources (``executor.slurm.cells``) are one job each instead, chained
with ``afterany`` dependencies in run order so that the same limit holds.

What lives in OUT (beside the cells)::

    OUT/slurm/cells-<n>.sbatch        the batch script of submission n (readable, resubmittable)
    OUT/slurm/jobs.json               which job (array task) runs which cell, per submission
    OUT/slurm/exit/<job>.json         written by a cell's job at its end: exit code, error, node
    OUT/slurm/logs/<name>-<job>.out   the job's output (the cell's own logs are in OUT/<cell>/logs)
    OUT/slurm/locks/<cell>.lock       held while a job runs the cell (two jobs never run one cell)

Why the driver can be killed: the jobs are the work and keep running. A rerun of the same command
finds, through jobs.json and squeue, the cells still queued or running and follows them instead of
submitting them again; finished cells are kept as on this host. Why OUT must be on a filesystem
the nodes share (home, project or scratch): the cells write their run directories there.

What is submitted (resources, the batch script) is `teefl.bench.slurm_script`'s; what runs inside
a job (``teefl bench-cell``) is `teefl.bench.slurm_job`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from teefl.bench.cell import (
    CellOutcome,
    _outcome_from,
    _summary,
    cell_finished,
    read_cell_record,
)
from teefl.bench.executor import Executor, RunContext
from teefl.bench.matrix import Cell
from teefl.bench.slurm_script import job_name, resources_for, sbatch_options, write_script
from teefl.bench.study import Study
from teefl.bench.study_slurm import SlurmSpec
from teefl.errors import TeeflError
from teefl.slurm import client

BOOK_SCHEMA = "teefl.bench-slurm/1"
#: how long a job that ended normally may take to show its exit file (network filesystems cache
#: directory listings for up to a minute on another node)
EXIT_FILE_GRACE_S = 60.0
#: how long the controller may stay silent before the driver gives up following
UNREACHABLE_LIMIT_S = 600.0


# -- the record of submissions ------------------------------------------------------------------


class JobBook:
    """OUT/slurm/jobs.json: every submission, and which job (array task) runs which cell."""

    def __init__(self, out: Path) -> None:
        self.path = out / "slurm" / "jobs.json"
        self.submissions: list[dict[str, Any]] = []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("submissions"), list):
                self.submissions = data["submissions"]
        except (OSError, json.JSONDecodeError):
            pass

    def next_number(self) -> int:
        return 1 + max((int(s.get("n", 0)) for s in self.submissions), default=0)

    def add(self, entry: dict[str, Any]) -> None:
        self.submissions.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".jobs.json.tmp")
        tmp.write_text(
            json.dumps({"schema": BOOK_SCHEMA, "submissions": self.submissions}, indent=2) + "\n",
            encoding="utf-8",
        )
        os.replace(tmp, self.path)

    def jobs(self) -> list[tuple[str, str, str]]:
        """(job key, job id to ask squeue about, cell name) of every recorded job, oldest first."""
        out = []
        for s in self.submissions:
            job, cells = str(s.get("job", "")), s.get("cells") or []
            if s.get("array"):
                out += [(f"{job}_{i}", job, name) for i, name in enumerate(cells)]
            elif cells:
                out.append((job, job, cells[0]))
        return out


@dataclass
class _Job:
    key: str
    job_id: str
    cell: Cell
    log: Path
    last: client.QueueEntry | None = None
    gone_since: float | None = None


def _log_path(out: Path, study: Study, key: str) -> Path:
    return out / "slurm" / "logs" / f"{job_name(study)}-{key}.out"


# -- the executor -------------------------------------------------------------------------------


class SlurmExecutor(Executor):
    """Cells as Slurm jobs, submitted from here and followed until each has finished."""

    name = "slurm"
    checks_launchers = False

    def __init__(self, spec: SlurmSpec, *, detach: bool = False) -> None:
        self.spec = spec
        self.detach = detach
        self.pending: list[_Job] = []

    def describe(self) -> str:
        parts = []
        if self.spec.partition:
            parts.append(f"partition {self.spec.partition}")
        parts.append(f"{self.spec.parallel} cell(s) at a time")
        return f"executor slurm ({', '.join(parts)})"

    def check(self) -> None:
        client.require("sbatch", "squeue", "scontrol", "scancel")
        client.check_partitions(
            [self.spec.partition, *(rule.partition for rule in self.spec.cells)]
        )

    def interrupted_note(self) -> str:
        if not self.pending:
            return super().interrupted_note()
        ids = sorted({j.job_id for j in self.pending}, key=lambda s: (len(s), s))
        return (
            f"{len(self.pending)} cell(s) stay queued or running in Slurm: run the same command "
            "again to follow them (they are not submitted twice), or stop them with: scancel "
            + " ".join(ids)
        )

    def outcomes(self, ctx: RunContext, todo: list[Cell]) -> Generator[CellOutcome, None, None]:
        if not todo:
            return
        out, study = ctx.out, ctx.study
        book = JobBook(out)
        by_name = {c.name: c for c in todo}
        recorded = [(k, j, n) for k, j, n in book.jobs() if n in by_name]
        live = client.queue({j for _k, j, _n in recorded}) if recorded else {}
        jobs: dict[str, _Job] = {}
        for key, job_id, name in recorded:
            if key in live and name not in jobs:
                jobs[name] = _Job(key, job_id, by_name[name], _log_path(out, study, key))
        if jobs:
            ids = sorted({j.job_id for j in jobs.values()}, key=lambda s: (len(s), s))
            ctx.console.print(
                f"following {len(jobs)} cell(s) still queued or running in Slurm from an earlier "
                f"run (job {', '.join(ids)}); they are not submitted again",
                highlight=False,
                soft_wrap=True,
            )
        fresh = [c for c in todo if c.name not in jobs]
        if fresh:
            for j in self._submit(ctx, fresh, book):
                jobs[j.cell.name] = j
        self.pending = [jobs[c.name] for c in todo]
        if self.detach:
            self.detached = True
            ctx.console.print(
                f"{len(self.pending)} cell(s) are in Slurm's hands; nothing here needs to keep "
                "running. Run the same command again to follow them and get the report.",
                highlight=False,
            )
            return
        yield from self._follow(ctx)

    # -- submission ---------------------------------------------------------------------------

    def _submit(self, ctx: RunContext, cells: list[Cell], book: JobBook) -> list[_Job]:
        out, study = ctx.out, ctx.study
        sdir = out / "slurm"
        for sub in ("logs", "exit", "locks"):
            (sdir / sub).mkdir(parents=True, exist_ok=True)
        opts = {c.name: sbatch_options(resources_for(self.spec, c)) for c in cells}
        n = book.next_number()
        parallel = self.spec.parallel
        common = dict(study=study, out=out, data_dir=ctx.data_dir)
        if len({tuple(o) for o in opts.values()}) == 1:
            script = write_script(
                sdir / f"cells-{n}.sbatch",
                cells=cells,
                options=opts[cells[0].name],
                parallel=parallel,
                **common,
            )
            job = client.submit(script)
            book.add(
                {
                    "n": n,
                    "job": job,
                    "array": True,
                    "script": script.name,
                    "cells": [c.name for c in cells],
                    "submitted_wall": time.time(),
                }
            )
            ctx.console.print(
                f"submitted {len(cells)} cell(s) to Slurm as job array {job} "
                f"({escape(str(script))}), {parallel} at a time",
                highlight=False,
                soft_wrap=True,
            )
            return [
                _Job(f"{job}_{i}", job, c, _log_path(out, study, f"{job}_{i}"))
                for i, c in enumerate(cells)
            ]
        # cells that need different resources: one job each, in run order, in `parallel` lanes
        submitted: list[str] = []
        jobs: list[_Job] = []
        try:
            for i, c in enumerate(cells):
                script = write_script(
                    sdir / f"cells-{n}-{i + 1:03d}.sbatch",
                    cells=[c],
                    options=opts[c.name],
                    parallel=None,
                    **common,
                )
                extra = (
                    [f"--dependency=afterany:{submitted[i - parallel]}"] if i >= parallel else []
                )
                job = client.submit(script, extra)
                submitted.append(job)
                book.add(
                    {
                        "n": n,
                        "job": job,
                        "array": False,
                        "script": script.name,
                        "cells": [c.name],
                        "dependency": extra[0].split("=", 1)[1] if extra else None,
                        "submitted_wall": time.time(),
                    }
                )
                jobs.append(_Job(job, job, c, _log_path(out, study, job)))
        except BaseException:
            # half a submission would run cells nobody follows: take it back
            with contextlib.suppress(TeeflError):
                client.cancel(submitted)
            raise
        ctx.console.print(
            f"submitted {len(cells)} cell(s) to Slurm as {len(cells)} jobs "
            f"({submitted[0]}..{submitted[-1]}, scripts {escape(str(sdir))}/cells-{n}-*.sbatch; "
            f"their resources differ), {parallel} at a time",
            highlight=False,
            soft_wrap=True,
        )
        return jobs

    # -- following ----------------------------------------------------------------------------

    def _follow(self, ctx: RunContext) -> Generator[CellOutcome, None, None]:
        pending = {j.key: j for j in self.pending}
        silent_since: float | None = None
        while pending:
            for key, j in list(pending.items()):
                status = _read_status(ctx.out, key)
                if status is not None:
                    del pending[key]
                    self.pending.remove(j)
                    yield self._finished(ctx, j, status)
            if not pending:
                break
            try:
                queue = client.queue({j.job_id for j in pending.values()})
            except client.SlurmUnavailable as exc:
                now = time.monotonic()
                if silent_since is None:
                    silent_since = now
                    ctx.console.print(
                        f"[yellow]Slurm does not answer ({escape(str(exc))}); still trying"
                        "[/yellow]",
                        highlight=False,
                    )
                elif now - silent_since > UNREACHABLE_LIMIT_S:
                    raise TeeflError(
                        f"Slurm has not answered for {UNREACHABLE_LIMIT_S / 60:.0f} min ({exc}); "
                        "the cells' jobs may still run: run the same command again later"
                    ) from None
                time.sleep(self.spec.poll)
                continue
            silent_since = None
            now = time.monotonic()
            for key, j in list(pending.items()):
                entry = queue.get(key)
                if entry is not None:
                    j.last, j.gone_since = entry, None
                    continue
                if _read_status(ctx.out, key) is not None:
                    continue  # finished between the two looks: taken on the next round
                try:
                    info = client.job_info(key)
                except client.SlurmUnavailable:
                    continue  # ask again on the next round
                state = (info or {}).get("JobState")
                if state in ("COMPLETED", "FAILED") or (state is None and j.last is not None):
                    # the script ran to its end: its exit file may show late on another node
                    j.gone_since = j.gone_since or now
                    if now - j.gone_since < EXIT_FILE_GRACE_S:
                        continue
                del pending[key]
                self.pending.remove(j)
                yield self._vanished(ctx, j, info)
            ctx.status(_status_text(pending.values()))
            if pending:
                time.sleep(self.spec.poll)

    def _finished(self, ctx: RunContext, j: _Job, status: dict[str, Any]) -> CellOutcome:
        d = ctx.out / j.cell.name
        code = status.get("code")
        if code == 0 and cell_finished(d):
            return _outcome_from(
                j.cell, "completed", _summary(d), read_cell_record(d).get("wall_s")
            )
        error = str(status.get("error") or f"the cell's job exited with code {code}")
        with contextlib.suppress(TeeflError):
            info = client.job_info(j.key) or {}
            state = info.get("JobState")
            if state in client.TERMINAL_STATES and state not in ("COMPLETED", "FAILED"):
                error = f"Slurm job {j.key} {state}"
        return CellOutcome(j.cell, "failed", error=_with_log(error, j.log))

    def _vanished(self, ctx: RunContext, j: _Job, info: dict[str, str] | None) -> CellOutcome:
        d = ctx.out / j.cell.name
        state = (info or {}).get("JobState")
        if state == "COMPLETED" and cell_finished(d):
            return _outcome_from(
                j.cell, "completed", _summary(d), read_cell_record(d).get("wall_s")
            )
        if state:
            reason = (info or {}).get("Reason", "None")
            error = f"Slurm job {j.key} {state}" + (f" ({reason})" if reason != "None" else "")
            if state in ("COMPLETED", "FAILED"):
                error += (
                    f" without writing {j.key}.json in {ctx.out / 'slurm' / 'exit'}: is the study "
                    "folder on a filesystem the nodes share?"
                )
        else:
            error = (
                f"Slurm job {j.key} left the queue without an exit status (cancelled before it "
                "started?)"
            )
        return CellOutcome(j.cell, "failed", error=_with_log(error, j.log))


def _completed(cell: Cell, d: Path) -> CellOutcome:
    return _outcome_from(cell, "completed", _summary(d), read_cell_record(d).get("wall_s"))


def _with_log(error: str, log: Path) -> str:
    return f"{error} (log: {log})" if log.is_file() else error


def _read_status(out: Path, key: str) -> dict[str, Any] | None:
    path = out / "slurm" / "exit" / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {"code": None, "error": f"unreadable exit status {path}"}
    return data if isinstance(data, dict) else {"code": None, "error": f"bad exit status {path}"}


def _status_text(jobs: Any) -> str:
    running = [j for j in jobs if j.last is not None and j.last.state == "RUNNING"]
    queued = [j for j in jobs if j not in running]
    if running:
        j = running[0]
        text = f"{j.cell.name} (job {j.key} on {j.last.nodes})"
        if len(running) > 1:
            text += f" +{len(running) - 1} running"
    else:
        reasons = sorted({j.last.reason for j in queued if j.last is not None} - {"None"})
        text = "waiting for Slurm" + (f" ({', '.join(reasons)})" if reasons else "")
    return text + (f", {len(queued)} queued" if running and queued else "")
