"""Real federations: one aggregator and three collaborator processes on loopback."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from fedutil import FASHION, SYNTHETIC, final_accuracy, phases, run_dir_of, teefl, write_plan
from teefl.measure.events import PHASES
from teefl.server.aggregator import final_state

#: every phase of the brief except `attest`, which exists only when attestation is on
BRIEF_PHASES = set(PHASES) - {"attest"}


def test_synthetic_federation_completes(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.yaml", SYNTHETIC)
    res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    run = run_dir_of(tmp_path / "runs")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["rounds_completed"] == 2
    assert phases(run) >= BRIEF_PHASES
    assert (run / "summary.json").exists()
    assert {p.name for p in (run / "env").iterdir()} == {
        "aggregator.json",
        "collaborator-col1.json",
        "collaborator-col2.json",
        "collaborator-col3.json",
    }
    state = final_state(run)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert final_accuracy(run) > 0.5  # 4 classes: chance is 0.25
    assert "final accuracy" in res.stdout or "accuracy" in res.stdout
    assert "wall-clock T" in res.stdout


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_reaches_80_percent(tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path / "plan.yaml",
        {
            "collaborators": 3,
            "federation": {"rounds": 3},
            "model": {"name": "small_cnn"},
            "dataset": {
                "name": "fashion-mnist",
                "max_samples_per_collaborator": 8000,
                "max_test_samples": 1000,
            },
            "training": {"batch_size": 32, "lr": 0.002, "threads": 1},
            "security": {"transport": "none"},
        },
    )
    res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    run = run_dir_of(tmp_path / "runs")
    assert final_accuracy(run) >= 0.80
    assert phases(run) >= BRIEF_PHASES


def _one_error_line(res) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def test_malformed_plan_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {rounds: [\n")
    assert "malformed YAML" in _one_error_line(teefl("run", str(bad), cwd=tmp_path))


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("model", {"name": "vgg11"}, "unknown model 'vgg11'"),
        ("dataset", {"name": "imagenet"}, "unknown dataset 'imagenet'"),
    ],
)
def test_unknown_model_or_dataset_is_one_line(tmp_path: Path, section, value, message) -> None:
    plan = write_plan(tmp_path / "p.yaml", {**SYNTHETIC, section: value})
    assert message in _one_error_line(teefl("run", str(plan), cwd=tmp_path))


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        plan = write_plan(tmp_path / "p.yaml", {**SYNTHETIC, "network": {"port": port}})
        line = _one_error_line(teefl("run", str(plan), "--runs-dir", "runs", cwd=tmp_path))
    assert f"127.0.0.1:{port}" in line and "already in use" in line
