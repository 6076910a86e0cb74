"""The workload digest under attestation (issue 16, item 5): what each party's evidence binds.

A collaborator's evidence binds (plan, CA, its workload digest); the aggregator's binds (plan,
CA, its workload digest, its strategy's code digest). So a host cannot claim one digest at Join
while its TEE loaded other code, and a collaborator refuses an aggregator whose code its policy
does not allow -- before any model byte flows. Simulated evidence (a pinned test key) stands in
for the TEE: what is tested is teefl's binding and policy, not a TEE.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from fedutil import teefl, workload_digest_of, write_plan
from identutil import channel, live_aggregator, secure_plan
from teefl.plan import load_plan
from teefl.security import attest, certificates, session
from teefl.security.tee.simulated import SimulatedProvider
from teefl.wire import teefl_pb2, teefl_pb2_grpc

OTHER = "ab" * 32  # the digest of some other workload code


def _join(stub, plan, *, claim: str, bound: str) -> teefl_pb2.JoinReply:
    """Join as col1 claiming workload digest ``claim`` with evidence that binds ``bound``."""
    key = session.new_key()
    spki = session.spki_of(key)
    nonce = stub.Challenge(teefl_pb2.ChallengeRequest(collaborator="col1"), timeout=10).nonce
    provider = SimulatedProvider(
        allow_simulated=True, key_file=plan.security.attestation.simulated_key
    )
    ev = provider.get_evidence(
        attest.report_data_for(spki, nonce, attest.party_binding(plan, bound))
    )
    return stub.Join(
        teefl_pb2.JoinRequest(
            collaborator="col1",
            evidence=attest.to_proto(ev),
            nonce=nonce,
            session_key=spki,
            plan_sections=attest.config_sections(plan),
            workload_digest=claim,
        ),
        timeout=10,
    )


def test_evidence_bound_to_another_workload_digest_is_refused(tmp_path: Path) -> None:
    plan_path, _, issued = secure_plan(tmp_path, attested=True)
    plan = load_plan(plan_path)
    ours = workload_digest_of(plan)
    cert, key = certificates.collaborator_paths(tmp_path / "pki", "col1")
    with live_aggregator(plan_path, tmp_path / "run") as (agg, port):
        assert agg.identity.workload_digest == ours
        stub = teefl_pb2_grpc.FederationStub(
            channel(port, issued.ca, cert.read_bytes(), key.read_bytes())
        )
        # the lie: the aggregator's digest claimed, the TEE loaded other code and says so
        with pytest.raises(grpc.RpcError, match="report data does not bind") as lied:
            _join(stub, plan, claim=ours, bound=OTHER)
        assert lied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # honest about the other code: refused before the evidence, both digests named
        with pytest.raises(grpc.RpcError) as honest:
            _join(stub, plan, claim=OTHER, bound=OTHER)
        assert OTHER in honest.value.details() and ours in honest.value.details()
        # the control: the same evidence path with the right digest is accepted
        reply = _join(stub, plan, claim=ours, bound=ours)
        assert reply.session_cert
    verdicts = json.loads((tmp_path / "run" / "attestation" / "collaborator-col1.json").read_text())
    assert [v["accepted"] for v in verdicts] == [False, True]
    assert verdicts[0]["workload_digest"] == ours and "report data" in verdicts[0]["reason"]


def _collaborator(plan_path: Path, port: int, tmp_path: Path):
    return teefl(
        "collaborator",
        "--plan",
        str(plan_path),
        "--name",
        "col1",
        "--address",
        f"127.0.0.1:{port}",
        "--run-dir",
        str(tmp_path / "col1"),
        cwd=tmp_path,
        timeout=180,
    )


@pytest.mark.slow
def test_a_collaborator_refuses_an_aggregator_running_other_code(tmp_path: Path) -> None:
    """The aggregator's TEE binds its own digests honestly; a collaborator whose policy (its own
    digest, workload.allowed_digests) does not hold the aggregator's refuses it at Challenge,
    and admits it once the digest is listed. A claim that its evidence does not back is refused
    whatever the policy."""
    plan_path, data, _ = secure_plan(tmp_path, attested=True, collaborators=1)
    plan = load_plan(plan_path)
    ours = workload_digest_of(plan)

    def other_code(agg, claim: str, bound: str) -> None:  # what an aggregator's TEE would run
        agg.identity.workload_digest = claim
        agg.identity.binding = attest.party_binding(agg.plan, bound, agg.identity.strategy_digest)

    with live_aggregator(plan_path, tmp_path / "run") as (agg, port):
        assert agg.identity.strategy_digest == ""  # fedavg: teefl's own, named by the version
        other_code(agg, OTHER, OTHER)
        res = _collaborator(plan_path, port, tmp_path)
        assert res.returncode != 0
        assert f"the aggregator runs workload digest {OTHER}" in res.stderr, res.stderr[-3000:]
        assert ours in res.stderr
        other_code(agg, ours, OTHER)  # claims ours, its TEE loaded other code
        res = _collaborator(plan_path, port, tmp_path)
        assert res.returncode != 0
        assert "report data does not bind" in res.stderr, res.stderr[-3000:]
    verdicts = json.loads((tmp_path / "col1" / "attestation" / "aggregator.json").read_text())
    assert [v["accepted"] for v in verdicts] == [False, False]

    # listed in the plan: this collaborator now accepts that aggregator code and takes part
    data["workload"] = {"name": "vision", "allowed_digests": [OTHER]}
    write_plan(plan_path, data)
    with live_aggregator(plan_path, tmp_path / "run2") as (agg, port):
        other_code(agg, OTHER, OTHER)
        agg.identity.allowed_digests = frozenset({ours})  # it admits col1's code in turn
        res = teefl(
            "collaborator", "--plan", str(plan_path), "--name", "col1",
            "--address", f"127.0.0.1:{port}", "--run-dir", str(tmp_path / "col1b"),
            cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    verdicts = json.loads((tmp_path / "col1b" / "attestation" / "aggregator.json").read_text())
    assert verdicts[-1]["accepted"] is True
    assert verdicts[-1]["workload_digest"] == OTHER
    assert verdicts[-1]["strategy_checked"] == "yes"
