"""Attested federations: mTLS + attestation required + the simulated provider (no TEE here).

The hostile collaborator runs in the test process with the real client certificate of col3, so
only its evidence is wrong: bound to another key, to a stale nonce, or from a measurement outside
the policy. Each is refused at Join before any model byte flows; col1 and col2 finish the run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedutil import SYNTHETIC, final_accuracy, phases, read_jsonl, run_dir_of, teefl, write_plan
from teefl.federation import attest, teefl_pb2, teefl_pb2_grpc
from teefl.plan import load_plan
from teefl.security import pki
from teefl.security.tee.evidence import (
    SimulatedProvider,
    default_simulated_measurements,
    load_or_create_simulated_key,
    simulated_key_fingerprint,
)


def pinned_attestation(tmp_path: Path) -> dict:
    """security.attestation with simulated evidence pinned as a plan must pin it: the simulated
    signing key (``tmp_path/sim.pem``, shared by every party like a platform's attestation key)
    by fingerprint, and the simulated measurements, in both roles' policies."""
    key_file = tmp_path / "sim.pem"
    policy = {
        "allow_simulated": True,
        "simulated_keys": [simulated_key_fingerprint(load_or_create_simulated_key(key_file))],
        **{k: [v.hex()] for k, v in default_simulated_measurements().items()},
    }
    return {
        "collaborators": "required",
        "aggregator": "required",
        "provider": "simulated",
        "allow_simulated": True,
        "simulated_key": str(key_file),
        "policies": {"aggregator": policy, "collaborators": policy},
    }


def test_attested_federation_completes(tmp_path: Path) -> None:
    data = {
        **SYNTHETIC,
        "security": {"transport": "mtls", "attestation": pinned_attestation(tmp_path)},
    }
    plan = write_plan(tmp_path / "plan.yaml", data)
    res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SIMULATED ATTESTATION" in res.stdout + res.stderr  # loud, on every run
    run = run_dir_of(tmp_path / "runs")
    assert "attest" in phases(run)
    for name in ("col1", "col2", "col3"):
        verdicts = json.loads((run / "attestation" / f"collaborator-{name}.json").read_text())
        assert verdicts[-1]["accepted"] is True and verdicts[-1]["kind"] == "simulated"
        mine = json.loads((run / "attestation" / "aggregator.json").read_text())
        assert mine[-1]["accepted"] is True
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["attestation"] == "required"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hostile(port: int, issued, mode: str, key_file: Path) -> tuple[str, int]:
    """col3 with bad evidence: returns (Join refusal, model bytes it managed to get)."""
    cdir = issued.client_dir
    creds = grpc.ssl_channel_credentials(
        issued.ca.read_bytes(), (cdir / "col3.key").read_bytes(), (cdir / "col3.crt").read_bytes()
    )
    own_spki = attest.spki_of_pem((cdir / "col3.crt").read_bytes())
    measurements = None
    if mode == "measurement":
        measurements = {"mrtd": b"\x66" * 48}
    provider = SimulatedProvider(allow_simulated=True, measurements=measurements, key_file=key_file)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        stub = teefl_pb2_grpc.FederationStub(ch)
        nonce = stub.Challenge(teefl_pb2.ChallengeRequest(collaborator="col3"), timeout=10).nonce
        spki = own_spki
        if mode == "other-key":
            other = ec.generate_private_key(ec.SECP256R1()).public_key()
            spki = other.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if mode == "stale-nonce":  # a newer challenge makes the first nonce stale
            stub.Challenge(teefl_pb2.ChallengeRequest(collaborator="col3"), timeout=10)
        ev = provider.get_evidence(attest.report_data_for(spki, nonce))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(
                teefl_pb2.JoinRequest(
                    collaborator="col3", evidence=attest.to_proto(ev), nonce=nonce
                ),
                timeout=10,
            )
        got = 0
        try:
            for chunk in stub.GetModel(
                teefl_pb2.ModelRequest(collaborator="col3", round=1), timeout=10
            ):
                got += len(chunk.data)
        except grpc.RpcError as exc:
            assert "has not passed attestation" in exc.details()
    return refused.value.details(), got


@pytest.mark.slow
def test_bad_evidence_is_refused_and_the_others_finish(tmp_path: Path) -> None:
    port = _free_port()
    data = {
        **SYNTHETIC,
        "network": {"host": "127.0.0.1", "port": port},
        "federation": {"rounds": 2, "min_collaborators": 2, "round_timeout": 8},
        "security": {"transport": "none"},
    }
    plan_path = write_plan(tmp_path / "plan.yaml", data)
    issued = pki.issue_for_plan(load_plan(plan_path), tmp_path / "pki")
    data["security"] = {
        "transport": "mtls",
        "attestation": pinned_attestation(tmp_path),
        "tls": {
            "ca": str(issued.ca),
            "server_cert": str(issued.server_cert),
            "server_key": str(issued.server_key),
            "client_dir": str(issued.client_dir),
        },
    }
    write_plan(plan_path, data)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "teefl"]
    logs = open(tmp_path / "procs.log", "w")  # noqa: SIM115
    agg = subprocess.Popen(
        [*base, "aggregator", "--plan", str(plan_path), "--run-dir", str(run), "--run-id", "att"],
        stdout=logs,
        stderr=logs,
        env=env,
    )
    procs = [agg]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (run / "run.json").exists() and json.loads((run / "run.json").read_text()).get(
                "status"
            ) == "running":
                break
            time.sleep(0.1)
        expected = {
            "other-key": "report data does not bind the TLS key",
            "stale-nonce": "stale or unknown nonce",
            "measurement": "MRTD 666666666666",
        }
        for mode, message in expected.items():
            refusal, got = _hostile(port, issued, mode, tmp_path / "sim.pem")
            assert message in refusal, (mode, refusal)
            assert got == 0, mode
        for name in ("col1", "col2"):
            procs.append(
                subprocess.Popen(
                    [
                        *base,
                        "collaborator",
                        "--plan",
                        str(plan_path),
                        "--name",
                        name,
                        "--run-dir",
                        str(run),
                    ],
                    stdout=logs,
                    stderr=logs,
                    env=env,
                )
            )
        for p in procs:
            assert p.wait(timeout=240) == 0, (tmp_path / "procs.log").read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
    verdicts = json.loads((run / "attestation" / "collaborator-col3.json").read_text())
    assert [v["accepted"] for v in verdicts] == [False, False, False]
    assert final_accuracy(run) > 0.4
    metrics = read_jsonl(run / "metrics.jsonl")
    assert all(set(m["collaborators"]) == {"col1", "col2"} for m in metrics)
