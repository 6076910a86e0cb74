"""Reading run directories: the only input of the analysis (see docs/architecture.md).

Why tolerant reading: run directories are copied between hosts, come from older versions of teefl
or from runs that were killed. A missing optional file or field becomes ``None`` (and, where it
matters, a warning in the summary) rather than an exception; only the absence of anything that
makes a directory a run directory is an error. Nothing here imports torch: the safetensors header
is read by hand (8-byte little-endian length + JSON).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from teefl.errors import TeeflError
from teefl.measure.events import read_events
from teefl.rundir import RunDir as Layout  # the files; `RunDir` here is a loaded run

#: Buffers in a torch state dict that are not trainable parameters (excluded from "parameters").
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass
class ProcessLog:
    """The events of one process with every time also converted to wall-clock seconds.

    Why convert: processes may run on different hosts whose monotonic clocks are unrelated; the
    per-process ``anchor`` (t_mono, t_wall) puts them on one time line. Durations are always
    computed on the monotonic clock of the process that measured them.
    """

    process: str
    role: str
    anchors: list[dict[str, Any]] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Collaborator name (``collaborator-col1`` -> ``col1``), else the process name."""
        return self.process.removeprefix("collaborator-")

    @property
    def host(self) -> str | None:
        return self.anchors[0].get("host") if self.anchors else None


@dataclass
class RunDir:
    """Everything read from one run directory, unprocessed."""

    path: Path
    run: dict[str, Any]
    plan: dict[str, Any] | None
    env: dict[str, dict[str, Any]]
    processes: dict[str, ProcessLog]
    metrics: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.run.get("run_id") or self.path.name)


def is_run_dir(path: Path) -> bool:
    """A run directory has run.json, or at least an events/ folder."""
    return Layout(path).is_run()


def find_run_dirs(paths: Iterable[Path | str], max_depth: int = 2) -> list[Path]:
    """Expand arguments to run directories: each path is a run or holds runs up to 2 levels down.

    Why recurse: ``teefl report hostA/ hostB/`` must merge results copied from several hosts,
    each holding ``runs/<id>/`` folders. Order is stable (sorted) and duplicates are removed.
    """
    found: list[Path] = []
    seen: set[Path] = set()

    def walk(p: Path, depth: int) -> None:
        if is_run_dir(p):
            rp = p.resolve()
            if rp not in seen:
                seen.add(rp)
                found.append(p)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(c for c in p.iterdir() if c.is_dir())
        except OSError:
            return
        for c in children:
            walk(c, depth + 1)

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise TeeflError(f"no such directory: {p}")
        if not p.is_dir():
            raise TeeflError(
                f"{p} is not a directory: give run directories or folders holding them"
            )
        before = len(found)
        walk(p, 0)
        if len(found) == before and not is_run_dir(p):
            raise TeeflError(
                f"no run directory (with run.json) found in {p} or up to {max_depth} levels below"
            )
    return found


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        warnings.append(f"{path.name}: unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path.name}: not a JSON object")
        return None
    return data


def _process_log(records: Sequence[dict[str, Any]], fallback_name: str) -> ProcessLog:
    first = records[0] if records else {}
    process = str(first.get("process") or fallback_name)
    role = str(first.get("role") or ("aggregator" if process == "aggregator" else "collaborator"))
    log = ProcessLog(process=process, role=role)
    anchor: dict[str, Any] | None = None

    def wall(t: Any) -> float | None:
        if anchor is None or not isinstance(t, int | float):
            return None
        return float(anchor["t_wall"]) + (float(t) - float(anchor["t_mono"]))

    for rec in records:
        kind = rec.get("type")
        if kind == "anchor":
            if isinstance(rec.get("t_mono"), int | float) and isinstance(
                rec.get("t_wall"), int | float
            ):
                anchor = rec
                log.anchors.append(rec)
        elif kind == "span":
            t0, t1 = rec.get("t_start"), rec.get("t_end")
            if not isinstance(t0, int | float) or not isinstance(t1, int | float):
                continue
            if not (math.isfinite(t0) and math.isfinite(t1)):
                continue
            span = dict(rec)
            span["duration"] = max(0.0, float(t1) - float(t0))
            span["wall_start"], span["wall_end"] = wall(t0), wall(t1)
            log.spans.append(span)
        elif kind == "info":
            info = dict(rec)
            info["wall"] = wall(rec.get("t"))
            log.infos.append(info)
    return log


def load_run_dir(path: Path | str) -> RunDir:
    """Read run.json, plan.yaml, env/*.json, events/*.jsonl and metrics.jsonl of one run."""
    path = Path(path)
    warnings: list[str] = []
    if not is_run_dir(path):
        raise TeeflError(f"{path} is not a run directory (no run.json and no events/)")
    files = Layout(path)
    run = _read_json(files.run_json, warnings)
    if run is None:
        warnings.append("run.json missing or unreadable: model, dataset and configuration unknown")
        run = {}
    plan: dict[str, Any] | None = None
    plan_path = files.plan
    if plan_path.is_file():
        try:
            loaded = yaml.safe_load(plan_path.read_text(encoding="utf-8"))
            plan = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError) as exc:
            warnings.append(f"plan.yaml unreadable ({exc.__class__.__name__})")
    env: dict[str, dict[str, Any]] = {}
    for p in files.env_files():
        data = _read_json(p, warnings)
        if data is not None:
            env[p.stem] = data
    processes: dict[str, ProcessLog] = {}
    for p in files.event_files():
        try:
            records = read_events(p)
        except OSError as exc:
            warnings.append(f"events/{p.name}: unreadable ({exc})")
            continue
        log = _process_log(records, p.stem)
        processes[log.process] = log
    metrics = files.read_metrics()  # a torn last line of a killed run is skipped
    return RunDir(
        path=path,
        run=run,
        plan=plan,
        env=env,
        processes=processes,
        metrics=metrics,
        warnings=warnings,
    )


def read_safetensors_header(path: Path | str) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without torch or the safetensors package.

    Format: 8 bytes little-endian unsigned header length N, then N bytes of JSON mapping tensor
    names to ``{dtype, shape, data_offsets}`` (plus an optional ``__metadata__``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise TeeflError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 1024 * 1024:
                raise TeeflError(f"{path}: not a safetensors file (header length {n})")
            raw = fh.read(n)
    except OSError as exc:
        raise TeeflError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) != n:
        raise TeeflError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TeeflError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise TeeflError(f"{path}: safetensors header is not a JSON object")
    return header


def model_info_from_safetensors(path: Path | str) -> dict[str, int]:
    """``{parameters, size_bytes, tensors}`` of a saved state dict.

    ``tensors`` counts every state tensor, ``size_bytes`` is the bytes of all tensors (the
    paper's model "size"), ``parameters`` excludes BatchNorm buffers (running statistics and
    ``num_batches_tracked``) so it matches torch's trainable parameter count.
    """
    header = read_safetensors_header(path)
    params = tensors = size = 0
    for name, meta in header.items():
        if name == "__metadata__" or not isinstance(meta, dict):
            continue
        tensors += 1
        shape = meta.get("shape") or []
        count = math.prod(int(s) for s in shape)
        offsets = meta.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2:
            size += int(offsets[1]) - int(offsets[0])
        else:
            size += count * _DTYPE_BYTES.get(str(meta.get("dtype")), 4)
        if not name.endswith(_BUFFER_SUFFIXES):
            params += count
    return {"parameters": params, "size_bytes": size, "tensors": tensors}
