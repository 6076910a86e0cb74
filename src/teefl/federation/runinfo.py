"""``run.json``: what a run is (model, dataset, security configuration) and where it stands.

Why a separate small file next to the events: the analysis groups runs by configuration without
parsing events, and a run directory left by a crash or Ctrl-C still says how far it got.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from teefl.plan import Plan


def security_config(plan: Plan, tee: dict[str, Any] | None = None) -> dict[str, Any]:
    """The security axes of a run, as the overhead model names them.

    The TEE label is the aggregator host's detection record (or the user's stated label, kept
    as stated); it is never inferred from the plan's wishes.
    """
    tee = tee or {}
    att = plan.security.attestation
    return {
        "transport": plan.security.transport or "none",
        "launcher": plan.runtime.launcher,
        "attestation": "required" if att.enabled else "off",
        "attestation_detail": {
            "collaborators": att.collaborators,
            "aggregator": att.aggregator,
            "provider": att.provider,
        },
        "at_rest": plan.security.at_rest.mode,
        "tee": tee.get("label", "none"),
        "tee_source": tee.get("source", "none"),
    }


def read_run_json(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def update_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into run.json atomically (temp file + rename)."""
    data = read_run_json(run_dir)
    data.update(fields)
    data["updated_wall"] = time.time()
    path = Path(run_dir) / "run.json"
    tmp = path.with_name(f".run.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data


def first_anchor(events_file: Path) -> float | None:
    """Monotonic start of the first process that wrote this events file, on this host.

    A restarted aggregator uses it so that the run's wall-clock T spans the whole run. Clocks of
    another host or boot are not comparable: then None.
    """
    import socket

    try:
        with open(events_file, encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, json.JSONDecodeError):
        return None
    if first.get("type") != "anchor" or first.get("host") != socket.gethostname():
        return None
    t_mono = float(first["t_mono"])
    return t_mono if t_mono <= time.monotonic() else None
