"""`teefl tee ...` commands through Typer's test runner, on an app holding only this group."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from paths import REPO
from typer.testing import CliRunner

from teefl.commands import tee as tee_commands
from teefl.errors import TeeflError

DATA = REPO.parent / "shared" / "testdata" / "attestation"


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
    args = ("tee", "verify", str(quote), "--collateral", str(coll), "--at", at, "--policy")
    result = run(app, *args, str(policy), "--json")
    # a --policy is judged as the federation would: it must pin the enclave
    assert "sgx evidence refused: the policy does not pin mrsigner" in str(result.exception)
    # `teefl tee policy` prints the pins of the verified quote; verify accepts with them
    result = run(app, "tee", "policy", str(quote), "--collateral", str(coll), "--at", at)
    assert result.exit_code == 0, result.output
    assert (
        result.stdout.startswith("# teefl tee policy: from ") and "verified (sgx)" in result.stdout
    )
    pins = yaml.safe_load(result.stdout)
    assert pins["mrenclave"] == ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]
    pins["require_binding"] = False
    policy.write_text(yaml.safe_dump(pins))
    result = run(app, *args, str(policy), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "ConfigurationAndSWHardeningNeeded"
    pins["mrenclave"] = ["11" * 32]
    policy.write_text(yaml.safe_dump(pins))
    result = run(app, *args, str(policy))
    assert "MRENCLAVE 33d8736db756ed49… not in policy" in str(result.exception)


@pytest.mark.skipif(not (DATA / "tdx_quote").is_file(), reason="attestation samples absent")
def test_policy_command_for_a_role_is_a_plan_block(tmp_path: Path, app: typer.Typer) -> None:
    """Unverified (no collateral) it says so; the block pastes into a plan as it is."""
    from teefl.plan import plan_from_dict

    result = run(app, "tee", "policy", str(DATA / "tdx_quote"), "--role", "collaborator")
    assert result.exit_code == 0, result.output
    assert "NOT VERIFIED" in result.stdout.splitlines()[0]
    block = yaml.safe_load(result.stdout)
    policy = block["security"]["attestation"]["policies"]["collaborators"]
    assert policy["mrtd"][0].startswith("91eb2b44d141d4ec")
    assert set(policy) >= {"rtmr0", "rtmr1", "rtmr2", "rtmr3", "xfam", "mrconfigid"}
    plan = plan_from_dict(block)
    assert plan.security.attestation.policies.collaborators.pinned_kinds() == ["tdx"]
    assert plan.security.attestation.policies.aggregator is None


SNP = DATA / "snp"


@pytest.mark.skipif(not (SNP / "manifest.json").is_file(), reason="SEV-SNP samples absent")
def test_verify_and_policy_accept_snp_reports(tmp_path: Path, app: typer.Typer) -> None:
    report = SNP / "reports/milan_virtee.report.bin"
    certs = ["--snp-certs", str(SNP / "chains/milan_ask_ark.pem")]
    certs += ["--snp-certs", str(SNP / "reports/milan_virtee.vcek.der")]
    crl = ["--snp-crl", str(SNP / "crl/milan_vcek.crl.pem")]
    at = ["--at", "2025-09-01T00:00:00Z"]
    result = run(app, "tee", "verify", str(report), *certs, *crl, *at)
    assert result.exit_code == 0, result.output
    assert "sev-snp v2, Milan, signed by the VCEK" in result.stdout
    assert "bootloader=3 tee=0 snp=8 microcode=115" in result.stdout
    result = run(app, "tee", "policy", str(report), *certs, *at)
    assert result.exit_code == 0, result.output
    pins = yaml.safe_load(result.stdout)
    assert pins["snp"]["min_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    pins["snp"]["min_tcb"]["microcode"] = 116
    policy = tmp_path / "snp.yaml"
    policy.write_text(yaml.safe_dump({**pins, "require_binding": False}))
    result = run(app, "tee", "verify", str(report), *certs, *at, "--policy", str(policy))
    assert "SNP TCB microcode 115 below the policy's minimum 116" in str(result.exception)
    # without the chain there is nothing to verify with, and it says what to give
    result = run(app, "tee", "verify", str(report), *at)
    assert "no VCEK for this report" in str(result.exception)
    # the debug report: refused by the defaults alone
    debug = SNP / "reports/milan_gsg_debug.report.bin"
    dcerts = ["--snp-certs", str(SNP / "chains/milan_ask_ark.pem")]
    dcerts += ["--snp-certs", str(SNP / "reports/milan_gsg_debug.vcek.der")]
    result = run(app, "tee", "verify", str(debug), *dcerts, *at)
    assert "allows DEBUG: debug guests are refused" in str(result.exception)


def test_policy_command_for_simulated_evidence(tmp_path: Path, app: typer.Typer) -> None:
    key = tmp_path / "sim.pem"
    result = run(app, "tee", "policy", "--simulated-key", str(key), "--role", "aggregator")
    assert result.exit_code == 0, result.output
    assert key.stat().st_mode & 0o777 == 0o600
    assert "SIMULATED evidence" in result.stdout.splitlines()[0]
    policy = yaml.safe_load(result.stdout)["security"]["attestation"]["policies"]["aggregator"]
    assert policy["allow_simulated"] is True and len(policy["simulated_keys"]) == 1
    again = run(app, "tee", "policy", "--simulated-key", str(key))
    assert yaml.safe_load(again.stdout)["simulated_keys"] == policy["simulated_keys"]
    result = run(app, "tee", "policy")
    assert "give a QUOTE_OR_REPORT file or --simulated-key FILE" in str(result.exception)
