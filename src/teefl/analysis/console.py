"""The report's and the fit's results on a rich console: what `teefl report` / `teefl fit` and
the bench (after a study) print.

Why one place: the bench may not import the CLI layer, and both must print the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teefl.analysis import perfmodel
from teefl.analysis.timefmt import format_both

_EXACT = " [yellow](exact fit: as many runs as parameters; no interval -- see warning)[/yellow]"


def esc(text: Any) -> str:
    """Escape rich markup: coefficient names such as ``C[tdx]`` look like style tags."""
    return escape(str(text))


def print_warnings(console: Console, warnings: list[str]) -> None:
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {esc(w)}", highlight=False, soft_wrap=True)


def print_report(console: Console, result: dict[str, Any], out: Path) -> None:
    """What `analysis.report.make_report` returned: warnings, exclusions, where it wrote."""
    print_warnings(console, result["warnings"])
    for path, reason in result["excluded"]:
        console.print(f"[yellow]excluded:[/yellow] {esc(path)}: {esc(reason)}", highlight=False)
    console.print(
        f"{result['runs']} runs in {len(result['groups'])} group(s); wrote "
        f"{len(result['files'])} files to {out}/ -- open {result['report']}",
        highlight=False,
    )


def print_fit(console: Console, result: dict[str, Any], level: float) -> None:
    """Per model: R², the coefficients with their intervals, measured vs predicted T."""
    pct = round(100 * level)
    for model, mf in result["models"].items():
        console.print(
            f"\n[bold]{esc(model)}[/bold]: {mf['runs']} runs"
            + (f" ({mf['runs_skipped']} skipped)" if mf["runs_skipped"] else "")
            + f", R² = {_r(mf['r2'])} (on T - T_base), {_r(mf['r2_wallclock'])} (on T)"
            + ("" if mf.get("intervals_estimable", True) else _EXACT),
            highlight=False,
        )
        t = Table(show_edge=False, header_style="bold")
        for c in ("coefficient", "value", f"{pct} % interval", "resamples"):
            t.add_column(c, justify="left" if c == "coefficient" else "right")
        for term, co in mf["coefficients"].items():
            t.add_row(
                esc(f"C[{term}]"),
                f"{co['value']:.4f}" if co["value"] is not None else "not identifiable",
                esc(perfmodel.format_interval(co["low"], co["high"], "{:.4f}")),
                str(co["valid_resamples"]),
            )
        console.print(t)
        t = Table(show_edge=False, header_style="bold")
        for c in ("dataset", "configuration", "n", "measured T", "predicted T", "error"):
            t.add_column(c, justify="left" if c in ("dataset", "configuration") else "right")
        for p in mf["predictions"]:
            t.add_row(
                esc(p["dataset"]),
                esc(p["config"]),
                str(p["n"]),
                format_both(p["measured"]),
                format_both(p["predicted"]),
                f"{p['error_pct']:+.1f} %" if p["error_pct"] is not None else "-",
            )
        console.print(t)


def _r(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else "-"
