"""The overhead model of the paper, fitted per model by non-negative least squares.

Exact definition (brief): for each model, over all datasets d and configurations s,

    T(d, s) = T_base(d) * (1 + sum_k C_k * x_k(s))

with T_base(d) the mean wall-clock of the baseline runs on d and x_k(s) in {0, 1}. The C_k >= 0
are found by ``scipy.optimize.nnls`` on the absolute residuals: one row per run, design column
k = x_k(s) * T_base(d), target T - T_base(d). Each C_k gets a percentile bootstrap interval from
resampling runs (T_base recomputed inside every resample), and the fit reports R^2.

Why NNLS on absolute residuals rather than a log-linear fit: it is what the paper and its SGX
predecessor did, and a protection never makes a run faster -- a negative coefficient would be
noise, and clamping it keeps the other coefficients honest.

Identifiability: a coefficient is only meaningful if its mechanism is switched on and off
independently of the others in the runs. Mechanisms that are always on together (identical
columns) are merged into one joint term (``tdx&tls``) whose coefficient is the sum of theirs; a
term whose column is a combination of other columns is reported as not identifiable (no value).
A column that is "all ones" over the non-baseline rows is *not* a problem here: the model has no
intercept (T_base is measured, not fitted), so e.g. ``gramine`` in the paper's SGX table is
identified by the gramine-only runs even though every protected run uses gramine.

The runs come in as `teefl.analysis.observations`; what a fit predicts is
`teefl.analysis.prediction`.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from teefl.analysis import mechanisms as mech
from teefl.analysis.observations import Observation
from teefl.errors import TeeflError

FIT_SCHEMA = "teefl.fit/1"
JOINT = "&"


# -- fitting ------------------------------------------------------------------------------------


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    if a.shape[1] == 0:
        return np.zeros(0)
    coef, _ = nnls(a, y)
    return coef


def _identifiable(x: np.ndarray) -> np.ndarray:
    """Per column: is it outside the span of the other columns (and non-zero)?"""
    k = x.shape[1]
    if k == 0:
        return np.zeros(0, dtype=bool)
    full = np.linalg.matrix_rank(x)
    out = np.zeros(k, dtype=bool)
    for j in range(k):
        if not x[:, j].any():
            continue
        rest = np.delete(x, j, axis=1)
        out[j] = (np.linalg.matrix_rank(rest) if rest.shape[1] else 0) == full - 1
    return out


def _tbase(obs: Sequence[Observation]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for o in obs:
        if not o.config:
            sums[o.dataset].append(o.time)
    return {d: statistics.fmean(v) for d, v in sums.items()}


def _r2(y: np.ndarray, yhat: np.ndarray) -> float | None:
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    if ss_tot <= 0:
        return None
    return 1.0 - float(((y - yhat) ** 2).sum()) / ss_tot


def _terms(obs: Sequence[Observation]) -> tuple[list[tuple[str, ...]], list[str]]:
    """Merge mechanisms that are always on together into joint terms (identical columns)."""
    names = mech.normalize(m for o in obs for m in o.config)
    groups: dict[tuple[int, ...], list[str]] = {}
    for m in names:
        col = tuple(int(m in o.config) for o in obs)
        groups.setdefault(col, []).append(m)
    terms = [tuple(g) for g in groups.values()]
    terms.sort(key=lambda t: names.index(t[0]))
    return terms, list(names)


def _interval_warnings(
    model: str,
    used: Sequence[Observation],
    n_datasets: int,
    x: np.ndarray,
    level: float,
    warnings: list[str],
) -> tuple[int, bool]:
    """Residual degrees of freedom, and whether intervals can be estimated at all; warns.

    Why: with as many runs as parameters (one T_base per dataset, one coefficient per independent
    mechanism column) -- e.g. one run per configuration on one dataset -- the fit passes through
    every point. R² is then 1 by construction and every bootstrap resample that can fit at all
    reproduces the same coefficients, so the percentile "interval" has zero width: a statement of
    certainty made from no evidence. Such intervals are not reported, and the user is told why.
    A configuration measured only once is said too: its share of any interval rests on one run.
    """
    rank = int(np.linalg.matrix_rank(x)) if x.shape[1] else 0
    dof = len(used) - n_datasets - rank
    pct = round(100 * level)
    if dof <= 0:
        warnings.append(
            f"{model}: {len(used)} runs for {n_datasets + rank} parameters ({n_datasets} T_base, "
            f"{rank} coefficient(s)): the fit is exact, so R² = 1 says nothing and no {pct} % "
            "interval can be estimated (none is reported); repeat each configuration -- at "
            "least 2 runs each, 3 or more for useful intervals"
        )
        return dof, False
    runs_per_config: dict[str, int] = defaultdict(int)
    for o in used:
        runs_per_config[o.label] += 1
    single = sorted(label for label, n in runs_per_config.items() if n == 1)
    if single:
        warnings.append(
            f"{model}: too few runs for configuration(s) {', '.join(single)} (one run each): "
            f"their part of the {pct} % intervals rests on a single measurement and says nothing "
            "about run-to-run variation; repeat them"
        )
    return dof, True


def term_name(term: Sequence[str]) -> str:
    """``tdx`` for a single mechanism, ``tdx&tls`` for mechanisms only ever seen together."""
    return JOINT.join(term)


def fit_model(
    obs: Sequence[Observation],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Fit one model's coefficients; returns a JSON-ready dict (see `fit` for the layout).

    Raises `TeeflError` when no row can be used (no baseline run on any dataset).
    """
    if not obs:
        raise TeeflError("no runs to fit")
    model = obs[0].model
    warnings: list[str] = []
    tbase = _tbase(obs)
    used: list[Observation] = []
    skipped: dict[str, int] = defaultdict(int)
    for o in obs:
        if o.dataset in tbase:
            used.append(o)
        else:
            skipped[o.dataset] += 1
    for d, n in sorted(skipped.items()):
        warnings.append(
            f"{model}: dataset {d!r} has no baseline run, so T_base({d}) is undefined; its {n} "
            f"run(s) are skipped"
        )
    if not used:
        raise TeeflError(
            f"{model}: no baseline run on any dataset; the overhead model needs at least one "
            "baseline (config 'baseline') run per dataset"
        )
    for d, t in tbase.items():
        if t <= 0:
            raise TeeflError(f"{model}: baseline time on {d!r} is {t}; must be positive")
    all_names = mech.normalize(m for o in obs for m in o.config)
    terms, names = _terms(used)
    if not terms:
        raise TeeflError(
            f"{model}: only baseline runs (on the datasets with a baseline); nothing to fit -- "
            "add runs with a security mechanism"
        )
    for m in all_names:
        if m not in names:
            warnings.append(
                f"{model}: mechanism {m!r} appears only in skipped runs; no coefficient"
            )
    for t in terms:
        if len(t) > 1:
            warnings.append(
                f"{model}: {', '.join(t)} are always on together in these runs, so their separate "
                f"costs cannot be told apart; fitting their joint coefficient "
                f"C[{term_name(t)}] (the sum of theirs) instead"
            )

    def design(rows: Sequence[Observation], tb: Mapping[str, float]) -> tuple[np.ndarray, ...]:
        x = np.array([[float(t[0] in o.config) for t in terms] for o in rows]).reshape(
            len(rows), len(terms)
        )
        base = np.array([tb[o.dataset] for o in rows])
        times = np.array([o.time for o in rows])
        return x, base, times

    x, base, times = design(used, tbase)
    a = x * base[:, None]
    y = times - base
    coef = _nnls(a, y)
    ident = _identifiable(x)
    for j, t in enumerate(terms):
        if not ident[j]:
            warnings.append(
                f"{model}: C[{term_name(t)}] is not identifiable: its on/off pattern across the "
                "runs is a combination of the other mechanisms'; no value is reported (vary it "
                "on its own in some runs)"
            )
    fitted = base * (1.0 + x @ coef) if len(terms) else base.copy()

    # seen configurations (their predictions are unique even if some C_k are not)
    configs = sorted({o.config for o in used}, key=lambda c: (len(c), mech.config_label(c)))
    cfg_x = np.array([[float(t[0] in c) for t in terms] for c in configs]).reshape(
        len(configs), len(terms)
    )
    cfg_factor = 1.0 + cfg_x @ coef if len(terms) else np.ones(len(configs))

    # bootstrap: resample runs, recompute T_base inside each resample
    rng = np.random.default_rng(seed)
    n = len(used)
    boot_c = np.full((resamples, len(terms)), np.nan)
    boot_f = np.full((resamples, len(configs)), np.nan)
    for b in range(resamples):
        sample = [used[i] for i in rng.integers(0, n, size=n)]
        tb = _tbase(sample)
        rows = [o for o in sample if o.dataset in tb]
        if not rows:
            continue
        xb, baseb, timesb = design(rows, tb)
        cb = _nnls(xb * baseb[:, None], timesb - baseb)
        okb = _identifiable(xb)
        boot_c[b, okb] = cb[okb]
        # a configuration's factor is determined by a resample only if its on/off pattern is in
        # the row space of the resample's design (e.g. not "gramine" alone when the resample
        # holds only gramine+sgx runs)
        rank_b = np.linalg.matrix_rank(xb) if len(terms) else 0
        for i in range(len(configs)):
            if not cfg_x[i].any():
                boot_f[b, i] = 1.0
            elif np.linalg.matrix_rank(np.vstack([xb, cfg_x[i]])) == rank_b:
                boot_f[b, i] = 1.0 + float(cfg_x[i] @ cb)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    dof, estimable = _interval_warnings(model, used, len(tbase), x, level, warnings)

    def interval(samples: np.ndarray) -> tuple[float | None, float | None, int]:
        good = samples[np.isfinite(samples)]
        if good.size == 0:
            return None, None, 0
        if not estimable:  # every resample reproduces the exact fit: a zero-width "interval"
            return None, None, int(good.size)
        return float(np.percentile(good, lo_q)), float(np.percentile(good, hi_q)), int(good.size)

    coefficients: dict[str, Any] = {}
    for j, t in enumerate(terms):
        low, high, valid = interval(boot_c[:, j])
        coefficients[term_name(t)] = {
            "value": float(coef[j]) if ident[j] else None,
            "low": low if ident[j] else None,
            "high": high if ident[j] else None,
            "identifiable": bool(ident[j]),
            "members": list(t),
            "valid_resamples": valid,
        }
        if ident[j] and estimable and resamples and valid < 0.5 * resamples:
            warnings.append(
                f"{model}: C[{term_name(t)}] could be estimated in only {valid} of {resamples} "
                "resamples (too few runs with and without it); its interval is unreliable"
            )

    config_rows = []
    for i, c in enumerate(configs):
        low, high, _ = interval(boot_f[:, i])
        config_rows.append(
            {
                "config": mech.config_label(c),
                "mechanisms": list(c),
                "factor": float(cfg_factor[i]),
                "factor_low": low,
                "factor_high": high,
            }
        )
    by_cell: dict[tuple[str, tuple[str, ...]], list[int]] = defaultdict(list)
    for i, o in enumerate(used):
        by_cell[(o.dataset, o.config)].append(i)
    predictions = []
    for (d, c), idx in sorted(by_cell.items(), key=lambda kv: (kv[0][0], len(kv[0][1]), kv[0][1])):
        measured = float(np.mean(times[idx]))
        predicted = float(fitted[idx[0]])
        predictions.append(
            {
                "dataset": d,
                "config": mech.config_label(c),
                "n": len(idx),
                "measured": measured,
                "predicted": predicted,
                "error_pct": 100.0 * (predicted - measured) / measured if measured else None,
            }
        )
    return {
        "model": model,
        "runs": len(used),
        "runs_skipped": sum(skipped.values()),
        "datasets": {
            d: {
                "t_base": tbase[d],
                "baseline_runs": sum(1 for o in used if o.dataset == d and not o.config),
            }
            for d in sorted(tbase)
        },
        "mechanisms": names,
        "coefficients": coefficients,
        "r2": _r2(y, fitted - base),
        "r2_wallclock": _r2(times, fitted),
        "residual_dof": dof,
        "intervals_estimable": estimable,
        "configs": config_rows,
        "predictions": predictions,
        "warnings": warnings,
    }


