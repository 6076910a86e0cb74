"""teefl bench end to end: real federations per cell, interrupted and resumed, then reported."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedutil import SYNTHETIC, teefl
from teefl.bench.runner import cell_finished

CELLS = [
    "small_cnn-synthetic-baseline-r1",
    "small_cnn-synthetic-tls-r1",
    "small_cnn-synthetic-mtls-r1",
]


def _study(tmp_path: Path) -> Path:
    base = copy.deepcopy(SYNTHETIC)
    base["federation"] = {"rounds": 1}
    data = {
        "name": "resume",
        "base": base,
        "axes": {"transport": ["none", "tls", "mtls"], "repeats": 1},
        "report": {"resamples": 50},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_json(cell: Path) -> dict:
    return json.loads((cell / "run.json").read_text())


@pytest.mark.slow
def test_interrupted_study_resumes_without_rerunning_finished_cells(tmp_path: Path) -> None:
    study = _study(tmp_path)
    out = tmp_path / "out"
    first = out / CELLS[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "teefl", "bench", str(study), "--out", str(out), "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
        # a harness started in the background may pass SIGINT on as ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not cell_finished(first):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "first cell did not finish in 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "run the same command again to resume" in output
    before = _run_json(first)
    assert before["status"] == "completed"
    assert not all(cell_finished(out / c) for c in CELLS)

    res = teefl("bench", str(study), "--out", str(out), "--no-progress", cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "kept 1 finished cell" in res.stdout
    after = _run_json(first)
    assert after["run_id"] == before["run_id"]
    assert after["started_wall"] == before["started_wall"]
    for c in CELLS:
        assert cell_finished(out / c), c
        rec = json.loads((out / c / "bench.json").read_text())
        assert rec["cell"] == c and rec["wall_s"] > 0
    # a cell interrupted half-way was moved aside, not mixed into the results
    attic = list((out / "attic").glob("*/*")) if (out / "attic").exists() else []
    assert all(p.name in CELLS[1:] for p in attic)
    # the end of the study: report, tables and the fit with intervals
    assert (out / "report" / "report.md").is_file()
    fit = json.loads((out / "fit.json").read_text())
    coefs = fit["models"]["small_cnn"]["coefficients"]
    assert {"tls", "mtls"} <= set(coefs)
    assert "Table II" in res.stdout and "Table III" in res.stdout
    assert "C[tls]" in res.stdout and "C[mtls]" in res.stdout
    assert "[1/2]" in res.stdout and "accuracy" in res.stdout

    # a third run has nothing to do and keeps everything
    res = teefl(
        "bench", str(study), "--out", str(out), "--no-report", "--no-progress", cwd=tmp_path
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "kept 3 finished cell" in res.stdout
    assert _run_json(first)["run_id"] == before["run_id"]


def test_gramine_cells_run_under_the_launcher(tmp_path: Path) -> None:
    """A gramine-direct cell goes through the launcher's Gramine wrapping (stand-in tools)."""
    from gramine_standin import install_stand_ins

    bin_dir = install_stand_ins(tmp_path / "bin", tmp_path / "gramine-logs")
    base = copy.deepcopy(SYNTHETIC)
    base["federation"] = {"rounds": 1}
    base["collaborators"] = 2
    data = {"name": "g", "base": base, "axes": {"launcher": ["gramine-direct"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = teefl(
        "bench", "s.yaml", "--out", "out", "--no-report", "--no-progress", cwd=tmp_path, env=env
    )
    assert res.returncode == 0, res.stdout + res.stderr
    cell = tmp_path / "out" / "small_cnn-synthetic-gramine-direct-r1"
    assert _run_json(cell)["config"]["launcher"] == "gramine-direct"
    assert (tmp_path / "gramine-logs" / "direct.log").read_text().count("\n") >= 3
