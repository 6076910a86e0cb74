"""What the fitted overhead model predicts: wall-clock under each configuration of a fit file and
under each single mechanism, from a measured baseline, with the bootstrap's intervals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from teefl.analysis import mechanisms as mech
from teefl.analysis.perfmodel import FIT_SCHEMA, JOINT
from teefl.analysis.timefmt import format_hms
from teefl.errors import TeeflError


def predict(
    fit_result: Mapping[str, Any], baseline: float, model: str | None = None
) -> list[dict[str, Any]]:
    """Predicted wall-clock under each configuration of the fit and each single mechanism.

    Why both: the seen configurations are what was measured (their factor is identified even when
    single coefficients are not); single mechanisms let a user budget a deployment that adds one
    protection to a plain run. Intervals come from the bootstrap.
    """
    if fit_result.get("schema") != FIT_SCHEMA or "models" not in fit_result:
        raise TeeflError("not a teefl fit file (expected the JSON written by 'teefl fit --out')")
    models = fit_result["models"]
    if model is not None:
        if model not in models:
            raise TeeflError(
                f"model {model!r} is not in the fit; it has: {', '.join(sorted(models))}"
            )
        names = [model]
    else:
        names = sorted(models)
    rows: list[dict[str, Any]] = []
    for name in names:
        mf = models[name]
        seen: set[str] = set()
        for c in mf.get("configs", []):
            seen.add(c["config"])
            rows.append(
                _prediction(
                    name,
                    c["config"],
                    baseline,
                    c["factor"],
                    c.get("factor_low"),
                    c.get("factor_high"),
                    "measured",
                )
            )
        for term, co in mf.get("coefficients", {}).items():
            label = mech.config_label(co.get("members") or term.split(JOINT))
            if label in seen:
                continue
            seen.add(label)
            if co.get("value") is None:
                rows.append(
                    _prediction(
                        name,
                        label,
                        baseline,
                        None,
                        None,
                        None,
                        "single",
                        "not identifiable from these runs",
                    )
                )
                continue
            low = 1.0 + co["low"] if co.get("low") is not None else None
            high = 1.0 + co["high"] if co.get("high") is not None else None
            note = "joint: always on together in the fit" if len(co.get("members", [])) > 1 else ""
            rows.append(
                _prediction(name, label, baseline, 1.0 + co["value"], low, high, "single", note)
            )
    return rows


def _prediction(
    model: str,
    label: str,
    baseline: float,
    factor: float | None,
    low: float | None,
    high: float | None,
    kind: str,
    note: str = "",
) -> dict[str, Any]:
    return {
        "model": model,
        "config": label,
        "kind": kind,
        "factor": factor,
        "seconds": baseline * factor if factor is not None else None,
        "low": baseline * low if low is not None else None,
        "high": baseline * high if high is not None else None,
        "note": note,
    }


def format_time_interval(low: float | None, high: float | None) -> str:
    """``[HH:MM:SS, HH:MM:SS]`` for predicted wall-clock intervals."""
    if low is None or high is None:
        return "-"
    return f"[{format_hms(low)}, {format_hms(high)}]"
