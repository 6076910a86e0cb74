"""`teefl fit` without the printing: observations from CSV files and run directories, the fit,
its JSON file and its figures.

Why here and not in the command: the bench (`teefl.bench.finish.finish_study`) fits a study's
results too, and the bench may not import the CLI layer (tests/unit/core/test_import_rules.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from teefl.analysis import observations, perfmodel
from teefl.analysis.report import collect, form_groups
from teefl.errors import TeeflError


def fit_inputs(
    inputs: Sequence[Path], *, resamples: int, seed: int, level: float
) -> tuple[dict[str, Any], list[str]]:
    """Fit T = T_base*(1 + sum C_k x_k) to CSV files and run directories (or folders of runs).

    Returns the fit (`perfmodel.fit`) and notes for the reader (runs excluded, plans mixed).
    """
    obs: list[observations.Observation] = []
    run_paths: list[Path] = []
    for p in inputs:
        if p.is_file():
            obs += observations.read_times_csv(p)
        elif p.is_dir():
            run_paths.append(p)
        else:
            raise TeeflError(f"no such file or directory: {p}")
    notes: list[str] = []
    if run_paths:
        entries, excluded = collect(run_paths)
        notes += [f"excluded {p}: {r}" for p, r in excluded]
        groups = form_groups(entries)
        if len(groups) > 1:
            keys = sorted({k for g in groups for k in g.differs})
            notes.append(
                f"the runs come from {len(groups)} plans that differ in {', '.join(keys)}; they "
                "are fitted together here (teefl report keeps them apart)"
            )
        obs += observations.observations_from_summaries(e.summary for e in entries)
    result = perfmodel.fit(
        obs, resamples=resamples, seed=seed, level=level, sources=[str(p) for p in inputs]
    )
    return result, notes


def write_fit(result: dict[str, Any], out: Path) -> None:
    """The fit as JSON (what `teefl predict --fit` reads)."""
    try:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise TeeflError(f"cannot write {out}: {exc.strerror}") from None


def draw_fit(result: dict[str, Any], plot_dir: Path) -> list[Path]:
    """The overhead-terms figure of each model into ``plot_dir``; the files written."""
    from teefl.analysis.plots import overhead_chart, slug

    return [
        overhead_chart(mf, plot_dir / f"overhead_{slug(model)}.png")
        for model, mf in result["models"].items()
    ]
