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
from identutil import (
    attested_plan_data,
    channel,
    live_aggregator,
    model_bytes,
    secure_plan,
    sim_key,
)
from teefl.errors import TeeflError
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


# -- re-attestation during a run (security.attestation.reattest_every) --------------------------
def _verdicts(run: Path, party: str) -> list[dict]:
    return json.loads((run / "attestation" / f"{party}.json").read_text())


@pytest.mark.slow
def test_reattestation_uses_fresh_nonces_and_drops_a_party_whose_evidence_stops_verifying(
    tmp_path: Path,
) -> None:
    """``reattest_every: {rounds: 2}``, both roles attested, 4 rounds: every party attests at
    rounds 1, 3 and the evaluation pass (5), each time for a fresh nonce. col3's platform key
    is gone after its first Join (the test deletes its copy), so its evidence at round 3 is
    signed by a key the policy does not pin: it is refused, dropped from round 3 (told why,
    its session ended: no model byte of round 3, no update) and col1 and col2 finish -- round 3
    closes on their updates, not on round_timeout."""
    plan_path, data, _ = secure_plan(
        tmp_path,
        attested=True,
        collaborators=3,
        # round_timeout long: a round closed by the timeout would show as round_quorum
        federation={"rounds": 4, "min_collaborators": 2, "round_timeout": 300},
    )
    data["security"]["attestation"]["reattest_every"] = {"rounds": 2}
    write_plan(plan_path, data)
    # col3's own plan copy: the same plan but for the (host-local) simulated key file
    key3 = tmp_path / "col3-sim.pem"
    key3.write_bytes(sim_key(tmp_path).read_bytes())
    key3.chmod(0o600)
    data3 = json.loads(json.dumps(data))
    data3["security"]["attestation"]["simulated_key"] = str(key3)
    plan3 = write_plan(tmp_path / "plan-col3.yaml", data3)
    run = tmp_path / "run"
    parties = Parties(plan_path, run, tmp_path / "procs.log")
    try:
        parties.aggregator()
        parties.wait_running()
        parties.collaborator("col1")
        parties.collaborator("col2")
        col3 = parties.collaborator("col3", plan=plan3)
        parties.wait_event(
            lambda e: (
                e.get("phase") == "attest"
                and e.get("collaborator") == "col3"
                and e.get("accepted") is True
            )
        )
        key3.unlink()  # col3's next evidence is signed by a fresh key of its provider
        for who in ("aggregator", "col1", "col2"):
            rc = parties.procs[who].wait(timeout=300)
            assert rc == 0, f"{who} exited {rc}:\n" + parties.log.read_text()[-4000:]
        assert col3.wait(timeout=60) == 2
    finally:
        parties.stop()
    log = parties.log.read_text()
    assert (
        "col3 leaves the run: re-attestation before round 3 failed: aggregator refused col3: "
        in log
    ), log[-4000:]
    assert "not in policy simulated_keys" in log
    # fresh evidence for a fresh nonce every time, in both directions
    for name in ("col1", "col2"):
        mine = _verdicts(run, f"collaborator-{name}")
        assert [(v["accepted"], v["round"], v["reattest"]) for v in mine] == [
            (True, 1, False),
            (True, 3, True),
            (True, 5, True),
        ], mine
        assert len({v["nonce"] for v in mine}) == 3
    refused = _verdicts(run, "collaborator-col3")
    assert [(v["accepted"], v["round"], v["reattest"]) for v in refused] == [
        (True, 1, False),
        (False, 3, True),
    ]
    assert "not in policy simulated_keys" in refused[1]["reason"]
    checks = _verdicts(run, "aggregator")  # each collaborator's checks of the aggregator
    assert all(c["accepted"] for c in checks)
    assert sorted(c["collaborator"] for c in checks) == ["col1"] * 3 + ["col2"] * 3 + ["col3"] * 2
    assert len({c["nonce"] for c in checks}) == len(checks)
    # col3 in rounds 1 and 2 only; the others finish without waiting for it
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [(m["round"], sorted(m["collaborators"])) for m in metrics] == [
        (1, ["col1", "col2", "col3"]),
        (2, ["col1", "col2", "col3"]),
        (3, ["col1", "col2"]),
        (4, ["col1", "col2"]),
        ("final", ["col1", "col2"]),
    ]
    events = read_jsonl(run / "events" / "aggregator.jsonl")
    dropped = [e for e in events if e.get("what") == "dropped"]
    assert [(e["collaborator"], e["round"]) for e in dropped] == [("col3", 3)]
    assert not [e for e in events if e.get("what") == "round_quorum"]
    served = {
        e["round"]
        for e in events
        if e.get("phase") == "serve_download" and e.get("collaborator") == "col3"
    }
    assert served == {1, 2}  # no model byte of round 3
    renewals = [
        e for e in events if e.get("phase") == "attest" and e.get("reattest") and "round" in e
    ]
    assert len(renewals) == 5  # col1, col2 at rounds 3 and 5; col3 at round 3 (refused)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


class _Flipping:
    """The aggregator's evidence source: the real (simulated) one at the first Challenge, then
    one whose measurement the collaborators' policy does not allow."""

    def __init__(self, good, bad) -> None:
        self.good, self.bad, self.calls = good, bad, 0

    def get_evidence(self, report_data: bytes):
        self.calls += 1
        return (self.good if self.calls == 1 else self.bad).get_evidence(report_data)


@pytest.mark.slow
def test_a_collaborator_stops_when_the_aggregators_fresh_evidence_fails(tmp_path: Path) -> None:
    """``reattest_every: {rounds: 1}`` with the aggregator's attestation: before round 2 the
    collaborator Challenges again, the aggregator's fresh evidence shows another MRTD, and the
    collaborator leaves the run saying why -- it asks for no model of round 2."""
    from teefl.client.collaborator import Collaborator

    plan_path, data, _ = secure_plan(
        tmp_path, attested="aggregator", collaborators=["col1"], federation={"rounds": 2}
    )
    data["security"]["attestation"]["reattest_every"] = {"rounds": 1}
    data["network"]["data_plane"] = "grpc"
    write_plan(plan_path, data)
    plan = load_plan(plan_path)
    with live_aggregator(plan_path, tmp_path / "run") as (agg, port):
        bad = SimulatedProvider(
            allow_simulated=True, key_file=sim_key(tmp_path), measurements={"mrtd": b"\x66" * 48}
        )
        agg.identity.provider = _Flipping(agg.identity.provider, bad)
        col = Collaborator(plan, "col1", f"127.0.0.1:{port}", tmp_path / "run")
        with pytest.raises(TeeflError) as err:
            col.run()
        assert agg.round == 2 and agg.received == {}
    assert str(err.value).startswith(
        "col1 leaves the run: re-attestation before round 2 failed: aggregator attestation failed: "
    )
    assert "MRTD 666666" in str(err.value)
    checks = _verdicts(tmp_path / "run", "aggregator")
    assert [(c["accepted"], c["round"], c["reattest"]) for c in checks] == [
        (True, 1, False),
        (False, 2, True),
    ]
    assert checks[0]["nonce"] != checks[1]["nonce"]
    events = read_jsonl(tmp_path / "run" / "events" / "collaborator-col1.jsonl")
    assert [e["round"] for e in events if e.get("phase") == "download"] == [1]
    renewals = [e for e in events if e.get("phase") == "attest" and e.get("reattest")]
    assert [(e["round"], e["accepted"]) for e in renewals] == [(2, False)]