def fit(
    obs: Sequence[Observation],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    sources: Sequence[str] = (),
) -> dict[str, Any]:
    """Fit every model in ``obs`` separately; models that cannot be fitted become warnings.

    Layout: ``{schema, sources, bootstrap: {resamples, seed, level}, models: {name: fit_model},
    warnings}``.
    """
    if not obs:
        raise TeeflError("no completed runs with a wall-clock time to fit")
    if resamples < 0:
        raise TeeflError("--resamples must be >= 0")
    if not 0 < level < 1:
        raise TeeflError("--level must be between 0 and 1 (e.g. 0.95)")
    by_model: dict[str, list[Observation]] = defaultdict(list)
    for o in obs:
        by_model[o.model].append(o)
    models: dict[str, Any] = {}
    warnings: list[str] = []
    for name in sorted(by_model):
        try:
            models[name] = fit_model(by_model[name], resamples=resamples, seed=seed, level=level)
        except TeeflError as exc:
            warnings.append(str(exc))
            continue
        warnings += models[name]["warnings"]
    if not models:
        raise TeeflError("; ".join(warnings) or "nothing to fit")
    return {
        "schema": FIT_SCHEMA,
        "sources": list(sources),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": level},
        "models": models,
        "warnings": warnings,
    }


def format_interval(low: float | None, high: float | None, fmt: str = "{:.3f}") -> str:
    """``[low, high]`` or ``-`` when the bootstrap could not produce one."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"[{fmt.format(low)}, {fmt.format(high)}]"
