"""End of a `teefl run`: complete run.json, write summary.json, print the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from teefl.rundir import RunDir, collaborator_process


def _dataset_info(run_dir: Path) -> dict[str, Any] | None:
    """Dataset statistics as the collaborators saw them (the aggregator never loads data)."""
    for env_file in RunDir(run_dir).env_files(collaborator_process("")):
        try:
            ds = json.loads(env_file.read_text(encoding="utf-8")).get("dataset")
        except (OSError, json.JSONDecodeError):
            continue
        if ds:
            return {
                k: ds[k]
                for k in (
                    "name",
                    "source",
                    "train_samples",
                    "test_samples",
                    "shape",
                    "classes",
                    "size_bytes",
                )
                if k in ds
            }
    return None


def finish_run(run_dir: Path) -> dict[str, Any]:
    """Add dataset_info to run.json, then build and write summary.json."""
    from teefl.analysis.summary import write_summary

    info = _dataset_info(run_dir)
    rd = RunDir(run_dir)
    if info and "dataset_info" not in rd.read():
        rd.update(dataset_info=info)
    return write_summary(run_dir)


def _final_per_collaborator(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per-collaborator metrics of the final model, from the evaluation pass in metrics.jsonl."""
    for rec in reversed(RunDir(run_dir).read_metrics()):
        if rec.get("round") == "final":
            return rec.get("collaborators", {})
    return {}


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_summary(summary: dict[str, Any], console: Console, run_dir: Path) -> None:
    """The table a user reads at the end of `teefl run`."""
    final = _final_per_collaborator(run_dir)
    comm = (summary.get("communication") or {}).get("per_collaborator", {})
    moved = (summary.get("bytes") or {}).get("per_collaborator", {})
    table = Table(title=f"teefl run {summary.get('run_id')} -- {summary.get('status')}")
    for col, justify in (
        ("collaborator", "left"),
        ("samples", "right"),
        ("final accuracy", "right"),
        ("final loss", "right"),
        ("comm. s/round (mean ± std)", "right"),
        ("MB moved", "right"),
    ):
        table.add_column(col, justify=justify)
    for name in summary.get("collaborators") or []:
        f = final.get(name, {})
        c = comm.get(f"collaborator-{name}") or comm.get(name) or {}
        b = moved.get(f"collaborator-{name}") or moved.get(name) or {}
        acc = f.get("final.accuracy")
        table.add_row(
            name,
            str(int(f["samples"])) if "samples" in f else "-",
            "-" if acc is None else f"{100 * acc:.2f} %",
            _fmt_s(f.get("final.loss")),
            f"{_fmt_s(c.get('mean'))} ± {_fmt_s(c.get('std'))}"
            if c.get("mean") is not None
            else "-",
            f"{(b.get('download', 0) + b.get('upload', 0)) / 1e6:.1f}" if b else "-",
        )
    console.print(table)
    wall = summary.get("wall_clock") or {}
    fin = summary.get("final") or {}
    acc = fin.get("accuracy")
    console.print(
        f"wall-clock T: [bold]{wall.get('hms', '-')}[/bold] ({_fmt_s(wall.get('seconds'))} s)   "
        f"final model accuracy: [bold]{'-' if acc is None else f'{100 * acc:.2f} %'}[/bold]   "
        f"transport: {(summary.get('config') or {}).get('transport', '-')}"
    )
    from rich.markup import escape

    for failure in summary.get("failures") or []:  # the party's text: no markup of its own
        console.print(f"[red]failed:[/red] {escape(str(failure.get('summary')))}")
    console.print(f"run directory: {run_dir}")
