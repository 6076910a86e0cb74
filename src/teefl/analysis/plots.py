"""Figures for the report: per-phase breakdown and the overhead terms (the paper's Figure 1).

Why the Agg backend, selected inside each function: reports are made on headless hosts (the TDX
machine itself, CI) and importing this module must not touch a display or slow down ``teefl
--help``; matplotlib is only imported when a figure is actually drawn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from teefl.analysis.tables import BREAKDOWN_PHASES

PHASE_COLORS = {
    "wait": "#bdbdbd",
    "download": "#1f77b4",
    "validate": "#9467bd",
    "train": "#2ca02c",
    "serialize": "#8c564b",
    "upload": "#ff7f0e",
    "aggregate": "#d62728",
}
PHASE_LABELS = {
    "wait": "wait (round not open)",
    "download": "download (global model)",
    "validate": "validate (global + local)",
    "train": "train",
    "serialize": "serialize update",
    "upload": "upload (update)",
    "aggregate": "aggregate (aggregator)",
}
_TERM_COLORS = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def slug(text: str) -> str:
    """A file-name-safe form of a model name (``mobilenet_v3_small`` stays as is)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grouped_positions(datasets: list[str]) -> tuple[list[float], list[tuple[str, float, float]]]:
    """x positions with a gap between consecutive datasets, and (name, first x, last x) groups."""
    xs: list[float] = []
    groups: list[tuple[str, float, float]] = []
    x = 0.0
    for i, d in enumerate(datasets):
        if i and d != datasets[i - 1]:
            x += 0.6
        xs.append(x)
        if i and d == datasets[i - 1]:
            groups[-1] = (d, groups[-1][1], x)
        else:
            groups.append((d, x, x))
        x += 1.0
    return xs, groups


def _label_axis(ax: Any, xs: list[float], configs: list[str], datasets: list[str]) -> None:
    """Configurations as (rotated) tick labels, datasets named above their group of bars.

    Why: labels like ``gramine+sgx+tls`` under every bar collide when bars are narrow; naming
    the dataset once per group keeps every label legible.
    """
    from matplotlib.transforms import blended_transform_factory

    _, groups = _grouped_positions(datasets)
    ax.set_xticks(xs)
    ax.set_xticklabels(configs, rotation=30, ha="right", rotation_mode="anchor", fontsize=9)
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (name, lo, hi) in enumerate(groups):
        ax.text(
            (lo + hi) / 2,
            1.01,
            name,
            transform=trans,
            ha="center",
            va="bottom",
            fontsize=10,
            fontweight="bold",
        )
        if i:
            ax.axvline(lo - 0.8, color="#888888", linewidth=0.8, linestyle=":")
    if xs:
        ax.set_xlim(xs[0] - 0.7, xs[-1] + 0.7)


def time_unit(max_seconds: float) -> tuple[str, float]:
    """Pick a readable unit for an axis: seconds below 5 min, minutes below 5 h, else hours."""
    if max_seconds < 300:
        return "s", 1.0
    if max_seconds < 5 * 3600:
        return "min", 60.0
    return "h", 3600.0


