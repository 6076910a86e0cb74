"""The attestation policy: what must be pinned, per role, and the TDX identity checks.

Refusals at start are checked where they happen: ``attest.Verifier`` (each verifying party builds
it when it starts), ``teefl run`` (before any process starts) and a party started on its own.
TDX attribute checks run on the verdict of the real Intel-signed TDX quote in
``../shared/testdata/attestation`` with one field changed: the signature is not what is tested
there (test_tee_verify.py does that), the policy is.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from paths import REPO

from fedutil import SYNTHETIC, teefl, write_plan
from teefl.plan import plan_from_dict
from teefl.security import attest
from teefl.security.tee.policy import Policy, check_policy, require_pinned
from teefl.security.tee.simulated import (
    SimulatedProvider,
    default_simulated_measurements,
    load_or_create_simulated_key,
    simulated_key_fingerprint,
)
from teefl.security.tee.verify import (
    AttestationError,
    QuoteVerdict,
    report_data_for,
    verify_quote,
)

DATA = REPO.parent / "shared" / "testdata" / "attestation"
IN_WINDOW = datetime(2025, 7, 1, tzinfo=UTC)
H48 = "ab" * 48


@pytest.fixture(scope="module")
def tdx() -> QuoteVerdict:
    if not (DATA / "tdx_quote").is_file():
        pytest.skip(f"attestation samples not found at {DATA}")
    quote = (DATA / "tdx_quote").read_bytes()
    return verify_quote(quote, (DATA / "tdx_quote_collateral.json").read_text(), None, IN_WINDOW)


def tdx_pins(verdict: QuoteVerdict, **over) -> Policy:
    m = verdict.measurements
    pins = {k: [m[k]] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")}
    return Policy(require_binding=False, **{**pins, **over})


def with_measurement(verdict: QuoteVerdict, name: str, value: str) -> QuoteVerdict:
    return dataclasses.replace(verdict, measurements={**verdict.measurements, name: value})


# ---------------------------------------------------------------------------------------------
# TDX identity: attributes, XFAM, MRCONFIGID
# ---------------------------------------------------------------------------------------------


def test_debug_td_refused_by_default(tdx: QuoteVerdict) -> None:
    assert check_policy(tdx, tdx_pins(tdx), None, require_pinned=True) == []
    debug = with_measurement(tdx, "td_attributes", "0100001000000000")  # bit 0: DEBUG
    assert check_policy(debug, tdx_pins(tdx), None, require_pinned=True) == [
        "TD attribute DEBUG is set: debug TDs are refused (allow_debug)"
    ]
    assert check_policy(debug, tdx_pins(tdx, allow_debug=True), None) == []


def test_wrong_xfam_mrconfigid_or_attributes_refused_when_pinned(tdx: QuoteVerdict) -> None:
    m = tdx.measurements
    pinned = tdx_pins(
        tdx, xfam=[m["xfam"]], mrconfigid=[m["mr_config_id"]], td_attributes=[m["td_attributes"]]
    )
    assert check_policy(tdx, pinned, None, require_pinned=True) == []
    assert check_policy(tdx, tdx_pins(tdx, xfam=["e700060000000000"]), None) == [
        "XFAM e702060000000000 not in policy"
    ]
    assert check_policy(tdx, tdx_pins(tdx, mrconfigid=[H48]), None) == [
        f"MRCONFIGID {'00' * 8}… not in policy"
    ]
    assert check_policy(tdx, tdx_pins(tdx, td_attributes=["0000000000000000"]), None) == [
        "TD attributes 0000001000000000 not in policy"
    ]
    # not pinned: not checked (the quote's values differ from these and nothing is said)
    assert check_policy(with_measurement(tdx, "xfam", "ff" * 8), tdx_pins(tdx), None) == []


def test_debug_enclave_refused() -> None:
    verdict = QuoteVerdict(
        "sgx",
        3,
        "UpToDate",
        (),
        bytes(64),
        {
            "mrenclave": "11" * 32,
            "mrsigner": "22" * 32,
            "attributes": "0700000000000000" + "00" * 8,
        },
    )
    policy = Policy(mrenclave=["11" * 32], require_binding=False)
    assert check_policy(verdict, policy, None, require_pinned=True) == [
        "enclave attribute DEBUG is set: debug enclaves are refused"
    ]


# ---------------------------------------------------------------------------------------------
# What must be pinned
# ---------------------------------------------------------------------------------------------


def test_require_pinned_rules() -> None:
    where = "security.attestation.policies.collaborators"
    with pytest.raises(AttestationError, match=f"{where} is not set but attestation is required"):
        require_pinned(None, where)
    with pytest.raises(
        AttestationError, match=r"pins no TEE identity \(no measurement is pinned\)"
    ):
        require_pinned(Policy(), where)
    with pytest.raises(AttestationError, match=r"tdx lacks rtmr0, rtmr1, rtmr2, rtmr3"):
        require_pinned(Policy(mrtd=[H48]), where)
    with pytest.raises(AttestationError, match=r"sgx lacks isv_prod_id, min_isv_svn"):
        require_pinned(Policy(mrsigner=["00" * 32]), where)
    with pytest.raises(AttestationError, match=r"sev-snp lacks snp.min_tcb"):
        require_pinned(Policy(snp={"measurement": [H48]}), where)
    with pytest.raises(AttestationError, match="require_binding is false"):
        require_pinned(Policy(mrenclave=["00" * 32], require_binding=False), where)
    assert require_pinned(Policy(mrenclave=["00" * 32]), where) == []
    signer = Policy(mrsigner=["00" * 32], isv_prod_id=1, min_isv_svn=2)
    assert require_pinned(signer, where) == [] and signer.pinned_kinds() == ["sgx"]
    full = {k: [H48] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")}
    assert require_pinned(Policy(**full), where) == []
    # a stated subset is accepted, loudly
    subset = Policy(mrtd=[H48], rtmr0=[H48], rtmr1=[H48], tdx_unpinned=["rtmr2", "rtmr3"])
    (warning,) = require_pinned(subset, where)
    assert warning.startswith(f"{where} pins only MRTD, RTMR0, RTMR1 of a TD: RTMR2, RTMR3 NOT")
    with pytest.raises(ValueError, match="rtmr3 both pinned and listed in tdx_unpinned"):
        Policy(**full, tdx_unpinned=["rtmr3"])


def test_evidence_of_an_unpinned_kind_refused_by_a_mixed_policy(tdx: QuoteVerdict) -> None:
    """A policy for a TDX + SNP federation: each evidence judged by the pins of its kind, and a
    kind the policy does not pin is refused."""
    snp = {"measurement": [H48], "min_tcb": {"bootloader": 1, "tee": 0, "snp": 1, "microcode": 1}}
    mixed = tdx_pins(tdx, snp=snp)
    assert mixed.pinned_kinds() == ["tdx", "sev-snp"]
    assert check_policy(tdx, mixed, None, require_pinned=True) == []
    only_snp = Policy(snp=snp, require_binding=False)
    failures = check_policy(tdx, only_snp, None, require_pinned=True)
    assert failures[0] == (
        "tdx evidence refused: the policy does not pin mrtd, rtmr0, rtmr1, rtmr2, rtmr3"
    )
    assert "an SNP section required by policy but a tdx quote has none" in failures


# ---------------------------------------------------------------------------------------------
# Per-role policies through attest.Verifier
# ---------------------------------------------------------------------------------------------


def sim_spec(tmp_path: Path, **roles) -> tuple:
    """An AttestationSpec with a simulated key file, and per-role policies built from
    ``roles`` (role key -> measurement overrides, or None to leave the role unset)."""
    key_file = tmp_path / "sim.pem"
    fp = simulated_key_fingerprint(load_or_create_simulated_key(key_file))
    base = {k: v.hex() for k, v in default_simulated_measurements().items()}
    policies = {}
    for role, over in roles.items():
        if over is None:
            continue
        pins = {**base, **over}
        policies[role] = {
            "allow_simulated": True,
            "simulated_keys": [fp],
            **{k: [v] for k, v in pins.items()},
        }
    plan = plan_from_dict(
        {
            "security": {
                "transport": "mtls",
                "attestation": {
                    "collaborators": "required",
                    "aggregator": "required",
                    "provider": "simulated",
                    "allow_simulated": True,
                    "simulated_key": str(key_file),
                    "policies": policies,
                },
            }
        }
    )
    return plan.security.attestation, key_file


def test_each_role_is_judged_by_its_own_policy(tmp_path: Path) -> None:
    spec, key_file = sim_spec(tmp_path, aggregator={}, collaborators={"mrtd": H48})
    aggregator_ev = SimulatedProvider(allow_simulated=True, key_file=key_file)
    collaborator_ev = SimulatedProvider(
        allow_simulated=True, key_file=key_file, measurements={"mrtd": bytes.fromhex(H48)}
    )
    spki, nonce, binding = b"spki", bytes(32), bytes(range(32))
    rd = report_data_for(spki, nonce, binding)
    as_aggregator = attest.Verifier(spec, "aggregator")
    as_collaborator = attest.Verifier(spec, "collaborator")
    as_aggregator.verify(aggregator_ev.get_evidence(rd), spki, nonce, binding)
    as_collaborator.verify(collaborator_ev.get_evidence(rd), spki, nonce, binding)
    with pytest.raises(AttestationError, match=r"MRTD abababababababab… not in policy"):
        as_aggregator.verify(collaborator_ev.get_evidence(rd), spki, nonce, binding)
    with pytest.raises(AttestationError, match=r"MRTD [0-9a-f]{16}… not in policy"):
        as_collaborator.verify(aggregator_ev.get_evidence(rd), spki, nonce, binding)
    # a simulated key the plan does not pin is refused whatever it measures
    stranger = SimulatedProvider(allow_simulated=True)
    with pytest.raises(AttestationError, match=r"simulated signing key .* not in policy"):
        as_aggregator.verify(stranger.get_evidence(rd), spki, nonce, binding)
    with pytest.raises(ValueError, match="role must be one of"):
        attest.Verifier(spec, "collaborators")


def test_verifier_refuses_an_unpinned_role_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec, _ = sim_spec(tmp_path, aggregator={}, collaborators=None)
    attest.Verifier(spec, "aggregator")
    with pytest.raises(AttestationError, match=r"policies\.collaborators is not set"):
        attest.Verifier(spec, "collaborator")
    with pytest.raises(AttestationError, match=r"policies\.collaborators is not set"):
        attest.check_policies(spec)
    spec.policies.collaborators = Policy(
        mrtd=[H48], rtmr0=[H48], rtmr1=[H48], rtmr2=[H48], tdx_unpinned=["rtmr3"]
    )
    with caplog.at_level(logging.WARNING, logger="teefl.attest"):
        attest.Verifier(spec, "collaborator")
        attest.Verifier(spec, "collaborator")
    assert caplog.text.count("RTMR3 NOT CHECKED") == 2  # at every start


def _plan(tmp_path: Path, policies: dict) -> Path:
    return write_plan(
        tmp_path / "plan.yaml",
        {
            **SYNTHETIC,
            "security": {
                "transport": "mtls",
                "attestation": {
                    "collaborators": "required",
                    "provider": "simulated",
                    "allow_simulated": True,
                    "policies": policies,
                },
            },
        },
    )


def test_run_refuses_an_unpinned_required_policy_before_starting(tmp_path: Path) -> None:
    plan = _plan(tmp_path, {"collaborators": {"accepted_tcb_statuses": ["UpToDate"]}})
    res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path, timeout=180)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "security.attestation.policies.collaborators pins no TEE identity" in out
    assert not list((tmp_path / "runs").glob("*/events/*.jsonl"))  # no party was started


def test_aggregator_alone_refuses_an_unpinned_policy_at_start(tmp_path: Path) -> None:
    plan = _plan(tmp_path, {})
    from teefl.plan import load_plan
    from teefl.security import plan_pki

    issued = plan_pki.issue_for_plan(load_plan(plan), tmp_path / "pki")
    data = __import__("yaml").safe_load(plan.read_text())
    data["security"]["tls"] = {
        "ca": str(issued.ca),
        "server_cert": str(issued.server_cert),
        "server_key": str(issued.server_key),
        "client_dir": str(issued.client_dir),
    }
    write_plan(plan, data)
    res = teefl("aggregator", "--plan", str(plan), "--run-dir", "r", cwd=tmp_path, timeout=180)
    assert res.returncode != 0
    assert "security.attestation.policies.collaborators is not set" in res.stdout + res.stderr
