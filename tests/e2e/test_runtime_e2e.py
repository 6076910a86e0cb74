"""At-rest sealing and the Gramine launcher, end to end on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gramine_standin import install_stand_ins

from fedutil import SYNTHETIC, phases, run_dir_of, teefl, write_plan
from teefl.security.sealed import load_key, open_sealed, read_sealed, write_key_file
from teefl.server.aggregator import final_state


def _owners_alone(run: Path) -> None:
    """Every directory of a finished run is 0700 and every file 0600 (docs/security.md), and a
    completed run keeps no update (neither a round's nor a spare file) and no temporary file."""
    for p in [run, *run.rglob("*")]:
        mode = p.lstat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), (str(p), oct(mode))
        assert ".tmp" not in p.name, p
    assert not (run / "updates").exists(), list((run / "updates").rglob("*"))


def test_sealed_run_stores_nothing_in_clear(tmp_path: Path) -> None:
    write_key_file(tmp_path / "owner.key")
    plain = tmp_path / "plain"
    sealed = tmp_path / "sealed"
    for d, extra in (
        (plain, {}),
        (sealed, {"at_rest": {"mode": "sealed", "key_file": str(tmp_path / "owner.key")}}),
    ):
        d.mkdir()
        data = {**SYNTHETIC, "security": {"transport": "none", **extra}}
        res = teefl(
            "run",
            str(write_plan(d / "plan.yaml", data)),
            "--runs-dir",
            "runs",
            "--no-progress",
            cwd=d,
        )
        assert res.returncode == 0, res.stdout + res.stderr
    run = run_dir_of(sealed / "runs")
    for done in (run, run_dir_of(plain / "runs")):
        _owners_alone(done)
    files = sorted(p.name for p in (run / "model").iterdir())
    assert files == [
        "final.safetensors.sealed",
        "round-0001.safetensors.sealed",
        "round-0002.safetensors.sealed",
    ], files
    key = load_key(tmp_path / "owner.key")
    # same seed, same training: the sealed final model decrypts to the plain run's bytes
    clear = (run_dir_of(plain / "runs") / "model" / "final.safetensors").read_bytes()
    assert read_sealed(run / "model" / "final.safetensors.sealed", key) == clear
    # bound to what it is, which the owner's decrypt reads from the file itself
    _, context = open_sealed((run / "model" / "final.safetensors.sealed").read_bytes(), key)
    assert context is not None and (context["kind"], context["round"]) == ("final", 2)
    assert context["run"] == json.loads((run / "run.json").read_text())["run_id"]
    out = tmp_path / "final.safetensors"
    res = teefl(
        "model",
        "decrypt",
        str(run / "model" / "final.safetensors.sealed"),
        str(out),
        "--key-file",
        str(tmp_path / "owner.key"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == clear
    assert final_state(run, key).keys() == final_state(run_dir_of(plain / "runs")).keys()


@pytest.fixture()
def stand_in_gramine(tmp_path: Path) -> tuple[dict[str, str], Path]:
    logs = tmp_path / "gramine-logs"
    bin_dir = install_stand_ins(tmp_path / "bin", logs)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, logs / "direct.log"


def test_gramine_direct_launcher_wraps_every_party(tmp_path: Path, stand_in_gramine) -> None:
    env, log = stand_in_gramine
    data = {**SYNTHETIC, "runtime": {"launcher": "gramine-direct"}}
    res = teefl(
        "run",
        str(write_plan(tmp_path / "plan.yaml", data)),
        "--runs-dir",
        "runs",
        "--no-progress",
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run = run_dir_of(tmp_path / "runs")
    calls = log.read_text().split()
    assert sorted(Path(c).name for c in calls) == [
        "aggregator",
        "collaborator-col1",
        "collaborator-col2",
        "collaborator-col3",
    ]
    manifests = sorted(p.name for p in (run / "gramine").glob("*.manifest"))
    assert len(manifests) == 4
    assert "train" in phases(run)
    import json

    assert json.loads((run / "run.json").read_text())["config"]["launcher"] == "gramine-direct"


def test_missing_gramine_is_one_clear_line(tmp_path: Path) -> None:
    data = {**SYNTHETIC, "runtime": {"launcher": "gramine-sgx"}}
    res = teefl(
        "run",
        str(write_plan(tmp_path / "plan.yaml", data)),
        "--runs-dir",
        "runs",
        "--no-progress",
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "gramine-sgx not found on PATH" in res.stderr
