"""``run.json`` helpers by run-directory path, kept for existing importers.

The run-directory contract lives in `teefl.rundir` (`RunDir.read`, `RunDir.update`,
`RunDir.count_start`); new code uses it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teefl.rundir import RUN_JSON_LOCK as LOCK
from teefl.rundir import RunDir, security_config

__all__ = [
    "LOCK",
    "count_start",
    "first_anchor",
    "read_run_json",
    "security_config",
    "update_run_json",
]


def read_run_json(run_dir: Path) -> dict[str, Any]:
    return RunDir(run_dir).read()


def update_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    return RunDir(run_dir).update(**fields)


def count_start(run_dir: Path) -> int:
    return RunDir(run_dir).count_start()


def first_anchor(events_file: Path) -> float | None:
    """`RunDir.first_anchor` of the run whose events file this is."""
    events_file = Path(events_file)
    return RunDir(events_file.parent.parent).first_anchor(events_file.stem)
