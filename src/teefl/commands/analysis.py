"""CLI commands: summarize, report, fit, predict (the analysis of run directories).

Why every import of ``teefl.analysis`` sits inside the command functions: pandas, scipy and
matplotlib take a second or more to import, and ``teefl --help`` (or ``teefl run``) must not pay
for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from teefl.errors import TeeflError
from teefl.writable import writable_dir


def _console() -> Any:
    from rich.console import Console

    return Console()


def _esc(text: Any) -> str:
    """Escape rich markup: coefficient names such as ``C[tdx]`` look like style tags."""
    from rich.markup import escape

    return escape(str(text))


def _warn(console: Any, warnings: list[str]) -> None:
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {_esc(w)}", highlight=False, soft_wrap=True)


def summarize(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<run-id>).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only write summary.json.")] = False,
) -> None:
    """Rebuild RUN_DIR/summary.json from the run's events and print its key numbers."""
    from teefl.analysis.summary import write_summary

    if not run_dir.is_dir():
        raise TeeflError(f"no such run directory: {run_dir}")
    s = write_summary(run_dir)
    if quiet:
        return
    console = _console()
    wall = s["wall_clock"]
    comm = s["communication"]
    final = s.get("final") or {}
    env = s["environment"]
    console.print(
        f"[bold]{_esc(s['run_id'])}[/bold]  {_esc(run_dir / 'summary.json')}", highlight=False
    )
    lines = [
        ("status", s["status"]),
        ("model / dataset", f"{s.get('model')} / {s.get('dataset')}"),
        ("configuration", s["config_label"]),
        ("rounds", f"{s.get('rounds_completed')} of {s.get('rounds')}"),
        ("wall-clock T", f"{wall['hms']} ({_sec(wall['seconds'])}; {wall['source']})"),
        (
            "communication",
            f"{_sec(comm['mean'])} ± {_sec(comm['std'])} per collaborator per round "
            f"(n={comm['n']})",
        ),
        (
            "bytes moved",
            f"{s['bytes']['total']:,} (down {s['bytes']['download']:,}, "
            f"up {s['bytes']['upload']:,})",
        ),
        ("final accuracy / loss", f"{_num(final.get('accuracy'))} / {_num(final.get('loss'))}"),
        ("TEE", f"{env['tee']} ({env['tee_source']})"),
        ("hosts", ", ".join(env["hosts"]) or "-"),
    ]
    for k, v in lines:
        console.print(f"  {k:<22} {_esc(v)}", highlight=False)
    means = s["phase_means"]["collaborator"]
    if means:
        console.print(
            "  per round (s)          " + ", ".join(f"{p} {v:.3f}" for p, v in means.items() if v),
            highlight=False,
        )
    _warn(console, s["warnings"])


def _sec(v: Any) -> str:
    return f"{v:.3f} s" if isinstance(v, int | float) else "-"


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories, or folders holding them (searched 2 levels deep)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("report"),
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the fit.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """Tables I-III, per-phase breakdown, overhead model and figures -> OUT/report.md."""
    from teefl.analysis.console import print_report
    from teefl.analysis.report import make_report

    writable_dir(out, "report directory", "--out")
    result = make_report(run_dirs, out, resamples=resamples, seed=seed)
    print_report(_console(), result, out)


def fit(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="CSV files (model,dataset,config,time) or run directories / folders of runs."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the fit as JSON to this file.")
    ] = None,
    plot_dir: Annotated[
        Path | None,
        typer.Option("--plot-dir", help="Also draw the overhead-terms figure per model here."),
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples (runs resampled).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    level: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
) -> None:
    """Fit T = T_base*(1 + sum C_k x_k) per model by NNLS, with bootstrap intervals and R^2."""
    from teefl.analysis.console import print_fit
    from teefl.analysis.fitting import draw_fit, fit_inputs, write_fit

    # outputs first: a read-only target is one line now, not a traceback after the bootstrap
    if out is not None:
        writable_dir(out.parent, "directory of --out", "--out")
    if plot_dir is not None:
        writable_dir(plot_dir, "plot directory", "--plot-dir")
    result, notes = fit_inputs(inputs, resamples=resamples, seed=seed, level=level)
    console = _console()
    print_fit(console, result, level)
    _warn(console, notes + result["warnings"])
    if out is not None:
        write_fit(result, out)
        console.print(f"wrote {out}", highlight=False)
    if plot_dir is not None:
        for png in draw_fit(result, plot_dir):
            console.print(f"wrote {png}", highlight=False)


def predict(
    fit_file: Annotated[Path, typer.Option("--fit", help="JSON written by 'teefl fit --out'.")],
    baseline: Annotated[
        str,
        typer.Option(help="Wall-clock of a plain (baseline) run: seconds, HH:MM or HH:MM:SS."),
    ],
    model: Annotated[
        str | None, typer.Option(help="Only this model (default: every model in the fit).")
    ] = None,
) -> None:
    """Predict wall-clock under each fitted configuration and each single mechanism."""
    from rich.table import Table

    from teefl.analysis import prediction
    from teefl.analysis.timefmt import format_hms, parse_duration

    seconds = parse_duration(baseline, what="--baseline")
    try:
        data = json.loads(fit_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TeeflError(f"no such fit file: {fit_file}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TeeflError(f"cannot read fit file {fit_file}: {exc}") from None
    if not isinstance(data, dict):
        raise TeeflError(f"{fit_file} is not a teefl fit file")
    rows = prediction.predict(data, seconds, model=model)
    level = round(100 * float((data.get("bootstrap") or {}).get("level", 0.95)))
    console = _console()
    console.print(f"baseline {format_hms(seconds)} ({seconds:.0f} s)", highlight=False)
    t = Table(show_edge=False, header_style="bold")
    for c in ("model", "configuration", "factor", "predicted T", "seconds", f"{level} % interval"):
        t.add_column(c, justify="left" if c in ("model", "configuration") else "right")
    t.add_column("note")
    for r in rows:
        t.add_row(
            _esc(r["model"]),
            _esc(r["config"] + ("" if r["kind"] == "measured" else " *")),
            f"x{r['factor']:.3f}" if r["factor"] is not None else "-",
            format_hms(r["seconds"]),
            f"{r['seconds']:.0f}" if r["seconds"] is not None else "-",
            _esc(prediction.format_time_interval(r["low"], r["high"])),
            _esc(r["note"]),
        )
    console.print(t)
    if any(r["kind"] == "single" for r in rows):
        console.print(
            "* single mechanism added to the baseline (not measured as such; from its coefficient)",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add this group's commands to the teefl app."""
    app.command("summarize")(summarize)
    app.command("report")(report)
    app.command("fit")(fit)
    app.command("predict")(predict)
