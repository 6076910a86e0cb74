"""The run-directory contract (`teefl.rundir`): names, run.json, metrics.jsonl and locks.

The names are a file format: runs written by older teefl (and the tests' fabricated runs) are
read by the same paths, so a rename here must fail a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from teefl.rundir import AGGREGATOR_LOCK, RUN_LOCK, RunDir, collaborator_process


def test_layout_names_are_the_existing_format(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rel = {
        "run_json": "run.json",
        "plan": "plan.yaml",
        "metrics": "metrics.jsonl",
        "state": "state.json",
        "summary": "summary.json",
        "port_file": "port",
        "bench_record": "bench.json",
        "events_dir": "events",
        "env_dir": "env",
        "logs_dir": "logs",
        "model_dir": "model",
        "updates_dir": "updates",
        "spare_dir": "updates/spare",
        "attestation_dir": "attestation",
        "pki_dir": "pki",
        "gramine_dir": "gramine",
        "slurm_dir": "slurm",
    }
    for attr, name in rel.items():
        assert getattr(rd, attr) == tmp_path / name, attr
    col = collaborator_process("col1")
    assert col == "collaborator-col1"
    assert rd.events() == tmp_path / "events" / "aggregator.jsonl"
    assert rd.env(col) == tmp_path / "env" / "collaborator-col1.json"
    assert rd.log(col) == tmp_path / "logs" / "collaborator-col1.log"
    assert rd.verdicts("aggregator") == tmp_path / "attestation" / "aggregator.json"
    assert rd.checkpoint(3) == tmp_path / "model" / "round-0003.safetensors"
    assert rd.checkpoint(12, sealed=True) == tmp_path / "model" / "round-0012.safetensors.sealed"
    assert rd.final_model() == tmp_path / "model" / "final.safetensors"
    assert RunDir.checkpoint_name(0, final=True, sealed=True) == "model/final.safetensors.sealed"
    assert rd.round_updates(7) == tmp_path / "updates" / "round-0007"
    assert (RUN_LOCK, AGGREGATOR_LOCK) == ("run.lock", "aggregator.lock")
    assert not tmp_path.joinpath("run.json").exists()  # constructing touches nothing


def test_run_json_update_merges_and_count_start(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "r")
    assert rd.read() == {}
    assert rd.count_start() == 0
    rd.update(status="running", rounds=3)
    assert rd.count_start() == 1
    data = rd.read()
    assert (data["status"], data["rounds"], data["restarts"]) == ("running", 3, 1)
    assert oct(rd.run_json.stat().st_mode & 0o777) == "0o600"
    rd.update(status="completed")
    assert rd.count_start() == 1  # a completed run is not started again
    rd.run_json.write_text("[1, 2]")  # not an object: read as unknown, not a crash
    assert rd.read() == {}


def test_metrics_append_ends_a_torn_line(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.append_metrics({"round": 1, "weighted": {"accuracy": 0.5}})
    with open(rd.metrics, "a", encoding="utf-8") as fh:
        fh.write('{"round": 2, "weig')  # a writer killed mid-line
    rd.append_metrics({"round": "final"})
    assert [r["round"] for r in rd.read_metrics()] == [1, "final"]
    assert RunDir(tmp_path / "none").read_metrics() == []


def test_first_anchor_of_this_host_only(tmp_path: Path) -> None:
    from teefl.measure.events import EventRecorder

    rd = RunDir(tmp_path)
    assert rd.first_anchor() is None
    rec = EventRecorder(tmp_path, "r", "aggregator", "aggregator")
    rec.close()
    anchor = rd.first_anchor()
    assert anchor is not None
    first = json.loads(rd.events().read_text().splitlines()[0])
    assert anchor == first["t_mono"]
    rd.events().write_text(json.dumps(dict(first, host="elsewhere")) + "\n")
    assert rd.first_anchor() is None


def test_lock_is_reentrant_and_refuses_another_process(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    with rd.hold(RUN_LOCK, "test") as path, rd.hold(RUN_LOCK, "again"):
        assert path == (tmp_path / "run.lock").absolute()
        code = (
            "import sys\nfrom teefl.rundir import RunDir\n"
            "try:\n    RunDir(sys.argv[1]).acquire('run.lock', 'other')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n"
        )
        res = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
        )
        assert res.stdout.startswith("TeeflError"), res.stdout + res.stderr
        assert f"pid {os.getpid()}, test" in res.stdout
    # released: another process gets it now
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert res.stdout == "" and res.returncode == 0, res.stdout + res.stderr