def phase_chart(df: pd.DataFrame, model: str, path: Path | str) -> Path:
    """Stacked bars of mean seconds per collaborator per round, one bar per dataset/config."""
    plt = _pyplot()
    path = Path(path)
    sub = df[df["model"] == model].reset_index(drop=True)
    n = len(sub)
    longest = max((len(str(c)) for c in sub["config"]), default=8)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n + 3.5), 4.4 + 0.06 * longest))
    totals = sub[list(BREAKDOWN_PHASES)].sum(axis=1) if n else pd.Series([0.0])
    unit, scale = time_unit(float(totals.max()) if n else 0.0)
    bottom = [0.0] * n
    xs, _ = _grouped_positions([str(d) for d in sub["dataset"]])
    for phase in BREAKDOWN_PHASES:
        vals = [float(v) / scale for v in sub[phase]] if n else []
        if not any(vals):
            continue
        ax.bar(
            xs,
            vals,
            bottom=bottom,
            color=PHASE_COLORS[phase],
            label=PHASE_LABELS[phase],
            edgecolor="white",
            linewidth=0.5,
            hatch="//" if phase == "aggregate" else None,
        )
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    _label_axis(ax, xs, [str(c) for c in sub["config"]], [str(d) for d in sub["dataset"]])
    ax.set_xlabel("security configuration (grouped by dataset)")
    ax.set_ylabel(f"time per round ({unit})")
    ax.set_title(
        f"{model}: where a round's time goes\n(mean per collaborator per round over rounds and "
        "repeats; aggregate = aggregator)",
        fontsize=11,
        pad=22,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="phase")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # headroom: bars never touch the frame
    fig.tight_layout()
    # "tight" keeps the outside legend and two-line titles inside the image
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def overhead_chart(model_fit: Mapping[str, Any], path: Path | str) -> Path:
    """The paper's Figure 1: T_base(d) plus one stacked term C_k * T_base(d) per mechanism.

    One bar per measured (dataset, configuration); a black marker shows the measured mean T so
    the reader sees how well the linear model explains each bar. Mechanisms whose coefficient is
    not identifiable are drawn together as one "not attributable" segment.
    """
    plt = _pyplot()
    path = Path(path)
    preds = list(model_fit.get("predictions") or [])
    coefs = model_fit.get("coefficients") or {}
    datasets = model_fit.get("datasets") or {}
    terms = list(coefs)
    colors = {t: _TERM_COLORS[i % len(_TERM_COLORS)] for i, t in enumerate(terms)}
    top = max([max(p["measured"], p["predicted"]) for p in preds] or [0.0])
    unit, scale = time_unit(top)
    n = len(preds)
    longest = max((len(p["config"]) for p in preds), default=8)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 3.5), 4.4 + 0.06 * longest))
    xs, _ = _grouped_positions([p["dataset"] for p in preds])
    base = [datasets[p["dataset"]]["t_base"] / scale for p in preds]
    ax.bar(xs, base, color="#4c72b0", label="T_base (baseline mean)", edgecolor="white")
    bottom = list(base)
    labelled: set[str] = set()
    unattributed = [0.0] * n
    for i, p in enumerate(preds):
        mechs = set(p["config"].split("+")) if p["config"] != "baseline" else set()
        explained = 0.0
        for t in terms:
            co = coefs[t]
            members = set(co.get("members") or [t])
            if not members <= mechs or not mechs:
                continue
            if co.get("value") is None:
                continue
            h = co["value"] * base[i]
            ax.bar(
                [xs[i]],
                [h],
                bottom=[bottom[i]],
                color=colors[t],
                edgecolor="white",
                label=None if t in labelled else f"C[{t}]·T_base",
            )
            labelled.add(t)
            bottom[i] += h
            explained += h
        rest = p["predicted"] / scale - base[i] - explained
        if rest > 1e-9 * max(1.0, base[i]):
            unattributed[i] = rest
    if any(unattributed):
        ax.bar(
            xs,
            unattributed,
            bottom=bottom,
            color="#cccccc",
            hatch="xx",
            edgecolor="white",
            label="not attributable (collinear mechanisms)",
        )
    ax.scatter(
        xs,
        [p["measured"] / scale for p in preds],
        marker="D",
        color="black",
        zorder=5,
        label="measured T (mean)",
    )
    _label_axis(ax, xs, [p["config"] for p in preds], [p["dataset"] for p in preds])
    ax.set_xlabel("security configuration (grouped by dataset)")
    ax.set_ylabel(f"wall-clock time ({unit})")
    r2 = model_fit.get("r2")
    r2_text = f", R² = {r2:.3f}" if isinstance(r2, int | float) else ""
    ax.set_title(
        f"{model_fit.get('model')}: overhead terms of the wall-clock time\n"
        f"T = T_base·(1 + Σ C_k·x_k), NNLS over {model_fit.get('runs')} runs{r2_text}",
        fontsize=11,
        pad=22,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # headroom: bars never touch the frame
    fig.tight_layout()
    # "tight" keeps the outside legend and two-line titles inside the image
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
