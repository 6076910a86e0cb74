"""Load: 32 collaborator processes against one aggregator on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedutil import SYNTHETIC, read_jsonl, run_dir_of, teefl, write_plan


@pytest.mark.slow
def test_32_collaborators_complete_with_bounded_memory(tmp_path: Path) -> None:
    data = {
        **SYNTHETIC,
        "collaborators": 32,
        "dataset": {
            "name": "synthetic",
            "synthetic": {"shape": [1, 8, 8], "classes": 2, "train_size": 3200, "test_size": 640},
        },
        "federation": {"rounds": 2, "max_inflight_updates": 4},
    }
    plan = write_plan(tmp_path / "plan.yaml", data)
    res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = run_dir_of(tmp_path / "runs")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed"
    assert 1 <= info["peak_inflight_updates"] <= 4
    metrics = read_jsonl(run / "metrics.jsonl")
    assert all(len(m["collaborators"]) == 32 for m in metrics)
    errors = [
        e
        for e in read_jsonl(run / "events" / "aggregator.jsonl")
        if e.get("what") in ("update_rejected", "update_broken", "refused")
    ]
    assert errors == []
