"""`teefl tee ...` commands through Typer's test runner, on an app holding only this group."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from teefl.commands import tee as tee_commands
from teefl.errors import TeeflError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "attestation"


@pytest.fixture()
def app() -> typer.Typer:
    app = typer.Typer()
    tee_commands.register(app)
    return app


def run(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, list(args))


def test_info_json_on_fake_tdx_tree(tmp_path: Path, app: typer.Typer) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tdx_guest").touch()
    result = run(app, "tee", "info", "--json", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["label"] == "tdx" and record["source"] == "detected"
    assert record["evidence"] == ["file /dev/tdx_guest exists"]


def test_info_stated_label(tmp_path: Path, app: typer.Typer) -> None:
    result = run(app, "tee", "info", "--json", "--root", str(tmp_path), "--tee-label", "sev-snp")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["label"], record["source"], record["detected_label"]) == (
        "sev-snp",
        "stated",
        "none",
    )


def test_info_human_output(tmp_path: Path, app: typer.Typer) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sgx_enclave").touch()
    result = run(app, "tee", "info", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "sgx-host" in result.stdout and "file /dev/sgx_enclave exists" in result.stdout


def test_gramine_manifest_command(tmp_path: Path, app: typer.Typer) -> None:
    out = tmp_path / "agg.manifest.template"
    result = run(
        app,
        "tee", "gramine-manifest", "--role", "aggregator", "--sgx", "--out", str(out),
        "--run-dir", str(tmp_path / "run"), "--threads", "4",
        "--", "-m", "teefl.cli", "aggregator",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    m = tomllib.loads(out.read_text())
    assert m["loader"]["argv"] == [
        str(Path(sys.executable).resolve()),
        "-m",
        "teefl.cli",
        "aggregator",
    ]
    assert m["sgx"]["remote_attestation"] == "dcap"
    assert m["loader"]["env"]["OMP_NUM_THREADS"] == "4"


def test_gramine_manifest_bad_role(app: typer.Typer) -> None:
    result = run(app, "tee", "gramine-manifest", "--role", "observer")
    assert result.exit_code != 0


@pytest.mark.skipif(not (DATA / "sgx_quote").is_file(), reason="attestation samples absent")
def test_verify_command(tmp_path: Path, app: typer.Typer) -> None:
    quote, coll = DATA / "sgx_quote", DATA / "sgx_quote_collateral.json"
    at = "2025-07-01T00:00:00Z"
    result = run(app, "tee", "verify", str(quote), "--collateral", str(coll), "--at", at)
    assert isinstance(result.exception, TeeflError)
    assert "TCB status ConfigurationAndSWHardeningNeeded not accepted" in str(result.exception)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "accepted_tcb_statuses: [UpToDate, ConfigurationAndSWHardeningNeeded]\n"
        "require_binding: false\n"
    )
    result = run(
        app, "tee", "verify", str(quote), "--collateral", str(coll), "--at", at,
        "--policy", str(policy), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "ConfigurationAndSWHardeningNeeded"
