"""Helpers for tests that run real federations (separate processes on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

FASHION = Path("/usr/share/datasets/fashion-mnist")

#: a quick, learnable synthetic workload: a federation of it takes seconds
SYNTHETIC = {
    "dataset": {
        "name": "synthetic",
        "synthetic": {"shape": [1, 12, 12], "classes": 4, "train_size": 600, "test_size": 200},
    },
    "model": {"name": "small_cnn"},
    "training": {"batch_size": 32, "lr": 0.003, "threads": 1},
    "federation": {"rounds": 2},
    "collaborators": 3,
    "security": {"transport": "none"},
}


def write_plan(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def teefl(*args: str, cwd: Path, timeout: float = 240, env: dict[str, str] | None = None):
    """Run the teefl CLI as a user would; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "teefl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "160", **(env or {})},
    )


def run_dir_of(runs: Path) -> Path:
    dirs = [d for d in runs.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_accuracy(run_dir: Path) -> float:
    final = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["round"] == "final"]
    assert final, "no final evaluation in metrics.jsonl"
    return final[-1]["weighted"]["final.accuracy"]


def phases(run_dir: Path) -> set[str]:
    out: set[str] = set()
    for f in (run_dir / "events").glob("*.jsonl"):
        out |= {e["phase"] for e in read_jsonl(f) if e["type"] == "span"}
    return out
