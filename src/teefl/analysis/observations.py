"""The overhead model's input: one `Observation` per run, from a CSV transcription of published
times or from run summaries (`teefl.analysis.perfmodel` fits them)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teefl.analysis import mechanisms as mech
from teefl.analysis.timefmt import parse_duration
from teefl.errors import TeeflError


@dataclass(frozen=True)
class Observation:
    """One run: which model on which dataset under which mechanisms took how long (seconds)."""

    model: str
    dataset: str
    config: tuple[str, ...]
    time: float
    run: str | None = None

    @property
    def label(self) -> str:
        return mech.config_label(self.config)


# -- input --------------------------------------------------------------------------------------


def read_times_csv(path: Path | str) -> list[Observation]:
    """Read ``model,dataset,config,time`` rows (time: seconds, HH:MM or HH:MM:SS).

    Why strict: a wrong row in a transcription of a published table would silently bend every
    coefficient, so any bad cell stops with the file, the line and what was wrong.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TeeflError(f"no such file: {path}") from None
    except OSError as exc:
        raise TeeflError(f"cannot read {path}: {exc.strerror}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise TeeflError(f"{path} is empty: expected a header model,dataset,config,time")
    reader = csv.reader(lines)
    header = [h.strip().lower() for h in next(reader)]
    need = ("model", "dataset", "config", "time")
    missing = [c for c in need if c not in header]
    if missing:
        raise TeeflError(
            f"{path}: header must name columns model,dataset,config,time (missing: "
            f"{', '.join(missing)})"
        )
    idx = {c: header.index(c) for c in need}
    run_col = header.index("run") if "run" in header else None
    out: list[Observation] = []
    for lineno, row in enumerate(reader, start=2):
        if len(row) < len(header):
            raise TeeflError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        where = f" ({path}:{lineno})"
        model, dataset = row[idx["model"]].strip(), row[idx["dataset"]].strip()
        if not model or not dataset:
            raise TeeflError(f"{path}:{lineno}: model and dataset must not be empty")
        config = mech.parse_config(row[idx["config"]], where=where)
        t = parse_duration(row[idx["time"]], what=f"time{where}")
        run = row[run_col].strip() if run_col is not None else f"{path.name}:{lineno}"
        out.append(Observation(model, dataset, config, t, run))
    if not out:
        raise TeeflError(f"{path} has a header but no rows")
    return out


def observations_from_summaries(summaries: Iterable[Mapping[str, Any]]) -> list[Observation]:
    """Completed runs with a known wall-clock time, model and dataset become observations."""
    out = []
    for s in summaries:
        t = (s.get("wall_clock") or {}).get("seconds")
        if s.get("status") != "completed" or t is None or not s.get("model"):
            continue
        out.append(
            Observation(
                model=str(s["model"]),
                dataset=str(s.get("dataset") or "?"),
                config=tuple(s.get("mechanisms") or ()),
                time=float(t),
                run=str(s.get("run_id")),
            )
        )
    return out
