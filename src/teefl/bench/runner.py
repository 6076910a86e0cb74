"""`teefl bench`: run every cell of a study as a real federation, resumably, then report.

The output directory is the unit of resumption::

    OUT/study.yaml            the study as run (base plan inlined); a rerun must match it
    OUT/<cell>/               one run directory per cell (docs/architecture.md), plus
    OUT/<cell>/bench.json     the cell's coordinates, network and wall time of the whole cell
    OUT/keys/at-rest.key      the study's key for sealed cells (generated once)
    OUT/attic/<time>/<cell>/  half-finished cells moved aside before their rerun
    OUT/report/               teefl report output; OUT/fit.json: teefl fit output

Why a cell is "finished" only when its run.json says completed *and* summary.json exists: the
summary is written last, so a runner killed after the federation but before the summary leaves a
cell that is rerun rather than half-counted. A half-finished cell is moved aside (never deleted:
its logs may explain a crash) and rerun from scratch -- a federation cannot resume mid-round
without changing what is measured.

Why the cell directory name is deterministic but the run id is not: the name is how a rerun finds
the cell; the run id (time + random) is how `teefl report A/ B/` tells runs of two hosts apart.

One study per OUT and one runner at a time: `teefl.bench.outdir`; the report, the fit and the
tables at the end: `teefl.bench.finish`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from teefl.bench.cell import (
    CellOutcome,
    _outcome_from,
    _signals_as_interrupt,
    _summary,
    cell_finished,
    read_cell_record,
)
from teefl.bench.executor import Executor, NetnsExecutor, RunContext
from teefl.bench.finish import finish_study
from teefl.bench.matrix import Cell, Config, plan_cells
from teefl.bench.outdir import check_study_copy, lock
from teefl.bench.study import Study
from teefl.errors import TeeflError


@dataclass
class StudyResult:
    out: Path
    outcomes: list[CellOutcome] = field(default_factory=list)
    invalid: list[tuple[Config, str]] = field(default_factory=list)
    elapsed_s: float = 0.0
    predicted_s: float | None = None
    report: Path | None = None
    fit: Path | None = None

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


# -- one cell -----------------------------------------------------------------------------------


# -- estimates ----------------------------------------------------------------------------------


class _Eta:
    """Remaining time from finished cells: the mean wall time of cells like the one to come.

    "Like" = same model, dataset and rounds (configurations differ by a few per cent; models by
    an order of magnitude), else same model, else any finished cell.
    """

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str, int], list[float]] = defaultdict(list)
        self.by_model: dict[str, list[float]] = defaultdict(list)
        self.all: list[float] = []

    def add(self, cell: Cell, seconds: float | None) -> None:
        if seconds is None:
            return
        self.by_key[(cell.model, cell.dataset, cell.rounds)].append(seconds)
        self.by_model[cell.model].append(seconds)
        self.all.append(seconds)

    def estimate(self, cell: Cell) -> float | None:
        for v in (
            self.by_key.get((cell.model, cell.dataset, cell.rounds)),
            self.by_model.get(cell.model),
            self.all,
        ):
            if v:
                return statistics.fmean(v)
        return None

    def remaining(self, cells: list[Cell]) -> float | None:
        if not self.all:
            return None
        return sum(self.estimate(c) or 0.0 for c in cells)


def _mmss(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


# -- the study ----------------------------------------------------------------------------------


def _describe(
    console: Console,
    study: Study,
    out: Path,
    cells: list[Cell],
    invalid: list,
    executor: str | None = None,
) -> None:
    runnable = [c for c in cells if not c.skip]
    console.print(
        f"teefl bench [bold]{escape(study.name)}[/bold]: {len(cells)} cells "
        f"({len(runnable)} runnable here), {study.axes.repeats} repeat(s), network "
        f"{study.network.mode}"
        + (f" capped at {study.network.bandwidth}" if study.network.bandwidth else "")
        + (f", {escape(executor)}" if executor else "")
        + f"\n  output: {escape(str(out))}",
        highlight=False,
    )
    for cfg, reason in invalid:
        console.print(
            f"[yellow]not a valid configuration, left out:[/yellow] {escape(cfg.name)}: "
            f"{escape(reason)}",
            highlight=False,
        )
    skipped: dict[str, list[str]] = defaultdict(list)
    for c in cells:
        if c.skip:
            skipped[c.skip].append(c.name)
    for reason, names in skipped.items():
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        console.print(
            f"[yellow]skipped {len(names)} cell(s):[/yellow] {escape(reason)} -- {escape(shown)}",
            highlight=False,
        )
    for note in dict.fromkeys(n for c in cells for n in c.notes):
        console.print(f"[yellow]{escape(note)}[/yellow]", highlight=False)


def _cell_line(i: int, n: int, o: CellOutcome, eta: float | None) -> str:
    c = o.cell
    head = f"[{i}/{n}] {c.model} {c.dataset} {c.config.name} r{c.repeat}"
    if o.status == "failed":
        return f"[red]✗ {escape(head)}: failed: {escape(o.error or '?')}[/red]"
    t = f"{_mmss(o.t_s)} ({o.t_s:.1f} s)" if o.t_s is not None else "-"
    acc = f"{100 * o.accuracy:.2f} %" if o.accuracy is not None else "-"
    return (
        f"[green]✓[/green] {escape(head)}  T {t}  accuracy {acc}  "
        f"cell {_mmss(o.wall_s)}  ETA {_mmss(eta) if eta is not None else '-'}"
    )


def make_executor(study: Study, *, detach: bool = False) -> Executor:
    """The executor the study asks for (``executor.kind``, ``network.mode``).

    Here rather than in `teefl.bench.executor`: the Slurm executor builds on that module, so
    only a module above both may choose between them.
    """
    if study.executor.kind == "slurm":
        from teefl.bench.slurm import SlurmExecutor

        return SlurmExecutor(study.executor.slurm, detach=detach)
    if detach:
        raise TeeflError("--detach leaves cells running as Slurm jobs: it needs --executor slurm")
    if study.network.mode == "netns":
        return NetnsExecutor(study)
    return Executor()


def run_study(
    study: Study,
    out: Path,
    *,
    data_dir: Path | None = None,
    strict: bool = False,
    force: bool = False,
    dry_run: bool = False,
    report: bool = True,
    progress: bool = True,
    console: Console | None = None,
    executor: Executor | None = None,
) -> StudyResult:
    """Run (or resume) every runnable cell of ``study`` into ``out``; then report and fit.

    ``executor`` runs the cells (default: the one the study asks for, see
    `teefl.bench.executor`). Raises KeyboardInterrupt after cleaning up when interrupted (Ctrl-C
    or SIGTERM); a rerun with the same arguments continues where it stopped.
    """
    console = console or Console()
    out = Path(out).resolve()
    executor = executor or make_executor(study)
    cells, invalid = plan_cells(study, data_dir, launchers=executor.checks_launchers)
    result = StudyResult(out, invalid=invalid)
    _describe(console, study, out, cells, invalid, executor.describe())
    skipped = [c for c in cells if c.skip]
    if strict and skipped:
        raise TeeflError(
            f"--strict: {len(skipped)} cell(s) cannot run on this host: "
            + "; ".join(f"{c.name}: {c.skip}" for c in skipped[:5])
        )
    result.outcomes += [CellOutcome(c, "skipped", error=c.skip) for c in skipped]
    runnable = [c for c in cells if not c.skip]
    if not dry_run:
        executor.check()

    eta = _Eta()
    todo: list[Cell] = []
    for c in runnable:
        d = out / c.name
        if cell_finished(d):
            o = _outcome_from(c, "kept", _summary(d), read_cell_record(d).get("wall_s"))
            result.outcomes.append(o)
            eta.add(c, o.wall_s)
        else:
            todo.append(c)
    kept = len(runnable) - len(todo)
    if dry_run:
        _print_order(console, runnable, out)
        return result
    if not runnable:
        raise TeeflError("no cell of the study can run on this host (see the reasons above)")
    with lock(out):
        changed = check_study_copy(study, out, force=force)
        if changed:
            console.print(
                f"[yellow]--force: continuing {escape(str(out))} with a changed study "
                f"({escape(', '.join(changed[:8]))})[/yellow]",
                highlight=False,
            )
        if kept:
            console.print(f"kept {kept} finished cell(s) from an earlier run; {len(todo)} to run")
        before = eta.remaining(todo)
        if before is not None and todo:
            console.print(f"predicted from finished cells: {_mmss(before)} for {len(todo)} cells")
        key_file = None
        if any(c.config.at_rest == "sealed" for c in todo):
            key_file = _study_key(out)
        t_start = time.monotonic()
        try:
            _run_cells(
                executor, study, todo, out, data_dir, console, progress, eta, result, key_file
            )
        except KeyboardInterrupt:
            done = sum(1 for o in result.outcomes if o.status in ("completed", "kept"))
            console.print(
                f"[yellow]interrupted: {done} of {len(runnable)} cells finished; "
                f"{escape(executor.interrupted_note())}[/yellow]"
            )
            raise
        finally:
            result.elapsed_s = time.monotonic() - t_start
    if executor.detached:
        return result
    ran = result.count("completed")
    console.print(
        f"study {escape(study.name)}: {ran} cell(s) run in {_mmss(result.elapsed_s)}"
        + (
            f" (predicted after the first cell: {_mmss(result.predicted_s)})"
            if result.predicted_s is not None
            else ""
        )
        + f", {kept} kept, {result.count('failed')} failed, {len(skipped)} skipped",
        highlight=False,
    )
    if report:
        finish_study(study, out, console, result)
    return result


def _study_key(out: Path) -> Path:
    from teefl.security.sealed import write_key_file

    path = out / "keys" / "at-rest.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_key_file(path)
    return path


def _run_cells(
    executor: Executor,
    study: Study,
    todo: list[Cell],
    out: Path,
    data_dir: Path | None,
    console: Console,
    show: bool,
    eta: _Eta,
    result: StudyResult,
    key_file: Path | None,
) -> None:
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
        disable=not (show and console.is_terminal),
        transient=True,
    )
    n = len(todo)
    t0 = time.monotonic()
    with _signals_as_interrupt(), bars:
        task = bars.add_task("study", total=n, eta=_mmss(eta.remaining(todo)))
        ctx = RunContext(
            study,
            out,
            data_dir,
            key_file,
            bars.console,
            lambda text: bars.update(task, description=text),
        )
        left = list(todo)
        # closing: an executor's clean-up (namespaces) runs also when this loop stops early
        stream = executor.outcomes(ctx, todo)
        with contextlib.closing(stream):
            for i, o in enumerate(stream, start=1):
                cell = o.cell
                with contextlib.suppress(ValueError):
                    left.remove(cell)
                result.outcomes.append(o)
                if o.status == "completed":
                    eta.add(cell, o.wall_s)
                remaining = eta.remaining(left)
                if result.predicted_s is None and remaining is not None:
                    result.predicted_s = (time.monotonic() - t0) + remaining
                bars.update(task, advance=1, eta=_mmss(remaining))
                line = _cell_line(i, n, o, remaining)
                bars.console.print(line, highlight=False, soft_wrap=True)
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    bars.console.file.flush()  # a log file shows progress as it happens


def _print_order(console: Console, cells: list[Cell], out: Path) -> None:
    t = Table(title="run order", show_edge=False, header_style="bold")
    for col in ("#", "cell (directory in OUT)", "state"):
        t.add_column(col, no_wrap=True)
    for i, c in enumerate(cells, start=1):
        state = "finished" if cell_finished(out / c.name) else "to run"
        t.add_row(str(i), c.name, state)
    console.print(t)
