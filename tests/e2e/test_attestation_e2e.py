"""Attested federations: mTLS + attestation required + the simulated provider (no TEE here).

Each party makes its TLS key in its own process (its "TEE") at start-up: the aggregator serves
with a self-signed certificate that collaborators pin after checking its evidence and
endorsement, and each collaborator gets a session certificate for its in-memory key at Join.

The hostile collaborator runs in the test process with the real client certificate of col3, so
only its evidence is wrong: bound to another key, to another configuration, to a stale nonce, or
from a measurement outside the policy. Each is refused at Join before any model byte flows; col1
and col2 finish the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from fedutil import (
    Parties,
    final_accuracy,
    phases,
    read_jsonl,
    run_dir_of,
    teefl,
    workload_digest_of,
    write_plan,
)
from identutil import attested_plan_data, channel, model_bytes, secure_plan, sim_key
from teefl.plan import load_plan
from teefl.security import attest, certificates, session
from teefl.security.tee.simulated import SimulatedProvider
from teefl.wire import teefl_pb2, teefl_pb2_grpc


def test_attested_federation_completes(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.yaml", attested_plan_data(tmp_path))
    res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SIMULATED ATTESTATION" in res.stdout + res.stderr  # loud, on every run
    run = run_dir_of(tmp_path / "runs")
    assert "attest" in phases(run)
    pkid = run / "pki"  # the throwaway PKI: the provisioned identities
    served = json.loads((run / "attestation" / "aggregator.json").read_text())[-1]
    assert served["accepted"] is True
    # the key the aggregator's evidence vouches for was made in its process, not read from
    # pki/aggregator.key (which only endorsed it)
    provisioned = attest.fingerprint(attest.spki_of_pem((pkid / "aggregator.crt").read_bytes()))
    assert served["tls_key"] != provisioned
    for name in ("col1", "col2", "col3"):
        verdicts = json.loads((run / "attestation" / f"collaborator-{name}.json").read_text())
        assert verdicts[-1]["accepted"] is True and verdicts[-1]["kind"] == "simulated"
        cert = certificates.collaborator_paths(pkid, name)[0]
        assert verdicts[-1]["session_key"] != attest.fingerprint(
            attest.spki_of_pem(cert.read_bytes())
        )
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["attestation"] == "required"


def _hostile(port: int, issued, plan, mode: str, key_file: Path) -> tuple[str, int]:
    """col3 with bad evidence: returns (Join refusal, model bytes it managed to get)."""
    cdir = issued.client_dir
    key = session.new_key()
    spki = session.spki_of(key)
    binding = attest.party_binding(plan, workload_digest_of(plan))
    measurements = None
    if mode == "measurement":
        measurements = {"mrtd": b"\x66" * 48}
    provider = SimulatedProvider(allow_simulated=True, measurements=measurements, key_file=key_file)
    with channel(
        port, issued.ca, (cdir / "col3.crt").read_bytes(), (cdir / "col3.key").read_bytes()
    ) as ch:
        stub = teefl_pb2_grpc.FederationStub(ch)
        nonce = stub.Challenge(teefl_pb2.ChallengeRequest(collaborator="col3"), timeout=10).nonce
        signed = spki
        if mode == "other-key":  # evidence for one key, a session asked for another
            signed = session.spki_of(session.new_key())
        if mode == "other-plan":  # the host edited the plan its TEE runs with
            binding = hashlib.sha256(b"an edited plan").digest()
        if mode == "stale-nonce":  # a newer challenge makes the first nonce stale
            stub.Challenge(teefl_pb2.ChallengeRequest(collaborator="col3"), timeout=10)
        ev = provider.get_evidence(attest.report_data_for(signed, nonce, binding))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(
                teefl_pb2.JoinRequest(
                    collaborator="col3",
                    evidence=attest.to_proto(ev),
                    nonce=nonce,
                    session_key=spki,
                    plan_sections=attest.config_sections(plan),
                    workload_digest=workload_digest_of(plan),
                ),
                timeout=10,
            )
        got, why = model_bytes(stub, "col3")
        assert "Join first" in why
    return refused.value.details(), got


@pytest.mark.slow
def test_bad_evidence_is_refused_and_the_others_finish(tmp_path: Path) -> None:
    plan_path, _, issued = secure_plan(
        tmp_path,
        attested=True,
        collaborators=3,
        # each round waits this long for col3 before it closes with col1 and col2; it is also
        # how long the aggregator waits for anyone at all (the collaborators start with it, and
        # a loaded machine takes 10-20 s to start one)
        federation={"rounds": 2, "min_collaborators": 2, "round_timeout": 25},
    )
    port = load_plan(plan_path).network.port
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
        # started with the aggregator, so their start-up (tens of seconds on a loaded machine)
        # overlaps its own: round 1's clock runs from the aggregator's start
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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (run / "run.json").exists() and json.loads((run / "run.json").read_text()).get(
                "status"
            ) == "running":
                break
            time.sleep(0.1)
        expected = {
            "other-key": "report data does not bind the TLS key",
            "other-plan": "report data does not bind the TLS key",
            "stale-nonce": "stale or unknown nonce",
            "measurement": "MRTD 666666666666",
        }
        for mode, message in expected.items():
            refusal, got = _hostile(port, issued, load_plan(plan_path), mode, sim_key(tmp_path))
            assert message in refusal, (mode, refusal)
            assert got == 0, mode
        for p in procs:
            assert p.wait(timeout=240) == 0, (tmp_path / "procs.log").read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
    verdicts = json.loads((run / "attestation" / "collaborator-col3.json").read_text())
    assert [v["accepted"] for v in verdicts] == [False] * 4
    assert final_accuracy(run) > 0.4
    metrics = read_jsonl(run / "metrics.jsonl")
    assert all(set(m["collaborators"]) == {"col1", "col2"} for m in metrics)


@pytest.mark.slow
def test_restarted_attested_aggregator_is_verified_and_pinned_again(tmp_path: Path) -> None:
    """A restarted aggregator has a new in-memory key (and session CA): each collaborator
    fetches, verifies and pins it again, gets a new session certificate, and finishes."""
    plan_path, _, _ = secure_plan(
        tmp_path, attested=True, collaborators=2, federation={"rounds": 3}
    )
    run = tmp_path / "run"
    parties = Parties(plan_path, run, tmp_path / "procs.log")
    try:
        agg = parties.aggregator()
        parties.wait_running()
        for name in ("col1", "col2"):
            parties.collaborator(name)
        parties.wait_event(lambda e: e.get("what") == "update_accepted" and e.get("round") == 2)
        agg.send_signal(signal.SIGKILL)
        agg.wait()
        parties.aggregator()  # same run directory: resume, with a new key
        for who in ("aggregator", "col1", "col2"):
            rc = parties.procs[who].wait(timeout=240)
            assert rc == 0, f"{who} exited {rc}:\n" + parties.log.read_text()[-4000:]
    finally:
        parties.stop()
    verdicts = json.loads((run / "attestation" / "aggregator.json").read_text())
    keys = {v["tls_key"] for v in verdicts if v["accepted"]}
    assert len(keys) == 2, verdicts  # one per aggregator process
    for name in ("col1", "col2"):
        joins = json.loads((run / "attestation" / f"collaborator-{name}.json").read_text())
        assert sum(v["accepted"] for v in joins) >= 2
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
