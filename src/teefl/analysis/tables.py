"""The paper's tables, computed from run summaries as pandas DataFrames (long form, CSV-ready).

Why long form: a CSV with one row per (model, dataset, configuration) is what a spreadsheet or a
second analysis wants; the pivoted, human-shaped view (configurations down, model/dataset across,
as in the paper) is produced only when rendering markdown.

Every statistic says what it is over:
- Table II: mean (and sample std) of the wall-clock T over repeats (runs) of a cell.
- Table III: mean +- sample std of the communication time (download + upload) over all
  (collaborator, round) pairs of all repeats of a cell.
- Phases: mean seconds per collaborator per round, pooled over collaborators, rounds, repeats.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from teefl.analysis import mechanisms as mech
from teefl.analysis.timefmt import format_hm, format_hms

MIB = 1024 * 1024
#: Phases shown in the breakdown, in round order; ``validate`` = validate_global + validate_local.
BREAKDOWN_PHASES = ("wait", "download", "validate", "train", "serialize", "upload", "aggregate")

Summary = Mapping[str, Any]


def config_sort_key(label: str) -> tuple[int, tuple[int, ...], str]:
    """Baseline first, then fewer mechanisms first, in canonical mechanism order."""
    mechs = mech.parse_config(label) if label else ()
    return (len(mechs), tuple(mech.ORDER.index(m) if m in mech.ORDER else 99 for m in mechs), label)


def _cell(s: Summary) -> tuple[str, str, str]:
    return (str(s.get("model")), str(s.get("dataset")), str(s.get("config_label") or "baseline"))


def _sorted_cells(keys: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return sorted(set(keys), key=lambda k: (k[0], k[1], config_sort_key(k[2])))


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _shape(shape: Any) -> str:
    if isinstance(shape, list | tuple) and shape:
        return "x".join(str(x) for x in shape)
    return "-"


def table1_models(summaries: Iterable[Summary]) -> pd.DataFrame:
    """Table I (models): parameters, size (MiB) and state tensors per (model, dataset).

    Per dataset because the input channels and classes change the parameter count (the paper
    notes +0.41 % for CIFAR-100 and -0.06 % for MNIST).
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for s in summaries:
        info = s.get("model_info")
        key = (str(s.get("model")), str(s.get("dataset")))
        if not isinstance(info, dict) or key in rows:
            continue
        size = info.get("size_bytes")
        rows[key] = {
            "model": key[0],
            "dataset": key[1],
            "parameters": info.get("parameters"),
            "size_mib": round(size / MIB, 2) if isinstance(size, int | float) else None,
            "tensors": info.get("tensors"),
            "source": s.get("model_info_source") or "run.json",
        }
    cols = ["model", "dataset", "parameters", "size_mib", "tensors", "source"]
    return pd.DataFrame([rows[k] for k in sorted(rows)], columns=cols)


def table1_datasets(summaries: Iterable[Summary]) -> pd.DataFrame:
    """Table I (datasets): samples, shape, classes and size (MiB) per dataset."""
    rows: dict[str, dict[str, Any]] = {}
    for s in summaries:
        info = s.get("dataset_info")
        name = str(s.get("dataset"))
        if not isinstance(info, dict) or name in rows:
            continue
        size = info.get("size_bytes")
        rows[name] = {
            "dataset": name,
            "train_samples": info.get("train_samples"),
            "test_samples": info.get("test_samples"),
            "shape": _shape(info.get("shape")),
            "classes": info.get("classes"),
            "size_mib": round(size / MIB, 1) if isinstance(size, int | float) else None,
        }
    cols = ["dataset", "train_samples", "test_samples", "shape", "classes", "size_mib"]
    return pd.DataFrame([rows[k] for k in sorted(rows)], columns=cols)


