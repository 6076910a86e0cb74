"""Issue 19: "no model byte to, and no update from, an unattested party" against a host that
copies key files, replays tokens, edits the plan or offers a downgrade.

The attacker always holds only what a host operator can read: the provisioned certificate and
key files of a collaborator (never the key the collaborator made in its TEE, never the session
token in its memory), the plan and the CA certificate.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from fedutil import (
    SYNTHETIC,
    FakeContext,
    Parties,
    join_request,
    read_jsonl,
    run_plan,
    session_metadata,
    workload_digest_of,
    write_plan,
)
from identutil import (
    channel,
    client_ssl,
    fetch_pin,
    live_aggregator,
    model_bytes,
    msg,
    odd_client_cert,
    secure_plan,
    token_metadata,
)
from teefl.errors import TeeflError
from teefl.measure.events import EventRecorder
from teefl.plan import load_plan, plan_from_dict
from teefl.security import attest, certificates, crl, pki
from teefl.security.tee.simulated import SimulatedProvider
from teefl.server.aggregator import Aggregator, final_state
from teefl.transport import framing, socket_client
from teefl.wire import codec, teefl_pb2, teefl_pb2_grpc
from teefl.workload.datasets import dataset_shape
from teefl.workload.models import build_model


def _report_data(spki: bytes, nonce: bytes, binding: bytes) -> bytes:
    try:
        return attest.report_data_for(spki, nonce, binding)
    except TypeError:  # the protocol before the configuration binding
        return attest.report_data_for(spki, nonce)  # type: ignore[call-arg]


def _poisoned_update(plan, name: str, rnd: int) -> list[teefl_pb2.Chunk]:
    """The update of issue 19: every weight 7.0, claiming 1,000,000 samples."""
    channels, _, _, classes = dataset_shape(plan.dataset)
    state = build_model(plan.model.name, channels, classes).state_dict()
    state = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in state.items()}
    payload = bytes(codec.encode_state(state))
    header = teefl_pb2.Header(
        collaborator=name,
        round=rnd,
        total_size=len(payload),
        sha256=codec.sha256(payload),
        crc32c=codec.crc32c(payload),
        num_samples=1_000_000,
        format=codec.FORMAT,
    )
    size = 1 << 16
    return [teefl_pb2.Chunk(header=header)] + [
        teefl_pb2.Chunk(data=payload[i : i + size], offset=i) for i in range(0, len(payload), size)
    ]


def _try_everything(stub, plan) -> list[str]:
    """What a host with col1's key files can try on the gRPC calls that carry model data;
    asserts that no update is accepted and not one model byte comes back; returns the
    refusals."""
    refusals, accepted, leaked = [], [], 0
    for md in ((), token_metadata(os.urandom(32))):  # no token; a guessed one
        try:
            ack = stub.PutUpdate(iter(_poisoned_update(plan, "col1", 1)), timeout=30, metadata=md)
            accepted.append(ack.message)
        except grpc.RpcError as exc:
            refusals.append(exc.details())
        got, why = model_bytes(stub, "col1", md)
        leaked += got
        refusals.append(why)
        try:
            stub.WaitRound(
                teefl_pb2.WaitRequest(collaborator="col1", after_round=0), timeout=10, metadata=md
            )
            accepted.append("WaitRound answered")
        except grpc.RpcError as exc:
            refusals.append(exc.details())
    assert accepted == [] and leaked == 0, (accepted, leaked)
    assert all(refusals), refusals
    return refusals


def _data_plane_port(agg_log: Path) -> int:
    for line in agg_log.read_text().splitlines():
        if "data plane on port" in line:
            return int(line.rsplit("data plane on port", 1)[1].split(")")[0].strip())
    raise AssertionError("the aggregator did not announce its data plane")


def _no_data_plane_bytes(port: int, data_port: int, ca: Path, cert: Path, key: Path) -> None:
    """The copied certificate on the data plane, with a guessed token: refused before any
    model byte (whatever the token, the certificate is not the session's)."""
    tls = client_ssl(ca, port, cert, key)
    with pytest.raises((framing.RemoteError, framing.Closed, TeeflError)):
        sock = socket_client.connect("127.0.0.1", data_port, "col1", os.urandom(32), tls)
        req = teefl_pb2.ModelRequest(collaborator="col1", round=1)
        framing.send_frame(sock, framing.GET, req.SerializeToString())
        framing.expect(sock, framing.MODEL)


def _refused_join(stub, plan, name: str) -> str:
    """Join as ``name`` with evidence of another TEE image (the host has no TEE running the
    measured code); returns the refusal."""
    nonce = stub.Challenge(teefl_pb2.ChallengeRequest(collaborator=name), timeout=10).nonce
    spki = attest.spki_der_of(ec.generate_private_key(ec.SECP384R1()))
    # a genuine platform (the pinned simulated key) running another image
    wrong_image = SimulatedProvider(
        allow_simulated=True,
        measurements={"mrtd": b"\x66" * 48},
        key_file=getattr(plan.security.attestation, "simulated_key", None),
    )
    binding = attest.party_binding(plan, workload_digest_of(plan))
    ev = wrong_image.get_evidence(_report_data(spki, nonce, binding))
    request = msg(
        teefl_pb2.JoinRequest,
        collaborator=name,
        evidence=attest.to_proto(ev),
        nonce=nonce,
        session_key=spki,
        plan_sections=attest.config_sections(plan),
        workload_digest=workload_digest_of(plan),
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.Join(request, timeout=10)
    return refused.value.details()


@pytest.mark.slow
def test_copied_key_files_get_no_model_byte_and_no_update_counted(tmp_path: Path) -> None:
    """col1 attests and is then killed mid-round (its session alive at the aggregator); a
    process holding only copies of col1.crt/col1.key gets no model byte over gRPC or the data
    plane and has no update counted -- neither while col1's attestation stands nor after its
    own evidence was refused -- and the final model is the one of the same run without it."""
    federation = {"rounds": 2}
    base, _ = run_plan(
        tmp_path / "base", {**SYNTHETIC, "collaborators": 2, "federation": federation}, "none"
    )
    plan_path, _, issued = secure_plan(tmp_path, attested=True, federation=federation)
    plan = load_plan(plan_path)
    port = plan.network.port
    stolen = tmp_path / "attacker"  # all the attacker has: copies of col1's files, the CA
    stolen.mkdir()
    cert, key = (
        shutil.copy(p, stolen) for p in certificates.collaborator_paths(tmp_path / "pki", "col1")
    )
    cert, key = Path(cert), Path(key)
    run = tmp_path / "run"
    parties = Parties(plan_path, run, tmp_path / "procs.log")
    try:
        parties.aggregator()
        parties.wait_running()
        victim = parties.collaborator("col1", env={"TEEFL_FAULT_INJECT": "train:1"})
        assert victim.wait(timeout=120) == -signal.SIGKILL  # attested, joined, then gone
        verdicts = json.loads((run / "attestation" / "collaborator-col1.json").read_text())
        assert verdicts[-1]["accepted"] is True
        data_port = _data_plane_port(tmp_path / "procs.log")
        with channel(port, issued.ca, cert.read_bytes(), key.read_bytes()) as ch:
            stub = teefl_pb2_grpc.FederationStub(ch)
            # while col1's attestation stands
            _try_everything(stub, plan)
            _no_data_plane_bytes(port, data_port, issued.ca, cert, key)
            # after col1's evidence was refused
            assert "MRTD 666666" in _refused_join(stub, plan, "col1")
            _try_everything(stub, plan)
            _no_data_plane_bytes(port, data_port, issued.ca, cert, key)
        parties.collaborator("col1")  # the genuine col1, restarted: attests again
        parties.collaborator("col2")
        for who in ("aggregator", "col1", "col2"):
            rc = parties.procs[who].wait(timeout=240)
            assert rc == 0, f"{who} exited {rc}:\n" + parties.log.read_text()[-4000:]
    finally:
        parties.stop()
    for m in read_jsonl(run / "metrics.jsonl"):
        assert all(c["samples"] < 1_000_000 for c in m["collaborators"].values()), m
    a, b = final_state(base), final_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "the attacker changed the global model"


# -- sessions ----------------------------------------------------------------------------------
class _Tee:
    """The test playing col1's TEE: a key made in memory, genuine (simulated) evidence."""

    def __init__(self, plan, port: int, ca: Path, name: str = "col1") -> None:
        from teefl.security import session

        self.plan, self.port, self.ca, self.name = plan, port, ca, name
        self.key = session.new_key()
        self.key_pem = session.key_pem(self.key)
        self.spki = session.spki_of(self.key)
        #: the workload code it runs (what it claims at Join and its evidence binds)
        self.digest = workload_digest_of(plan)

    @property
    def binding(self) -> bytes:
        return attest.party_binding(self.plan, self.digest)

    def join(self, enrol_stub, measurements=None) -> teefl_pb2.JoinReply:
        nonce = enrol_stub.Challenge(
            teefl_pb2.ChallengeRequest(collaborator=self.name), timeout=10
        ).nonce
        provider = SimulatedProvider(
            allow_simulated=True,
            measurements=measurements,
            key_file=self.plan.security.attestation.simulated_key,
        )
        ev = provider.get_evidence(attest.report_data_for(self.spki, nonce, self.binding))
        return enrol_stub.Join(
            teefl_pb2.JoinRequest(
                collaborator=self.name,
                evidence=attest.to_proto(ev),
                nonce=nonce,
                session_key=self.spki,
                plan_sections=attest.config_sections(self.plan),
                workload_digest=self.digest,
            ),
            timeout=10,
        )

    def session_channel(self, reply) -> grpc.Channel:
        return channel(self.port, self.ca, reply.session_cert, self.key_pem)

    def data(self, agg, reply, token: bytes | None = None):
        from teefl.security import session

        roots = fetch_pin(self.port) + self.ca.read_bytes()  # attested aggregator, or the CA
        tls = session.client_ssl_context(roots, (reply.session_cert, self.key_pem), pinned=True)
        return socket_client.connect(
            "127.0.0.1", agg.data_port, self.name, token or reply.session_token, tls
        )


def _get(sock) -> int:
    req = teefl_pb2.ModelRequest(collaborator="col1", round=1)
    framing.send_frame(sock, framing.GET, req.SerializeToString())
    h = teefl_pb2.Header.FromString(framing.expect(sock, framing.MODEL))
    framing.recv_exact(sock, memoryview(bytearray(h.total_size)))
    return h.total_size


@pytest.mark.parametrize("roles", ["both", "collaborators"])
def test_a_join_ends_the_earlier_session_whatever_its_outcome(tmp_path: Path, roles: str) -> None:
    """With collaborators' attestation (and the aggregator's, or with its provisioned key)."""
    plan_path, _, issued = secure_plan(tmp_path, attested=True if roles == "both" else roles)
    plan = load_plan(plan_path)
    cert, key = certificates.collaborator_paths(tmp_path / "pki", "col1")
    with live_aggregator(plan_path, tmp_path / "run") as (agg, port):
        tee = _Tee(plan, port, issued.ca)
        enrol = channel(port, issued.ca, cert.read_bytes(), key.read_bytes())
        enrol_stub = teefl_pb2_grpc.FederationStub(enrol)
        reply = tee.join(enrol_stub)
        md = session_metadata(reply)
        session = teefl_pb2_grpc.FederationStub(tee.session_channel(reply))
        wait = teefl_pb2.WaitRequest(collaborator="col1", after_round=0)
        assert session.WaitRound(wait, timeout=10, metadata=md).round == 1
        sock = tee.data(agg, reply)
        assert _get(sock) == len(agg.payload)
        # model calls over the enrolment certificate are refused even with the right token
        with pytest.raises(grpc.RpcError, match="enrolment certificate"):
            enrol_stub.WaitRound(wait, timeout=10, metadata=md)
        # a refused Join (evidence of another image) ends the earlier session ...
        with pytest.raises(grpc.RpcError, match="MRTD"):
            tee.join(enrol_stub, measurements={"mrtd": b"\x66" * 48})
        with pytest.raises(grpc.RpcError) as err:
            session.WaitRound(wait, timeout=10, metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises((framing.Closed, OSError)):  # its data connection was cut
            _get(sock)
        with pytest.raises(framing.RemoteError, match="outdated"):
            tee.data(agg, reply)
        # ... and so does a successful one: the old token and certificate stop working
        first = tee.join(enrol_stub)
        second = tee.join(enrol_stub)
        stale = teefl_pb2_grpc.FederationStub(tee.session_channel(first))
        with pytest.raises(grpc.RpcError):
            stale.WaitRound(wait, timeout=10, metadata=session_metadata(first))
        with pytest.raises(grpc.RpcError, match="not passed attestation on this TLS key"):
            stale.WaitRound(wait, timeout=10, metadata=session_metadata(second))
        fresh = teefl_pb2_grpc.FederationStub(tee.session_channel(second))
        assert fresh.WaitRound(wait, timeout=10, metadata=session_metadata(second)).round == 1
        with tee.data(agg, second) as sock2:
            assert _get(sock2) == len(agg.payload)


def test_grpc_model_rpcs_are_refused_under_the_socket_data_plane(tmp_path: Path) -> None:
    plan = plan_from_dict({**SYNTHETIC, "collaborators": ["col1", "col2"]})
    assert plan.network.data_plane == "socket"
    agg = Aggregator(plan, tmp_path, "dp", EventRecorder(tmp_path, "dp", "aggregator", "agg"))
    wait = teefl_pb2.WaitRequest(collaborator="col1", after_round=0)
    with pytest.raises(RuntimeError, match="Join first"):  # every call needs the session token
        agg.grpc.WaitRound(wait, FakeContext())
    md = session_metadata(agg.grpc.Join(join_request(plan, "col1"), FakeContext()))
    assert agg.grpc.WaitRound(wait, FakeContext(md=md)).round == 1
    with pytest.raises(RuntimeError, match="data plane"):
        list(
            agg.grpc.GetModel(
                teefl_pb2.ModelRequest(collaborator="col1", round=1), FakeContext(md=md)
            )
        )
    update = _poisoned_update(plan, "col1", 1)
    update[0].header.num_samples = 10
    with pytest.raises(RuntimeError, match="data plane"):
        agg.grpc._put_update(iter(update), FakeContext(md=md))
    # the metrics-only evaluation report passes this gate (and is judged by the round logic)
    report = teefl_pb2.Header(collaborator="col1", round=1, evaluate_only=True, num_samples=5)
    with pytest.raises(RuntimeError, match="outside the evaluation pass"):
        agg.grpc._put_update(iter([teefl_pb2.Chunk(header=report)]), FakeContext(md=md))
    assert agg.received == {}


# -- the plan ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("attested", [False, True], ids=["fingerprint", "binding"])
@pytest.mark.parametrize("edited", ["collaborator", "aggregator"])
def test_host_edited_plan_is_refused_by_the_peer(
    tmp_path: Path, edited: str, attested: bool
) -> None:
    """One host turns keep_updates on in its copy of the plan: the run does not start, and the
    refusal names the section. Without attestation the aggregator compares the fingerprint at
    Join; with it the collaborator compares the aggregator's at Challenge (and the evidence's
    binding, which a lying host cannot fake, backs both: see the two tests below)."""
    plan_path, data, _ = secure_plan(
        tmp_path,
        transport="mtls" if attested else "tls",
        attested=attested,
        collaborators=1,
    )
    edited_path = tmp_path / "edited.yaml"
    write_plan(
        edited_path, {**data, "federation": {**data.get("federation", {}), "keep_updates": True}}
    )
    agg_plan, col_plan = (
        (plan_path, edited_path) if edited == "collaborator" else (edited_path, plan_path)
    )
    parties = Parties(agg_plan, tmp_path / "run", tmp_path / "procs.log")
    try:
        parties.aggregator()
        parties.wait_running()
        parties.plan = col_plan
        col = parties.collaborator("col1")
        assert col.wait(timeout=120) != 0
    finally:
        parties.stop()
    log = (tmp_path / "procs.log").read_text()
    if attested:  # the collaborator compares at Challenge already, before its evidence is made
        assert "aggregator attestation failed: the aggregator's plan differs from this " in log
        assert "collaborator's in: federation" in log, log[-3000:]
    else:  # the aggregator at Join, and names the collaborator
        assert "the plan of col1 differs from the aggregator's in: federation" in log, log[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_attested_binding_refuses_a_host_that_lies_about_its_plan(tmp_path: Path) -> None:
    """A host that sends the right plan fingerprint but runs an edited plan: its TEE binds the
    edited plan into the evidence, and the aggregator's own binding does not match."""
    plan_path, data, issued = secure_plan(tmp_path, attested=True)
    plan = load_plan(plan_path)
    edited = plan_from_dict({**data, "federation": {"keep_updates": True}})
    cert, key = certificates.collaborator_paths(tmp_path / "pki", "col1")
    with live_aggregator(plan_path, tmp_path / "run") as (_, port):
        tee = _Tee(edited, port, issued.ca)
        tee.plan = edited
        stub = teefl_pb2_grpc.FederationStub(
            channel(port, issued.ca, cert.read_bytes(), key.read_bytes())
        )
        nonce = stub.Challenge(teefl_pb2.ChallengeRequest(collaborator="col1"), timeout=10).nonce
        ev = SimulatedProvider(
            allow_simulated=True, key_file=plan.security.attestation.simulated_key
        ).get_evidence(attest.report_data_for(tee.spki, nonce, tee.binding))
        request = teefl_pb2.JoinRequest(
            collaborator="col1",
            evidence=attest.to_proto(ev),
            nonce=nonce,
            session_key=tee.spki,
            plan_sections=attest.config_sections(plan),  # the lie
            workload_digest=tee.digest,
        )
        with pytest.raises(grpc.RpcError, match="report data does not bind"):
            stub.Join(request, timeout=10)


def test_plan_fingerprint_ignores_host_local_fields_only(tmp_path: Path) -> None:
    from teefl.plan import plan_digest, plan_sections

    base = {**SYNTHETIC, "security": {"transport": "none"}}
    ref = plan_from_dict(base)
    local = plan_from_dict(
        {
            **base,
            "dataset": {**SYNTHETIC["dataset"], "root": "/somewhere/else"},
            "network": {"listen": "0.0.0.0"},
            "federation": {**SYNTHETIC["federation"], "staging_dir": "/tmp"},
        }
    )
    assert plan_digest(local) == plan_digest(ref)
    for change, section in (
        ({"federation": {**SYNTHETIC["federation"], "keep_updates": True}}, "federation"),
        ({"security": {"transport": "tls", "tls": {"ca": "x"}}}, "security"),
        ({"training": {**SYNTHETIC["training"], "lr": 0.1}}, "training"),
        ({"network": {"data_plane": "grpc"}}, "network"),
    ):
        other = plan_from_dict({**base, **change})
        assert plan_digest(other) != plan_digest(ref), change
        differ = attest.differing_sections(plan_sections(ref), plan_sections(other))
        assert differ == [section], (change, differ)


def test_binding_covers_the_ca(tmp_path: Path) -> None:
    a, _, _ = secure_plan(tmp_path / "a", path=tmp_path / "a.yaml", pki_dir=tmp_path / "pa")
    b, _, _ = secure_plan(tmp_path / "b", path=tmp_path / "b.yaml", pki_dir=tmp_path / "pb")
    pa, pb = load_plan(a), load_plan(b)
    pb.network.port = pa.network.port
    assert attest.differing_sections(attest.config_sections(pa), attest.config_sections(pb)) == [
        "ca"
    ]
    assert attest.config_binding(pa) != attest.config_binding(pb)


def test_collaborator_refuses_an_aggregator_that_claims_another_plan(tmp_path: Path) -> None:
    """Without attestation the aggregator's fingerprint is only a claim, but a claim of another
    plan (here one with keep_updates) is refused by the collaborator."""
    from teefl.client.collaborator import Collaborator

    plan = plan_from_dict({**SYNTHETIC, "network": {"data_plane": "grpc"}})
    edited = plan_from_dict(
        {**SYNTHETIC, "network": {"data_plane": "grpc"}, "federation": {"keep_updates": True}}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    teefl_pb2_grpc.add_FederationServicer_to_server(_NoDataPlane(edited), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        col = Collaborator(plan, "col1", f"127.0.0.1:{port}", tmp_path)
        with pytest.raises(
            TeeflError, match="the aggregator's plan differs from col1's in: federation"
        ):
            col.run()
    finally:
        server.stop(0)


# -- the downgrade -----------------------------------------------------------------------------
class _NoDataPlane(teefl_pb2_grpc.FederationServicer):
    """An aggregator that answers Join without a data port (and ends the run at once), claiming
    the plan ``plan``."""

    def __init__(self, plan) -> None:
        self.plan = plan

    def Join(self, request, context):
        return msg(
            teefl_pb2.JoinReply,
            run_id="fake",
            rounds=1,
            current_round=1,
            session_token=os.urandom(32),
            plan_sections=attest.config_sections(self.plan),
        )

    def WaitRound(self, request, context):
        return teefl_pb2.WaitReply(done=True)


@pytest.mark.parametrize("data_plane", ["socket", "grpc"])
def test_join_reply_without_data_port_is_refused_when_the_plan_says_socket(
    tmp_path: Path, data_plane: str
) -> None:
    from teefl.client.collaborator import Collaborator

    plan = plan_from_dict({**SYNTHETIC, "network": {"data_plane": data_plane}})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    teefl_pb2_grpc.add_FederationServicer_to_server(_NoDataPlane(plan), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        col = Collaborator(plan, "col1", f"127.0.0.1:{port}", tmp_path)
        if data_plane == "grpc":  # what the plan asks for: the fake is otherwise a fine peer
            assert col.run() == "fake"
        else:
            with pytest.raises(TeeflError, match="offers no data plane"):
                col.run()
    finally:
        server.stop(0)


# -- client certificates -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ({"ca": True}, "is a CA certificate"),
        ({"eku": None}, "lacks extended key usage clientAuth"),
    ],
    ids=["ca-true", "no-eku"],  # (EKU serverAuth only: TLS itself refuses it, on both ports)
)
def test_client_certificate_must_be_a_client_certificate(
    tmp_path: Path, kind: dict, message: str
) -> None:
    plan_path, _, issued = secure_plan(tmp_path)
    plan = load_plan(plan_path)
    bad_cert, bad_key = odd_client_cert(tmp_path / "pki", "col1", **kind)
    good_cert, good_key = certificates.collaborator_paths(tmp_path / "pki", "col1")
    with live_aggregator(plan_path, tmp_path / "run") as (agg, port):
        with (
            channel(port, issued.ca, bad_cert.read_bytes(), bad_key.read_bytes()) as ch,
            pytest.raises(grpc.RpcError, match=message),
        ):
            teefl_pb2_grpc.FederationStub(ch).Join(join_request(plan, "col1"), timeout=10)
        # a token from col1's genuine Join does not make the odd certificate acceptable on the
        # data plane either
        with channel(port, issued.ca, good_cert.read_bytes(), good_key.read_bytes()) as ch:
            reply = teefl_pb2_grpc.FederationStub(ch).Join(join_request(plan, "col1"), timeout=10)
        tls = client_ssl(issued.ca, port, bad_cert, bad_key)
        with pytest.raises(framing.RemoteError, match=message):
            socket_client.connect("127.0.0.1", agg.data_port, "col1", reply.session_token, tls)
        tls = client_ssl(issued.ca, port, good_cert, good_key)
        socket_client.connect("127.0.0.1", agg.data_port, "col1", reply.session_token, tls).close()


def test_pki_issues_client_certificates_the_aggregator_accepts(tmp_path: Path) -> None:
    secure_plan(tmp_path)
    cert = certificates.load_certificate(
        certificates.collaborator_paths(tmp_path / "pki", "col1")[0]
    )
    assert not certificates.is_ca(cert) and certificates.ekus(cert) == ["clientAuth"]


def test_revoked_certificate_is_refused(tmp_path: Path) -> None:
    from fedutil import teefl

    plan_path, _, _ = secure_plan(tmp_path)
    res = teefl("pki", "revoke", str(tmp_path / "pki"), "col2", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "revoked serial" in res.stdout
    plan_path, _, issued = secure_plan(tmp_path, port=load_plan(plan_path).network.port)
    assert issued.crl is not None and load_plan(plan_path).security.tls.crl is not None
    plan = load_plan(plan_path)
    with live_aggregator(plan_path, tmp_path / "run") as (_, port):
        for name, ok in (("col1", True), ("col2", False)):
            cert, key = certificates.collaborator_paths(tmp_path / "pki", name)
            with channel(port, issued.ca, cert.read_bytes(), key.read_bytes()) as ch:
                stub = teefl_pb2_grpc.FederationStub(ch)
                if ok:
                    stub.Join(join_request(plan, name), timeout=10)
                else:
                    with pytest.raises(grpc.RpcError, match="is revoked"):
                        stub.Join(join_request(plan, name), timeout=10)


def test_crl_is_checked_for_its_issuer_and_age(tmp_path: Path) -> None:
    import datetime as dt

    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    first = pki.issue_collaborator(tmp_path / "a", "col1")
    path, added = crl.revoke(tmp_path / "a", certificates=[first])
    second = pki.issue_collaborator(tmp_path / "a", "col1", force=True)
    _, again = crl.revoke(tmp_path / "a", certificates=[second, first])  # kept, not repeated
    serials = crl.load_crl(path, tmp_path / "a" / "ca.crt")
    assert len(added) == 1 and len(again) == 1 and len(serials) == 2
    with pytest.raises(TeeflError, match="not signed by CA"):
        crl.load_crl(path, tmp_path / "b" / "ca.crt")
    late = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(TeeflError, match="expired"):
        crl.load_crl(path, tmp_path / "a" / "ca.crt", now=late)


# -- the aggregator's quotes -------------------------------------------------------------------
def test_challenge_quotes_only_for_an_authenticated_caller_and_not_without_pause(
    tmp_path: Path,
) -> None:
    plan_path, _, issued = secure_plan(tmp_path, attested=True, collaborators=3)
    pki.issue_collaborator(tmp_path / "pki", "mallory")  # same CA, not in the plan
    quotes = []
    with live_aggregator(plan_path, tmp_path / "run") as (agg, port):
        real = agg.identity.provider

        class Counting:
            kind = real.kind

            def get_evidence(self, report_data: bytes):
                quotes.append(report_data)
                return real.get_evidence(report_data)

        agg.identity.provider = Counting()

        def challenge(cert_name: str, claim: str) -> str:
            cert, key = certificates.collaborator_paths(tmp_path / "pki", cert_name)
            with channel(port, issued.ca, cert.read_bytes(), key.read_bytes()) as ch:
                try:
                    teefl_pb2_grpc.FederationStub(ch).Challenge(
                        teefl_pb2.ChallengeRequest(
                            collaborator=claim, nonce=os.urandom(32), want_evidence=True
                        ),
                        timeout=10,
                    )
                except grpc.RpcError as exc:
                    return exc.details()
            return ""

        assert "not a collaborator of this plan" in challenge("mallory", "mallory")
        assert "does not match claimed collaborator name" in challenge("col1", "col2")
        assert quotes == []  # no quote for a caller that is not who it claims
        assert [challenge("col1", "col1") for _ in range(3)] == ["", "", ""]
        assert "rate limit" in challenge("col1", "col1")
        assert len(quotes) == 3
        assert challenge("col2", "col2") == ""  # one collaborator's limit is not another's
        assert len(quotes) == 4


def test_rate_limiter_refills() -> None:
    limiter = attest.RateLimiter()
    assert limiter.allow(("a", 2, 0.2)) == 0 and limiter.allow(("a", 2, 0.2)) == 0
    assert limiter.allow(("a", 2, 0.2)) > 0
    assert limiter.allow(("b", 2, 0.2)) == 0  # another key
    time.sleep(0.25)
    assert limiter.allow(("a", 2, 0.2)) == 0


def test_endorsement_binds_key_nonce_and_configuration(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    cert_path = pki.issue_aggregator(tmp_path, ["127.0.0.1"])
    key = certificates.load_private_key(certificates.aggregator_paths(tmp_path)[1])
    spki, nonce, binding = b"spki", os.urandom(32), os.urandom(32)
    sig = attest.endorse(key, spki, nonce, binding)
    pem = cert_path.read_bytes()
    ca = tmp_path / "ca.crt"
    attest.verify_endorsement(pem, sig, spki, nonce, binding, ca=ca, host="127.0.0.1")
    for args in ((b"other", nonce, binding), (spki, os.urandom(32), binding), (spki, nonce, b"x")):
        with pytest.raises(attest.AttestationError, match="did not sign"):
            attest.verify_endorsement(pem, sig, *args, ca=ca, host="127.0.0.1")
    with pytest.raises(attest.AttestationError, match="does not cover host"):
        attest.verify_endorsement(pem, sig, spki, nonce, binding, ca=ca, host="10.9.9.9")
    serial = certificates.load_certificate(cert_path).serial_number
    with pytest.raises(attest.AttestationError, match="revoked"):
        attest.verify_endorsement(
            pem, sig, spki, nonce, binding, ca=ca, host="127.0.0.1", revoked=frozenset({serial})
        )
    client = pki.issue_collaborator(tmp_path, "col1")
    with pytest.raises(attest.AttestationError, match="not a server certificate"):
        attest.verify_endorsement(
            client.read_bytes(), sig, spki, nonce, binding, ca=ca, host="127.0.0.1"
        )


def test_in_memory_keys_never_touch_a_file(monkeypatch) -> None:
    """An in-memory key reaches Python's ssl through an anonymous in-memory file only (no
    path is opened from Python), and the context it makes completes a TLS 1.3 handshake."""
    import builtins
    import socket
    import threading

    from teefl.security import session

    opened: list[str] = []
    memfds: list[str] = []
    real_open, real_builtin, real_memfd = os.open, builtins.open, os.memfd_create

    def spy(real):
        return lambda p, *a, **k: opened.append(str(p)) or real(p, *a, **k)

    monkeypatch.setattr(os, "open", spy(real_open))
    monkeypatch.setattr(builtins, "open", spy(real_builtin))
    monkeypatch.setattr(os, "memfd_create", lambda n, *a: memfds.append(n) or real_memfd(n, *a))
    key = session.new_key()
    pem = session.self_signed_server(key, ["127.0.0.1"])
    server = session.server_ssl_context((pem, session.key_pem(key)), None)
    client = session.client_ssl_context(pem, None, pinned=True)
    assert opened == [] and memfds == ["teefl-tls"]  # the server key; the client has none
    monkeypatch.undo()
    a, b = socket.socketpair()
    with a, b:
        out: list[str] = []

        def serve() -> None:
            with server.wrap_socket(a, server_side=True) as tls:
                out.append(tls.version() or "")

        t = threading.Thread(target=serve)
        t.start()
        with client.wrap_socket(b, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"
        t.join(10)
    assert out == ["TLSv1.3"]
