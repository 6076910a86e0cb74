"""``teefl report``: the paper's tables, the overhead model and its figures from run directories.

Why groups: runs are only comparable when they trained the same thing the same way. Two runs
whose plans differ in anything but the security configuration, the dataset, the model (a table
axis) or incidental keys (name, seed, network addresses, dataset location) -- e.g. 3 rounds versus
100 -- are put in different groups, each with its own tables and fit, and report.md says which
keys split them. Nothing is mixed silently.

The report never writes into the run directories: they may be read-only copies from other hosts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from teefl.analysis import observations, perfmodel, plots, tables
from teefl.analysis.loader import find_run_dirs
from teefl.analysis.summary import load_summary
from teefl.analysis.timefmt import format_both
from teefl.errors import TeeflError
from teefl.rundir import RunDir as Layout

#: Plan keys (dotted prefixes) that may differ inside one group: the security configuration, the
#: dataset and model (table axes), and keys that do not change the work done.
IGNORED_PLAN_KEYS = (
    "name",
    "seed",
    "network",
    "security",
    "dataset.name",
    "dataset.root",
    "model.name",
    # how and where the parties ran: a TEE launcher or a host label is a configuration, not
    # a different experiment (a TDX host's runs must merge with a plain host's)
    "runtime",
    # security configuration, should a plan carry it at the top level
    "launcher",
    "isolation",
    "tee",
    "attestation",
    "at_rest",
)


@dataclass
class RunEntry:
    """One run directory as the report sees it."""

    path: Path
    summary: dict[str, Any]
    plan: dict[str, Any] | None
    group: str = ""


@dataclass
class Group:
    """Runs whose plans agree outside `IGNORED_PLAN_KEYS`."""

    gid: str
    key: str
    entries: list[RunEntry] = field(default_factory=list)
    differs: dict[str, Any] = field(default_factory=dict)

    @property
    def summaries(self) -> list[dict[str, Any]]:
        return [e.summary for e in self.entries]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED_PLAN_KEYS)


def plan_signature(plan: Mapping[str, Any] | None) -> dict[str, Any]:
    """The plan keys that must agree for runs to be compared (see `IGNORED_PLAN_KEYS`)."""
    if plan is None:
        return {"(plan.yaml)": "missing"}
    return {k: v for k, v in sorted(flatten(plan).items()) if not _ignored(k)}


def collect(paths: Sequence[Path | str]) -> tuple[list[RunEntry], list[tuple[str, str]]]:
    """Load every run under ``paths``; return usable runs and (path, reason) for excluded ones."""
    included: list[RunEntry] = []
    excluded: list[tuple[str, str]] = []
    seen: dict[str, Path] = {}
    for d in find_run_dirs(paths):
        try:
            summary = load_summary(d)
        except TeeflError as exc:
            excluded.append((str(d), str(exc)))
            continue
        plan = None
        plan_file = Layout(d).plan
        if plan_file.is_file():
            try:
                loaded = yaml.safe_load(plan_file.read_text(encoding="utf-8"))
                plan = loaded if isinstance(loaded, dict) else {}
            except (OSError, yaml.YAMLError):
                plan = None
        rid = str(summary.get("run_id"))
        if rid in seen:
            excluded.append((str(d), f"duplicate of run {rid} already read from {seen[rid]}"))
            continue
        seen[rid] = d
        status = summary.get("status")
        t = (summary.get("wall_clock") or {}).get("seconds")
        if status != "completed":
            excluded.append((str(d), f"status {status!r} (only completed runs are compared)"))
        elif t is None:
            excluded.append((str(d), "wall-clock time unknown (no aggregator events)"))
        elif not summary.get("model"):
            excluded.append((str(d), "model unknown (run.json missing)"))
        else:
            included.append(RunEntry(d, summary, plan))
    return included, excluded


def form_groups(entries: Sequence[RunEntry]) -> list[Group]:
    """Split runs by plan signature; each group records the keys in which groups differ."""
    groups: dict[str, Group] = {}
    sigs: dict[str, dict[str, Any]] = {}
    for e in entries:
        sig = plan_signature(e.plan)
        key = json.dumps(sig, sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Group(gid=f"g{len(groups) + 1}", key=key)
            sigs[key] = sig
        groups[key].entries.append(e)
        e.group = groups[key].gid
    if len(groups) > 1:
        all_keys = set().union(*(s.keys() for s in sigs.values()))
        varying = sorted(
            k
            for k in all_keys
            if len({json.dumps(s.get(k), default=str) for s in sigs.values()}) > 1
        )
        for key, g in groups.items():
            g.differs = {k: sigs[key].get(k, "(unset)") for k in varying}
    return list(groups.values())


def _fit_markdown(mf: Mapping[str, Any], level: float) -> str:
    pct = round(100 * level)
    lines = [
        f"Runs used: {mf['runs']}"
        + (f" ({mf['runs_skipped']} skipped)" if mf.get("runs_skipped") else "")
        + f"; R² (on T - T_base) = {_num(mf.get('r2'))}"
        + f"; R² (on T) = {_num(mf.get('r2_wallclock'))}"
        + (
            ""
            if mf.get("intervals_estimable", True)
            else " -- **exact fit** (as many runs as parameters): R² = 1 by construction and no "
            f"{pct} % interval can be estimated; repeat each configuration"
        ),
        "",
        f"| coefficient | value | {pct} % bootstrap interval | resamples used |",
        "|---|---|---|---|",
    ]
    for term, co in mf["coefficients"].items():
        val = f"{co['value']:.4f}" if co["value"] is not None else "not identifiable"
        lines.append(
            f"| C[{term}] | {val} | {perfmodel.format_interval(co['low'], co['high'], '{:.4f}')} "
            f"| {co['valid_resamples']} |"
        )
    lines += [
        "",
        "| dataset | configuration | runs | measured T | predicted T | error |",
        "|---|---|---|---|---|---|",
    ]
    for p in mf["predictions"]:
        err = f"{p['error_pct']:+.1f} %" if p.get("error_pct") is not None else "-"
        lines.append(
            f"| {p['dataset']} | {p['config']} | {p['n']} | {format_both(p['measured'])} "
            f"| {format_both(p['predicted'])} | {err} |"
        )
    base = ", ".join(
        f"{d}: {format_both(v['t_base'])} from {v['baseline_runs']} run(s)"
        for d, v in mf["datasets"].items()
    )
    lines += ["", f"T_base per dataset: {base}."]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else "-"


def _write_csv(df: pd.DataFrame, path: Path, written: list[Path]) -> None:
    df.to_csv(path, index=False)
    written.append(path)


def make_report(
    paths: Sequence[Path | str],
    out_dir: Path | str,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Write report.md, CSV tables, PNG figures and fit JSON into ``out_dir``.

    Returns ``{report, files, groups, runs, excluded, warnings}`` for the CLI to print.
    """
    out = Path(out_dir)
    entries, excluded = collect(paths)
    if not entries:
        reasons = "; ".join(f"{p}: {r}" for p, r in excluded[:5])
        raise TeeflError(f"no completed run to report on ({reasons or 'no runs found'})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TeeflError(f"cannot create output directory {out}: {exc.strerror}") from None
    groups = form_groups(entries)
    multi = len(groups) > 1
    written: list[Path] = []
    warnings: list[str] = []
    md: list[str] = [
        "# teefl report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(entries)} completed runs "
        f"({len(excluded)} excluded) found under: {', '.join(str(p) for p in paths)}.",
        "",
        "Definitions: wall-clock T = the aggregator's `run` span (start to final model written); "
        "communication time = `download` + `upload` of one collaborator in one round; "
        "std = sample standard deviation.",
        "",
        "## Groups",
        "",
    ]
    if multi:
        md.append(
            "The runs' plans differ in more than the security configuration, model and dataset, "
            "so they are reported as separate groups (keys that may differ inside a group: "
            + ", ".join(f"`{k}`" for k in IGNORED_PLAN_KEYS)
            + ")."
        )
        md.append("")
    else:
        md.append(
            "All runs share one plan apart from the security configuration, model and dataset: "
            "one group."
        )
        md.append("")
    md += [
        "| group | runs | models | datasets | configurations | differs in |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        ss = g.summaries
        configs = {str(s.get("config_label")) for s in ss}
        diff = "; ".join(f"`{k}` = {json.dumps(v, default=str)}" for k, v in g.differs.items())
        md.append(
            f"| {g.gid} | {len(ss)} | {', '.join(sorted({str(s['model']) for s in ss}))} "
            f"| {', '.join(sorted({str(s.get('dataset')) for s in ss}))} "
            f"| {', '.join(sorted(configs, key=tables.config_sort_key))} "
            f"| {diff or '-'} |"
        )
    md.append("")

    all_summaries = [e.summary for e in entries]
    t1m, t1d = tables.table1_models(all_summaries), tables.table1_datasets(all_summaries)
    _write_csv(t1m, out / "table1_models.csv", written)
    _write_csv(t1d, out / "table1_datasets.csv", written)
    md += [
        "## Table I — models and datasets",
        "",
        "Sizes in MiB (2^20 bytes). Parameters exclude BatchNorm buffers; tensors counts every "
        "state tensor.",
        "",
        tables.to_markdown(
            t1m,
            {"size_mib": "size (MiB)", "tensors": "state tensors"},
        )
        if len(t1m)
        else "_no model information (run.json model_info or model/final.safetensors)_",
        "",
        tables.to_markdown(t1d, {"size_mib": "size (MiB)", "shape": "shape (CxHxW)"})
        if len(t1d)
        else "_no dataset information (run.json dataset_info)_",
        "",
        "CSV: [table1_models.csv](table1_models.csv), [table1_datasets.csv](table1_datasets.csv)",
        "",
    ]

    for g in groups:
        sfx = f"-{g.gid}" if multi else ""
        head = f" (group {g.gid})" if multi else ""
        ss = g.summaries
        t2 = tables.table2_wallclock(ss)
        t3 = tables.table3_communication(ss)
        ph = tables.phase_breakdown(ss)
        runs = tables.runs_table(ss)
        for name, df in (
            (f"table2_wallclock{sfx}.csv", t2),
            (f"table3_communication{sfx}.csv", t3),
            (f"phases{sfx}.csv", ph),
            (f"runs{sfx}.csv", runs),
        ):
            _write_csv(df, out / name, written)
        md += [
            f"## Table II — wall-clock time{head}",
            "",
            "HH:MM:SS (seconds), mean over n repeats.",
            "",
            tables.pivot_markdown(t2, lambda r: f"{format_both(r['mean_s'])}, n={r['n']}"),
            "",
            f"CSV: [table2_wallclock{sfx}.csv](table2_wallclock{sfx}.csv)",
            "",
            f"## Table III — communication time per collaborator per round{head}",
            "",
            "Seconds, mean ± std over collaborators, rounds and repeats.",
            "",
            tables.pivot_markdown(t3, lambda r: f"{r['mean_s']:.3f} ± {r['std_s']:.3f}"),
            "",
            f"CSV: [table3_communication{sfx}.csv](table3_communication{sfx}.csv)",
            "",
            f"## Per-phase breakdown{head}",
            "",
            "Mean seconds per collaborator per round (aggregate: the aggregator's time per round).",
            "",
            tables.to_markdown(ph),
            "",
        ]
        for model in sorted(set(ph["model"])):
            png = out / f"phases_{plots.slug(model)}{sfx}.png"
            plots.phase_chart(ph, model, png)
            written.append(png)
            md += [f"![phases of {model}]({png.name})", ""]

        md += [f"## Overhead model{head}", ""]
        obs = observations.observations_from_summaries(ss)
        try:
            fit = perfmodel.fit(
                obs, resamples=resamples, seed=seed, level=level, sources=[str(p) for p in paths]
            )
        except TeeflError as exc:
            md += [f"Not fitted: {exc}", ""]
            warnings.append(f"{g.gid}: overhead model not fitted: {exc}")
            fit = None
        if fit is not None:
            fit_path = out / f"fit{sfx}.json"
            fit_path.write_text(json.dumps(fit, indent=2) + "\n", encoding="utf-8")
            written.append(fit_path)
            coef_rows, pred_rows = [], []
            for model, mf in fit["models"].items():
                for term, co in mf["coefficients"].items():
                    coef_rows.append(
                        {"model": model, "term": term, **co, "members": "+".join(co["members"])}
                    )
                for p in mf["predictions"]:
                    pred_rows.append({"model": model, **p})
            _write_csv(pd.DataFrame(coef_rows), out / f"coefficients{sfx}.csv", written)
            _write_csv(pd.DataFrame(pred_rows), out / f"fit_predictions{sfx}.csv", written)
            md += [
                "T(d, s) = T_base(d) · (1 + Σ_k C_k · x_k(s)), C_k ≥ 0 by NNLS on T - T_base, "
                f"{resamples} bootstrap resamples of runs (seed {seed}).",
                "",
            ]
            for w in fit["warnings"]:
                md.append(f"- warning: {w}")
            if fit["warnings"]:
                md.append("")
            for model, mf in fit["models"].items():
                png = out / f"overhead_{plots.slug(model)}{sfx}.png"
                plots.overhead_chart(mf, png)
                written.append(png)
                md += [
                    f"### {model}",
                    "",
                    _fit_markdown(mf, level),
                    "",
                    f"![overhead terms of {model}]({png.name})",
                    "",
                ]
            warnings += [f"{g.gid}: {w}" for w in fit["warnings"]]
            md += [
                f"JSON: [fit{sfx}.json](fit{sfx}.json), "
                f"CSV: [coefficients{sfx}.csv](coefficients{sfx}.csv)",
                "",
            ]

        md += [f"## Runs{head}", "", tables.to_markdown(runs), ""]
        run_warnings = [
            (e.summary.get("run_id"), w) for e in g.entries for w in e.summary.get("warnings") or []
        ]
        if run_warnings:
            md += ["Notes from the runs:", ""]
            md += [f"- {rid}: {w}" for rid, w in run_warnings]
            md.append("")

    if excluded:
        md += ["## Excluded runs", ""]
        md += [f"- `{p}`: {r}" for p, r in excluded]
        md.append("")
    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    written.insert(0, report)
    return {
        "report": report,
        "files": written,
        "groups": groups,
        "runs": len(entries),
        "excluded": excluded,
        "warnings": warnings,
    }