def table2_wallclock(summaries: Iterable[Summary]) -> pd.DataFrame:
    """Table II: wall-clock T per (model, dataset, configuration), mean over repeats."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for s in summaries:
        t = (s.get("wall_clock") or {}).get("seconds")
        if t is not None:
            cells[_cell(s)].append(float(t))
    rows = []
    for key in _sorted_cells(cells):
        v = cells[key]
        mean = statistics.fmean(v)
        rows.append(
            {
                "model": key[0],
                "dataset": key[1],
                "config": key[2],
                "n": len(v),
                "mean_s": round(mean, 3),
                "std_s": round(_std(v), 3),
                "hms": format_hms(mean),
                "hm": format_hm(mean),
            }
        )
    cols = ["model", "dataset", "config", "n", "mean_s", "std_s", "hms", "hm"]
    return pd.DataFrame(rows, columns=cols)


def table3_communication(summaries: Iterable[Summary]) -> pd.DataFrame:
    """Table III: communication time per collaborator per round, mean +- std."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    runs: dict[tuple[str, str, str], int] = defaultdict(int)
    for s in summaries:
        key = _cell(s)
        runs[key] += 1
        for r in s.get("per_round") or []:
            for col in (r.get("collaborators") or {}).values():
                c = col.get("communication")
                if isinstance(c, int | float):
                    cells[key].append(float(c))
    rows = []
    for key in _sorted_cells(cells):
        v = cells[key]
        rows.append(
            {
                "model": key[0],
                "dataset": key[1],
                "config": key[2],
                "runs": runs[key],
                "n": len(v),
                "mean_s": round(statistics.fmean(v), 4),
                "std_s": round(_std(v), 4),
            }
        )
    cols = ["model", "dataset", "config", "runs", "n", "mean_s", "std_s"]
    return pd.DataFrame(rows, columns=cols)


def phase_breakdown(summaries: Iterable[Summary]) -> pd.DataFrame:
    """Mean seconds per collaborator per round in each phase (aggregate: aggregator per round)."""
    cells: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    runs: dict[tuple[str, str, str], int] = defaultdict(int)
    for s in summaries:
        key = _cell(s)
        runs[key] += 1
        for r in s.get("per_round") or []:
            for col in (r.get("collaborators") or {}).values():
                ph = col.get("phases") or {}
                for p in BREAKDOWN_PHASES[:-1]:
                    if p == "validate":
                        v = ph.get("validate_global", 0.0) + ph.get("validate_local", 0.0)
                    else:
                        v = ph.get(p, 0.0)
                    cells[key][p].append(float(v))
            agg = r.get("aggregator") or {}
            cells[key]["aggregate"].append(float(agg.get("aggregate", 0.0)))
    rows = []
    for key in _sorted_cells(cells):
        row: dict[str, Any] = {"model": key[0], "dataset": key[1], "config": key[2]}
        row["runs"] = runs[key]
        for p in BREAKDOWN_PHASES:
            v = cells[key].get(p) or []
            row[p] = round(statistics.fmean(v), 4) if v else 0.0
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "dataset", "config", "runs", *BREAKDOWN_PHASES])


def runs_table(summaries: Iterable[Summary]) -> pd.DataFrame:
    """One row per run: the CSV doubles as input for ``teefl fit`` (model,dataset,config,time)."""
    rows = []
    for s in summaries:
        t = (s.get("wall_clock") or {}).get("seconds")
        env = s.get("environment") or {}
        final = s.get("final") or {}
        rows.append(
            {
                "model": s.get("model"),
                "dataset": s.get("dataset"),
                "config": s.get("config_label") or "baseline",
                "time": round(float(t), 3) if t is not None else None,
                "run": s.get("run_id"),
                "hms": format_hms(t),
                "rounds": s.get("rounds_completed"),
                "accuracy": final.get("accuracy"),
                "tee": env.get("tee"),
                "hosts": " ".join(env.get("hosts") or []),
            }
        )
    cols = [
        "model",
        "dataset",
        "config",
        "time",
        "run",
        "hms",
        "rounds",
        "accuracy",
        "tee",
        "hosts",
    ]
    df = pd.DataFrame(rows, columns=cols)
    if len(df):
        df = df.sort_values(["model", "dataset", "config", "run"], key=_sort_col).reset_index(
            drop=True
        )
    return df


def _sort_col(col: pd.Series) -> pd.Series:
    if col.name == "config":
        return col.map(lambda c: config_sort_key(str(c)))
    return col.astype(str)


# -- markdown -----------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def to_markdown(df: pd.DataFrame, headers: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency)."""
    headers = headers or {}
    cols = list(df.columns)
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in rec) + " |")
    return "\n".join(lines)


def pivot_markdown(df: pd.DataFrame, cell: Callable[[dict[str, Any]], str]) -> str:
    """Paper layout: one row per configuration, one column per model / dataset.

    ``cell`` renders one long-form row (a dict) as the text of its cell.
    """
    if df.empty:
        return "_no data_"
    columns = sorted({(r.model, r.dataset) for r in df.itertuples()})
    configs = sorted(set(df["config"]), key=config_sort_key)
    lookup = {(r["model"], r["dataset"], r["config"]): r for r in df.to_dict("records")}
    lines = [
        "| configuration | " + " | ".join(f"{m} / {d}" for m, d in columns) + " |",
        "|---|" + "|".join("---" for _ in columns) + "|",
    ]
    for c in configs:
        vals = []
        for m, d in columns:
            r = lookup.get((m, d, c))
            vals.append(cell(r) if r else "-")
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
