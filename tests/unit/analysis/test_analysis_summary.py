"""summary.json from fabricated run directories: T, per-phase and communication times, bytes."""

from __future__ import annotations

import importlib.util
import json
import statistics
import struct
from pathlib import Path

import pytest
from paths import REPO
from typer.testing import CliRunner

from teefl.analysis.loader import find_run_dirs, model_info_from_safetensors
from teefl.analysis.summary import build_summary, load_summary, write_summary
from teefl.errors import TeeflError


def _fab():
    spec = importlib.util.spec_from_file_location(
        "teefl_test_fabricate", REPO / "tests/unit/analysis/test_analysis_fabricate.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fab = _fab()


def test_summary_numbers(tmp_path: Path) -> None:
    run = fab.fabricate_run(tmp_path, "r1", transport="tls", tee="tdx", rounds=3, slow=2.0)
    s = build_summary(run)
    rj = json.loads((run / "run.json").read_text())
    assert s["run_id"] == "r1"
    assert s["status"] == "completed"
    assert s["mechanisms"] == ["tdx", "tls"]
    assert s["config_label"] == "tdx+tls"
    assert s["wall_clock"]["source"] == "aggregator run span"
    assert s["wall_clock"]["seconds"] == pytest.approx(rj["finished_wall"] - rj["started_wall"])
    # per-phase totals per collaborator
    for i, name in enumerate(["col1", "col2", "col3"]):
        exp = fab.expected_round_seconds(i, slow=2.0)
        got = s["phases"]["collaborators"][name]
        assert got["train"] == pytest.approx(3 * exp["train"])
        assert got["upload"] == pytest.approx(3 * exp["upload"])
    # communication = download + upload, over collaborators and rounds (sample std)
    values = []
    for i in range(3):
        e = fab.expected_round_seconds(i, slow=2.0)
        values += [e["download"] + e["upload"]] * 3
    assert s["communication"]["mean"] == pytest.approx(statistics.fmean(values))
    assert s["communication"]["std"] == pytest.approx(statistics.stdev(values))
    assert s["communication"]["n"] == 9
    assert len(s["per_round"]) == 3
    for r in s["per_round"]:
        assert 0 < r["duration"] < s["wall_clock"]["seconds"]
        assert set(r["collaborators"]) == {"col1", "col2", "col3"}
        assert r["aggregator"]["aggregate"] == pytest.approx(0.03)
    assert s["bytes"]["download"] == 9 * 44_000_000
    assert s["bytes"]["total"] == 18 * 44_000_000
    assert s["final"]["accuracy"] == pytest.approx(0.75)
    assert s["final"]["loss"] == pytest.approx(0.25)
    env = s["environment"]
    assert env["tee"] == "tdx" and env["tee_source"] == "detected"
    assert "hostA" in env["hosts"]
    agg_env = env["processes"]["aggregator"]
    assert agg_env["cpu"].startswith("Intel") and agg_env["threads"] == 8
    assert agg_env["device"] == "cpu"
    assert s["model_info"]["parameters"] == 11_172_042
    assert s["dataset_info"]["shape"] == [1, 28, 28]
    assert s["phase_means"]["collaborator"]["train"] == pytest.approx(2.0 * 2.0 * 1.1)
    json.dumps(s)


def test_fallbacks_for_older_or_killed_runs(tmp_path: Path) -> None:
    run = fab.fabricate_run(
        tmp_path, "r2", run_span=False, model_info=False, torn_line=True, status="interrupted"
    )
    rj = json.loads((run / "run.json").read_text())
    s = build_summary(run)
    assert s["wall_clock"]["source"] == "aggregator anchor to last event"
    assert s["wall_clock"]["seconds"] == pytest.approx(rj["finished_wall"] - rj["started_wall"])
    assert s["model_info"] == {"parameters": 178, "size_bytes": 784, "tensors": 8}
    assert s["model_info_source"] == "model/final.safetensors"
    assert any("interrupted" in w for w in s["warnings"])


def test_missing_optional_files(tmp_path: Path) -> None:
    run = fab.fabricate_run(tmp_path, "r3", write_model=False, model_info=False)
    for p in (run / "env").iterdir():
        p.unlink()
    (run / "metrics.jsonl").unlink()
    rj = json.loads((run / "run.json").read_text())
    for key in ("dataset_info", "name", "config"):
        rj.pop(key)
    (run / "run.json").write_text(json.dumps(rj))
    s = build_summary(run)
    assert s["model_info"] is None and s["dataset_info"] is None
    assert s["config_label"] == "baseline"
    assert s["environment"]["hosts"]  # from the anchors
    assert s["wall_clock"]["seconds"] > 0


def test_only_run_json_wall_times(tmp_path: Path) -> None:
    run = fab.fabricate_run(tmp_path, "r4")
    for p in (run / "events").iterdir():
        p.unlink()
    s = build_summary(run)
    assert s["wall_clock"]["source"] == "run.json wall times"


def test_write_summary_and_load(tmp_path: Path) -> None:
    run = fab.fabricate_run(tmp_path, "r5")
    s = write_summary(run)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["wall_clock"] == s["wall_clock"]
    assert not list(run.glob(".summary.json.*"))
    # a copy without events is reported from summary.json
    import shutil

    shutil.rmtree(run / "events")
    assert load_summary(run)["wall_clock"] == s["wall_clock"]


def test_find_run_dirs_recurses_two_levels(tmp_path: Path) -> None:
    fab.fabricate_run(tmp_path / "hostA" / "runs", "a1")
    fab.fabricate_run(tmp_path / "hostB", "b1")
    found = find_run_dirs([tmp_path / "hostA", tmp_path / "hostB"])
    assert [p.name for p in found] == ["a1", "b1"]
    with pytest.raises(TeeflError, match="no run directory"):
        find_run_dirs([tmp_path / "hostA" / "runs" / "a1" / "env"])
    with pytest.raises(TeeflError, match="no such directory"):
        find_run_dirs([tmp_path / "nope"])


def test_safetensors_header_without_torch(tmp_path: Path) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(TeeflError, match="not valid JSON"):
        model_info_from_safetensors(p)
    p.write_bytes(b"abc")
    with pytest.raises(TeeflError, match="not a safetensors"):
        model_info_from_safetensors(p)


def test_summarize_cli(tmp_path: Path) -> None:
    from teefl.cli import app

    run = fab.fabricate_run(tmp_path, "r6", transport="mtls")
    res = CliRunner().invoke(app, ["summarize", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / "summary.json").is_file()
    assert "mtls" in res.output and "wall-clock T" in res.output
