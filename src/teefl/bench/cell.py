"""One cell of a study: run it as a real federation into OUT/<cell>, and read what a run left.

Why a module of its own: every executor (`teefl.bench.executor`, `teefl.bench.slurm`) runs cells
and the runner (`teefl.bench.runner`) reads them; keeping the cell below all three is what lets
them import it without importing each other.

Why a cell is "finished" only when its run.json says completed *and* summary.json exists: the
summary is written last, so a runner killed after the federation but before the summary leaves a
cell that is rerun rather than half-counted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from teefl.bench.matrix import Cell, build_plan
from teefl.bench.study import Study
from teefl.errors import TeeflError
from teefl.rundir import RunDir

CELL_SCHEMA = "teefl.bench-cell/1"


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # completed | kept | failed | skipped
    run_id: str | None = None
    wall_s: float | None = None  # the whole cell: certificates, start-up, run, summary
    t_s: float | None = None  # wall-clock T of the run (aggregator's run span)
    accuracy: float | None = None
    error: str | None = None


def cell_finished(cell_dir: Path) -> bool:
    """run.json says completed and summary.json exists (it is written last)."""
    rd = RunDir(cell_dir)
    return rd.read().get("status") == "completed" and rd.summary.is_file()


def read_cell_record(cell_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(RunDir(cell_dir).bench_record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _summary(cell_dir: Path) -> dict[str, Any]:
    try:
        return json.loads(RunDir(cell_dir).summary.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _reap_orphans(cell_dir: Path) -> None:
    """Stop processes a killed runner left behind in this cell (their env/*.json name them).

    Why: the parties run in sessions of their own, so a SIGKILLed runner leaves them training;
    they must not keep writing into a cell that is about to be rerun.
    """
    marker = str(cell_dir.resolve())
    for env_file in RunDir(cell_dir).env_files():
        try:
            pid = int(json.loads(env_file.read_text(encoding="utf-8")).get("pid"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, TypeError, json.JSONDecodeError):
            continue
        if marker in cmdline and pid != os.getpid():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
                time.sleep(0.5)


def _move_aside(cell_dir: Path, out: Path) -> Path:
    _reap_orphans(cell_dir)
    dest = out / "attic" / time.strftime("%Y%m%d-%H%M%S") / cell_dir.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest = dest.with_name(f"{dest.name}-{os.getpid()}")
    os.replace(cell_dir, dest)
    return dest


def run_cell(
    study: Study,
    cell: Cell,
    out: Path,
    *,
    data_dir: Path | None = None,
    console: Console | None = None,
    topology: Any = None,
    key_file: Path | None = None,
    executor: dict[str, Any] | None = None,
) -> CellOutcome:
    """Run one cell as a real federation into OUT/<cell> (as ``teefl run`` does).

    ``executor`` (e.g. the Slurm job and node) is recorded in the cell's bench.json.
    """
    from teefl.federation.launcher import launch, new_run_id
    from teefl.federation.report import finish_run
    from teefl.federation.setup import issue_throwaway_pki
    from teefl.plan import require_transport
    from teefl.resolved import transport_of, with_overrides

    console = console or Console(stderr=True)
    cell_dir = (out / cell.name).resolve()
    if cell_dir.exists():
        _move_aside(cell_dir, out)
    plan = build_plan(study, cell, key_file=key_file)
    network: dict[str, Any] = {"mode": "loopback"}
    if topology is not None:
        # the certificate must name the address collaborators dial: set it before issuing
        plan = with_overrides(
            plan,
            {"network.host": topology.aggregator_ip, "network.listen": None},
            "the namespaces'",
        )
        network = topology.describe()
    t0 = time.monotonic()
    started = time.time()
    rid = new_run_id(cell.name)
    cell_dir.mkdir(parents=True)
    if transport_of(plan) != "none" and plan.security.tls.ca is None:
        issue_throwaway_pki(plan, cell_dir, Console(file=io.StringIO()))
    require_transport(plan)
    before = topology.link_bytes() if topology is not None else None
    wrap = topology.wrap if topology is not None else None
    try:
        launch(plan, cell_dir, rid, data_dir=data_dir, console=console, progress=False, wrap=wrap)
    except TeeflError as exc:
        RunDir(cell_dir).update(error=str(exc))
        return CellOutcome(cell, "failed", rid, time.monotonic() - t0, error=str(exc))
    if topology is not None and before is not None:
        after = topology.link_bytes()
        network["bytes"] = {
            k: {d: after[k][d] - before.get(k, {}).get(d, 0) for d in ("tx", "rx")} for k in after
        }
    wall = time.monotonic() - t0
    record = {
        "schema": CELL_SCHEMA,
        "study": study.name,
        "cell": cell.name,
        "model": cell.model,
        "dataset": cell.dataset,
        "config": cell.config.name,
        "axes": {
            "transport": cell.config.transport,
            "launcher": cell.config.launcher,
            "at_rest": cell.config.at_rest,
            "attestation": cell.config.attestation,
        },
        "rounds": cell.rounds,
        "repeat": cell.repeat,
        "host_label": study.host_label,
        "notes": cell.notes,
        "network": network,
        "started_wall": started,
        "wall_s": wall,
        "run_id": rid,
    }
    if executor is not None:
        record["executor"] = executor
    RunDir(cell_dir).bench_record.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    summary = finish_run(cell_dir)  # summary.json last: it marks the cell finished
    return _outcome_from(cell, "completed", summary, wall)


def _outcome_from(
    cell: Cell, status: str, summary: dict[str, Any], wall: float | None
) -> CellOutcome:
    return CellOutcome(
        cell,
        status,
        summary.get("run_id"),
        wall,
        (summary.get("wall_clock") or {}).get("seconds"),
        (summary.get("final") or {}).get("accuracy"),
    )


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP take Ctrl-C's path, so every finally block (namespaces!) runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
