"""The end of a study: what `teefl report` and `teefl fit` do, on everything in OUT, and the
paper's Tables II and III printed to the console."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teefl.bench.cell import cell_finished
from teefl.bench.study import Study
from teefl.errors import TeeflError
from teefl.writable import writable_dir

if TYPE_CHECKING:
    from teefl.bench.runner import StudyResult


def finish_study(
    study: Study, out: Path, console: Console, result: StudyResult | None = None
) -> None:
    """What `teefl report` and `teefl fit` do, on everything in OUT, and Tables II/III."""
    from teefl.analysis.console import print_fit, print_report, print_warnings
    from teefl.analysis.fitting import fit_inputs, write_fit
    from teefl.analysis.report import make_report

    if not any(cell_finished(d) for d in out.iterdir() if d.is_dir()):
        console.print("[yellow]no finished cell yet: nothing to report[/yellow]")
        return
    resamples = study.report.resamples
    try:
        writable_dir(out / "report", "report directory")
        report = make_report([out], out / "report", resamples=resamples, seed=0)
    except TeeflError as exc:
        console.print(f"[yellow]report not written: {escape(str(exc))}[/yellow]")
        return
    print_report(console, report, out / "report")
    print_tables(out, console)
    console.print("\n[bold]Overhead model[/bold] (teefl fit): T = T_base · (1 + Σ C_k · x_k)")
    try:
        fit, notes = fit_inputs([out], resamples=resamples, seed=0, level=0.95)
        print_fit(console, fit, 0.95)
        print_warnings(console, notes + fit["warnings"])
        write_fit(fit, out / "fit.json")
        console.print(f"wrote {out / 'fit.json'}", highlight=False)
    except TeeflError as exc:
        console.print(f"[yellow]not fitted: {escape(str(exc))}[/yellow]")
    if result is not None:
        result.report = out / "report" / "report.md"
        result.fit = out / "fit.json"


def print_tables(out: Path, console: Console) -> None:
    """Tables II and III (paper layout: configurations x model/dataset) for each report group."""
    from teefl.analysis import tables
    from teefl.analysis.report import collect, form_groups
    from teefl.analysis.timefmt import format_both

    entries, _excluded = collect([out])
    groups = form_groups(entries)
    for g in groups:
        head = f" (group {g.gid})" if len(groups) > 1 else ""
        ss = g.summaries
        _pivot(
            console,
            tables.table2_wallclock(ss),
            lambda r: f"{format_both(r['mean_s'])}, n={r['n']}",
            f"Table II — wall-clock time T{head}",
        )
        _pivot(
            console,
            tables.table3_communication(ss),
            lambda r: f"{r['mean_s']:.3f} ± {r['std_s']:.3f}",
            f"Table III — communication s per collaborator per round{head}",
        )


def _pivot(console: Console, df: Any, fmt: Any, title: str) -> None:
    from teefl.analysis.tables import config_sort_key

    if df.empty:
        return
    columns = sorted({(r.model, r.dataset) for r in df.itertuples()})
    lookup = {(r["model"], r["dataset"], r["config"]): r for r in df.to_dict("records")}
    t = Table(title=title, header_style="bold", title_justify="left")
    t.add_column("configuration")
    for m, d in columns:
        t.add_column(f"{m}\n{d}", justify="right")
    for cfg in sorted(set(df["config"]), key=config_sort_key):
        row = [escape(cfg)]
        for m, d in columns:
            r = lookup.get((m, d, cfg))
            row.append(escape(fmt(r)) if r else "-")
        t.add_row(*row)
    console.print(t)
