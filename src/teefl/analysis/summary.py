"""summary.json: one run reduced to the numbers the paper's tables need.

Why a summary file at all: events are the ground truth but are large and need the anchors to be
interpreted; summary.json is what a person opens first and what a report built on another host can
use when the events were not copied. It is always *derived*: ``teefl summarize`` rebuilds it from
the events, and `build_summary` never writes anything.

Exact definitions (docs/architecture.md, brief):
- wall-clock T = duration of the aggregator's ``run`` span; without one, the aggregator's first
  anchor to its last event; without events, run.json ``finished_wall - started_wall``.
- communication time of a collaborator in a round = its ``download`` + ``upload`` spans.
- accuracy and loss: `teefl.analysis.run_metrics.final_metrics`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from teefl.analysis import mechanisms
from teefl.analysis.loader import ProcessLog, RunDir, load_run_dir, model_info_from_safetensors
from teefl.analysis.run_metrics import final_metrics, round_of
from teefl.analysis.timefmt import format_hms
from teefl.errors import TeeflError
from teefl.rundir import RunDir as Layout
from teefl.runfiles import write_private

SCHEMA = "teefl.summary/1"
#: Phases of a collaborator's round, in the order they happen.
COLLABORATOR_PHASES = (
    "wait",
    "download",
    "validate_global",
    "train",
    "validate_local",
    "serialize",
    "upload",
)
AGGREGATOR_PHASES = ("aggregate", "checkpoint")


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def _aggregator(run: RunDir) -> ProcessLog | None:
    if "aggregator" in run.processes:
        return run.processes["aggregator"]
    for log in run.processes.values():
        if log.role == "aggregator":
            return log
    return None


def _collaborators(run: RunDir) -> list[ProcessLog]:
    return [
        log
        for log in run.processes.values()
        if log.role == "collaborator" or log.process.startswith("collaborator-")
    ]


def _wall_clock(run: RunDir, warnings: list[str]) -> dict[str, Any]:
    agg = _aggregator(run)
    if agg is not None:
        runs = [s for s in agg.spans if s.get("phase") == "run"]
        if runs:
            t = runs[-1]["duration"]
            return {"seconds": t, "hms": format_hms(t), "source": "aggregator run span"}
        if agg.anchors:
            ends = [s["wall_end"] for s in agg.spans if s.get("wall_end") is not None]
            ends += [i["wall"] for i in agg.infos if i.get("wall") is not None]
            if ends:
                t = max(ends) - float(agg.anchors[0]["t_wall"])
                warnings.append(
                    "no aggregator 'run' span: T taken from the aggregator's first anchor to its "
                    "last event (the run may not have finished)"
                )
                return {
                    "seconds": t,
                    "hms": format_hms(t),
                    "source": "aggregator anchor to last event",
                }
    start, end = run.run.get("started_wall"), run.run.get("finished_wall")
    if isinstance(start, int | float) and isinstance(end, int | float) and end >= start:
        t = float(end) - float(start)
        warnings.append("no aggregator events: T taken from run.json started_wall/finished_wall")
        return {"seconds": t, "hms": format_hms(t), "source": "run.json wall times"}
    warnings.append("wall-clock time unknown: no aggregator events and no run.json wall times")
    return {"seconds": None, "hms": "-", "source": None}


def _find_key(d: Any, names: tuple[str, ...], depth: int = 2) -> Any:
    """First scalar value under any of ``names`` at the top level or in nested dicts."""
    if not isinstance(d, dict):
        return None
    for n in names:
        v = d.get(n)
        if isinstance(v, str | int | float) and not isinstance(v, bool):
            return v
    if depth > 0:
        for v in d.values():
            if isinstance(v, dict):
                found = _find_key(v, names, depth - 1)
                if found is not None:
                    return found
    return None


def _environment(run: RunDir) -> dict[str, Any]:
    config = run.run.get("config") or {}
    processes: dict[str, Any] = {}
    for proc, env in sorted(run.env.items()):
        tee = env.get("tee")
        tee_label = tee if isinstance(tee, str) else _find_key(tee, ("label", "kind", "name"), 0)
        cpu = env.get("cpu")
        processes[proc] = {
            "host": _find_key(env, ("host", "hostname", "node")),
            "cpu": cpu
            if isinstance(cpu, str)
            else _find_key(env, ("cpu_model", "model_name", "processor", "model")),
            "cores": _find_key(env, ("cores", "cpu_count", "logical_cores", "physical_cores")),
            "threads": _find_key(env, ("threads", "torch_threads", "num_threads")),
            "device": _find_key(env, ("device",)),
            "python": _find_key(env, ("python", "python_version")),
            "torch": _find_key(env, ("torch", "torch_version")),
            "tee": tee_label,
        }
    hosts = sorted({str(p["host"]) for p in processes.values() if p.get("host")})
    if not hosts:
        hosts = sorted({log.host for log in run.processes.values() if log.host})
    tee = config.get("tee")
    if not tee:
        labels = {p["tee"] for p in processes.values() if p.get("tee")}
        tee = labels.pop() if len(labels) == 1 else None
    return {
        "tee": tee or "none",
        "tee_source": config.get("tee_source") or ("none" if not tee else "unknown"),
        "hosts": hosts,
        "processes": processes,
    }


def _model_info(run: RunDir, warnings: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    info = run.run.get("model_info")
    if isinstance(info, dict) and info:
        return info, "run.json"
    final = Layout(run.path).final_model()
    if final.is_file():
        try:
            return model_info_from_safetensors(final), "model/final.safetensors"
        except TeeflError as exc:
            warnings.append(str(exc))
    return None, None


def summarize_run(run: RunDir) -> dict[str, Any]:
    """The summary of an already loaded run directory (see module doc for definitions)."""
    warnings = list(run.warnings)
    r = run.run
    config = r.get("config") if isinstance(r.get("config"), dict) else {}
    mechs = mechanisms.from_run_config(config)
    collabs = sorted(_collaborators(run), key=lambda log: log.name)
    agg = _aggregator(run)
    if not run.processes:
        warnings.append("no events/*.jsonl: no per-phase times")
    elif agg is None:
        warnings.append("no aggregator events")

    # per round, per collaborator, per phase
    per_round: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"collaborators": {}, "aggregator": defaultdict(float), "extent": [None, None]}
    )
    phase_totals: dict[str, dict[str, float]] = {}
    bytes_total: dict[str, dict[str, int]] = {}
    for log in collabs:
        totals: dict[str, float] = defaultdict(float)
        moved = {"download": 0, "upload": 0}
        for s in log.spans:
            phase = str(s.get("phase"))
            totals[phase] += s["duration"]
            if phase in moved and isinstance(s.get("bytes"), int | float):
                moved[phase] += int(s["bytes"])
            rnd = round_of(s)
            if rnd is None:
                continue
            cell = per_round[rnd]["collaborators"].setdefault(
                log.name, {"phases": defaultdict(float), "bytes_down": 0, "bytes_up": 0}
            )
            cell["phases"][phase] += s["duration"]
            if phase == "download":
                cell["bytes_down"] += int(s.get("bytes") or 0)
            elif phase == "upload":
                cell["bytes_up"] += int(s.get("bytes") or 0)
            if phase != "wait":
                _extend(per_round[rnd]["extent"], s)
        phase_totals[log.name] = dict(totals)
        bytes_total[log.name] = moved
    agg_totals: dict[str, float] = defaultdict(float)
    if agg is not None:
        for s in agg.spans:
            phase = str(s.get("phase"))
            agg_totals[phase] += s["duration"]
            rnd = round_of(s)
            if rnd is not None:
                per_round[rnd]["aggregator"][phase] += s["duration"]
                _extend(per_round[rnd]["extent"], s)

    rounds_out = []
    comm_all: list[float] = []
    comm_by_col: dict[str, list[float]] = defaultdict(list)
    cells_by_phase: dict[str, list[float]] = defaultdict(list)
    for rnd in sorted(per_round):
        entry = per_round[rnd]
        cols = {}
        for name, cell in sorted(entry["collaborators"].items()):
            phases = dict(cell["phases"])
            comm = phases.get("download", 0.0) + phases.get("upload", 0.0)
            comm_all.append(comm)
            comm_by_col[name].append(comm)
            for phase in COLLABORATOR_PHASES:
                cells_by_phase[phase].append(phases.get(phase, 0.0))
            cols[name] = {
                "phases": phases,
                "communication": comm,
                "bytes_down": cell["bytes_down"],
                "bytes_up": cell["bytes_up"],
            }
        lo, hi = entry["extent"]
        rounds_out.append(
            {
                "round": rnd,
                "duration": (hi - lo) if lo is not None and hi is not None else None,
                "collaborators": cols,
                "aggregator": dict(entry["aggregator"]),
            }
        )
    agg_rounds = [e["aggregator"] for e in rounds_out]
    phase_means = {
        "collaborator": {
            p: statistics.fmean(cells_by_phase[p]) for p in COLLABORATOR_PHASES if cells_by_phase[p]
        },
        "aggregator": {
            p: statistics.fmean([a.get(p, 0.0) for a in agg_rounds])
            for p in AGGREGATOR_PHASES
            if agg_rounds
        },
    }
    comm = _mean_std(comm_all)
    comm["per_collaborator"] = {n: _mean_std(v) for n, v in sorted(comm_by_col.items())}
    down = sum(b["download"] for b in bytes_total.values())
    up = sum(b["upload"] for b in bytes_total.values())

    model_info, model_info_source = _model_info(run, warnings)
    status = r.get("status") or "unknown"
    if status != "completed":
        warnings.append(f"run status is {status!r}, not 'completed'")
    wall = _wall_clock(run, warnings)
    return {
        "schema": SCHEMA,
        "run_id": run.run_id,
        "name": r.get("name"),
        "status": status,
        "model": r.get("model"),
        "dataset": r.get("dataset"),
        "workload": r.get("workload"),
        "strategy_digest": r.get("strategy_digest"),
        "rounds": r.get("rounds"),
        "rounds_completed": r.get("rounds_completed", len(rounds_out) or None),
        "collaborators": r.get("collaborators") or [log.name for log in collabs],
        "started_wall": r.get("started_wall"),
        "finished_wall": r.get("finished_wall"),
        "config": config,
        "mechanisms": list(mechs),
        "config_label": mechanisms.config_label(mechs),
        "wall_clock": wall,
        "per_round": rounds_out,
        "phases": {"collaborators": phase_totals, "aggregator": dict(agg_totals)},
        "phase_means": phase_means,
        "communication": comm,
        "bytes": {
            "download": down,
            "upload": up,
            "total": down + up,
            "per_collaborator": bytes_total,
        },
        "final": final_metrics(run, collabs, warnings),
        "model_info": model_info,
        "model_info_source": model_info_source,
        "dataset_info": r.get("dataset_info") if isinstance(r.get("dataset_info"), dict) else None,
        "environment": _environment(run),
        "failures": _failures(agg, r.get("rounds")),
        "warnings": warnings,
    }


def _failures(agg: ProcessLog | None, rounds: Any) -> list[dict[str, Any]]:
    """The failed rounds the aggregator recorded (``round_failed``: a party's own code raised
    and it reported so), in order: party, round ("final" for the evaluation pass), phase and
    the one-line summary as the aggregator shows it (the party's name first)."""
    out: list[dict[str, Any]] = []
    for info in agg.infos if agg is not None else []:
        if info.get("what") != "round_failed":
            continue
        name, rnd = info.get("collaborator"), info.get("round")
        final = isinstance(rnd, int) and isinstance(rounds, int) and rnd > rounds
        out.append(
            {
                "collaborator": name,
                "round": "final" if final else rnd,
                "phase": info.get("phase"),
                "summary": f"{name}: {info.get('summary')}",
            }
        )
    return out


def _extend(extent: list[float | None], span: dict[str, Any]) -> None:
    lo, hi = span.get("wall_start"), span.get("wall_end")
    if lo is None or hi is None:
        return
    extent[0] = lo if extent[0] is None else min(extent[0], lo)
    extent[1] = hi if extent[1] is None else max(extent[1], hi)


def build_summary(run_dir: Path | str) -> dict[str, Any]:
    """Summarize a run directory from its files (nothing is written)."""
    return summarize_run(load_run_dir(run_dir))


def write_summary(run_dir: Path | str) -> dict[str, Any]:
    """Build the summary and write ``<run_dir>/summary.json`` atomically; return it.

    Why atomic (temp file + rename): the federation calls this at the end of a run and a report
    may be reading the directory at the same moment; a half-written summary must never be seen.
    """
    run_dir = Path(run_dir)
    summary = build_summary(run_dir)
    summary["generated_wall"] = time.time()
    target = Layout(run_dir).summary
    tmp = run_dir / f".{target.name}.{os.getpid()}.tmp"
    try:
        write_private(tmp, json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TeeflError(f"cannot write {target}: {exc.strerror}") from None
    return summary


def load_summary(run_dir: Path | str) -> dict[str, Any]:
    """Summary of a run for reports: rebuilt from events when present, else summary.json.

    Why prefer the events: summary.json may predate a fix in this module; the events are the
    ground truth. Copies of runs without events (only summary.json) still work.
    """
    run_dir = Path(run_dir)
    files = Layout(run_dir)
    if files.event_files():
        return build_summary(run_dir)
    sfile = files.summary
    if sfile.is_file():
        try:
            data = json.loads(sfile.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TeeflError(f"{sfile}: unreadable ({exc})") from None
        if isinstance(data, dict):
            return data
    return build_summary(run_dir)
