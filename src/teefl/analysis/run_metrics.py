"""A run's final accuracy and loss for summary.json, from the best source the run has: the
evaluation pass of the final model, else the last round's validation spans, else metrics.jsonl.
Each result says which source it came from.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from teefl.analysis.loader import ProcessLog, RunDir


def round_of(span: dict[str, Any]) -> int | None:
    """The span's round as an int; None when it has none (or a bool, or a fraction)."""
    r = span.get("round")
    if isinstance(r, bool):
        return None
    if isinstance(r, int):
        return r
    if isinstance(r, float) and r.is_integer():
        return int(r)
    return None


def _weighted_metrics(spans: list[dict[str, Any]]) -> dict[str, float] | None:
    """Sample-weighted mean of accuracy/loss over collaborators (unweighted without samples)."""
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for s in spans:
        m = s.get("metrics")
        if not isinstance(m, dict):
            continue
        w = s.get("samples")
        w = float(w) if isinstance(w, int | float) and w > 0 else 1.0
        for key in ("accuracy", "loss"):
            v = m.get(key)
            if isinstance(v, int | float):
                sums[key] += w * float(v)
                weights[key] += w
    if not weights:
        return None
    return {k: sums[k] / weights[k] for k in sums}


def _metrics_from_record(rec: dict[str, Any]) -> dict[str, float] | None:
    """Accuracy/loss from a metrics.jsonl line, whose exact shape older runs may vary."""

    def pick(d: Any) -> dict[str, float] | None:
        if isinstance(d, dict) and any(isinstance(d.get(k), int | float) for k in ("accuracy",)):
            return {
                k: float(d[k]) for k in ("accuracy", "loss") if isinstance(d.get(k), int | float)
            }
        return None

    found = pick(rec)
    if found:
        return found
    for key, val in rec.items():
        if isinstance(val, dict) and ("weighted" in key or "mean" in key):
            found = pick(val) or pick(val.get("validate_local")) or pick(val.get("validate_global"))
            if found:
                return found
    return None


def final_metrics(
    run: RunDir, collabs: list[ProcessLog], warnings: list[str]
) -> dict[str, Any] | None:
    """Accuracy and loss of the run's result; None (and a warning) when none was recorded."""
    # the evaluation pass after the last round validates the model the run actually produced
    final_spans = [s for log in collabs for s in log.spans if s.get("phase") == "final_validate"]
    final = _weighted_metrics(final_spans)
    if final:
        return {
            "round": "final",
            "accuracy": final.get("accuracy"),
            "loss": final.get("loss"),
            "source": "events: final_validate of the final model, sample-weighted",
        }
    by_round: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for log in collabs:
        for s in log.spans:
            r = round_of(s)
            if r is not None and s.get("phase") in ("validate_global", "validate_local"):
                by_round[r][s["phase"]].append(s)
    if by_round:
        last = max(by_round)
        out: dict[str, Any] = {"round": last}
        for phase in ("validate_global", "validate_local"):
            out[phase] = _weighted_metrics(by_round[last].get(phase, []))
        best = out["validate_local"] or out["validate_global"]
        if best:
            out.update({"accuracy": best.get("accuracy"), "loss": best.get("loss")})
            which = "validate_local" if out["validate_local"] else "validate_global"
            out["source"] = f"events: {which} of round {last}, sample-weighted over collaborators"
            return out
    if run.metrics:
        found = _metrics_from_record(run.metrics[-1])
        if found:
            return {
                "round": run.metrics[-1].get("round"),
                "accuracy": found.get("accuracy"),
                "loss": found.get("loss"),
                "source": "metrics.jsonl (last line)",
            }
    warnings.append("no accuracy/loss recorded (no validation spans with metrics)")
    return None
