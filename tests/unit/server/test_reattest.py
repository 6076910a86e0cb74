"""Re-attestation on the aggregator (``security.attestation.reattest_every``), driven through
`Service` with fake `Peer`s and simulated evidence: no gRPC, no sockets.

The plan requires collaborators' attestation (transport mtls, as a plan must say); the peer
check is then set to ``none`` on the live object, so the tests need no PKI -- what they check
is the cadence, the Join's verdicts and what a collaborator whose attestation is due may do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedutil import SYNTHETIC
from identutil import attestation_spec, sim_key
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.security import attest
from teefl.security import session as session_keys
from teefl.security.tee.simulated import SimulatedProvider
from teefl.server.aggregator import Aggregator
from teefl.transport.base import REATTEST_DUE, Peer, Refused
from teefl.transport.client import Reattest, status_error
from teefl.wire import codec, teefl_pb2


class Handle:
    def cancel(self) -> None:
        pass


class Tee:
    """A collaborator's "TEE": its in-memory key and the simulated provider (``key_file``:
    the signing key its evidence is made with; another than the plan's is refused)."""

    def __init__(self, agg: Aggregator, name: str, key_file: Path) -> None:
        self.agg, self.name, self.key_file = agg, name, key_file
        self.key = session_keys.new_key()

    def join(self) -> Peer:
        """Challenge and Join with fresh evidence; returns the session's peer."""
        agg, spki = self.agg, session_keys.spki_of(self.key)
        enrol = Peer(self.name)
        nonce = agg.service.challenge(
            enrol, teefl_pb2.ChallengeRequest(collaborator=self.name)
        ).nonce
        binding = attest.party_binding(agg.plan, agg.workload.digest)
        provider = SimulatedProvider(allow_simulated=True, key_file=self.key_file)
        ev = provider.get_evidence(attest.report_data_for(spki, nonce, binding))
        reply = agg.service.join(
            enrol,
            teefl_pb2.JoinRequest(
                collaborator=self.name,
                evidence=attest.to_proto(ev),
                nonce=nonce,
                session_key=spki,
                plan_sections=attest.config_sections(agg.plan),
                workload_digest=agg.workload.digest,
            ),
        )
        return Peer(self.name, token=reply.session_token, handle=Handle(), on_end=lambda fn: True)


def _agg(tmp_path: Path, every: dict[str, Any], **fed: Any) -> Aggregator:
    att = {**attestation_spec(tmp_path, "collaborators"), "reattest_every": every}
    plan = plan_from_dict(
        {
            **SYNTHETIC,
            "collaborators": 2,
            "federation": {"rounds": 3, "update_staging": "disk", **fed},
            "security": {"transport": "mtls", "attestation": att},
        }
    )
    run = tmp_path / "run"
    agg = Aggregator(plan, run, "t", EventRecorder(run, "t", "aggregator", "aggregator"))
    agg.identity.transport = "none"  # the cadence, not the certificates, is under test
    return agg


def _wait(agg: Aggregator, peer: Peer, after: int) -> teefl_pb2.WaitReply:
    return agg.service.wait_round(
        peer, teefl_pb2.WaitRequest(collaborator=peer.name, after_round=after)
    )


def _update(agg: Aggregator, peer: Peer, rnd: int) -> teefl_pb2.UpdateAck:
    """One update of round ``rnd`` (the global model itself), as a transport drives it."""
    name = agg.identity.check(peer)
    payload = bytes(codec.encode_state(agg.global_state))
    h = teefl_pb2.Header(
        collaborator=name,
        round=rnd,
        total_size=len(payload),
        format=codec.FORMAT,
        num_samples=10,
        crc32c=codec.crc32c(payload),
    )
    up = agg.service.upload(name, h, peer.handle.cancel, None, peer.token, 0)
    try:
        up.acquire()
        assert up.open() is None
        up.prepare(data_plane=False).add(payload)
        return up.complete(defer_add=False)[0]
    finally:
        up.close()


def _close(agg: Aggregator, peers: dict[str, Peer], rnd: int) -> None:
    for peer in peers.values():
        assert _wait(agg, peer, rnd - 1).round == rnd
        assert _update(agg, peer, rnd).accepted
    agg.rounds.close_pending_round()
    assert agg.round == rnd + 1


def _verdicts(agg: Aggregator, name: str) -> list[dict[str, Any]]:
    return json.loads((agg.run_dir / "attestation" / f"collaborator-{name}.json").read_text())


def _events(agg: Aggregator) -> list[dict[str, Any]]:
    agg.rec.close()
    path = agg.run_dir / "events" / "aggregator.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rounds_cadence_asks_for_fresh_evidence_and_refuses_the_model_until_then(tmp_path):
    agg = _agg(tmp_path, {"rounds": 2})
    tees = {n: Tee(agg, n, sim_key(tmp_path)) for n in agg.names}
    peers = {n: t.join() for n, t in tees.items()}
    _close(agg, peers, 1)  # attested in round 1: rounds 1 and 2 are covered
    _close(agg, peers, 2)
    col1 = peers["col1"]
    due = _wait(agg, col1, 2)
    assert due.reattest and due.round == 3
    # a collaborator that ignores it gets neither the model nor an update taken
    with pytest.raises(Refused, match=REATTEST_DUE) as err:
        agg.service.download("col1", 3, lambda: None)
    assert err.value.status == "FAILED_PRECONDITION"
    assert isinstance(status_error(err.value.status, err.value.reason, "col1"), Reattest)
    with pytest.raises(Refused, match="does not cover round 3"):
        _update(agg, col1, 3)
    assert agg.received == {}
    # fresh evidence for a fresh nonce: round 3 is its again
    col1 = tees["col1"].join()
    assert not _wait(agg, col1, 2).reattest
    assert agg.service.download("col1", 3, lambda: None).rnd == 3
    assert _update(agg, col1, 3).accepted
    verdicts = _verdicts(agg, "col1")
    assert [(v["accepted"], v["round"], v["reattest"]) for v in verdicts] == [
        (True, 1, False),
        (True, 3, True),
    ]
    assert len({v["nonce"] for v in verdicts}) == 2
    attests = [e for e in _events(agg) if e.get("phase") == "attest"]
    assert [e.get("reattest", False) for e in attests if e["collaborator"] == "col1"] == [
        False,
        True,
    ]


def test_a_refused_reattestation_drops_the_member_and_the_round_closes_without_it(tmp_path):
    agg = _agg(tmp_path, {"rounds": 1}, min_collaborators=1)
    key2 = tmp_path / "col2-sim.pem"
    key2.write_bytes(sim_key(tmp_path).read_bytes())
    key2.chmod(0o600)
    tees = {"col1": Tee(agg, "col1", sim_key(tmp_path)), "col2": Tee(agg, "col2", key2)}
    peers = {n: t.join() for n, t in tees.items()}
    _close(agg, peers, 1)
    key2.unlink()  # col2's platform key is gone: its next evidence is signed by another one
    assert _wait(agg, peers["col2"], 1).reattest
    with pytest.raises(Refused, match="not in policy simulated_keys"):
        tees["col2"].join()
    with pytest.raises(Refused, match="Join first"):  # its session ended with the refusal
        agg.identity.check(peers["col2"])
    assert "col2" in agg.rounds.excluded
    col1 = tees["col1"].join()
    assert _wait(agg, col1, 1).round == 2
    assert _update(agg, col1, 2).accepted
    # col2 is not waited for: the round closes on col1's update, without round_timeout
    assert agg.rounds.close_pending
    agg.rounds.close_pending_round()
    assert agg.round == 3
    assert [v["accepted"] for v in _verdicts(agg, "col2")] == [True, False]
    events = _events(agg)
    assert any(e.get("what") == "dropped" and e["collaborator"] == "col2" for e in events)
    metrics = [json.loads(x) for x in (agg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(m["collaborators"]) for m in metrics] == [["col1", "col2"], ["col1"]]


def test_an_accepted_join_brings_a_dropped_member_back(tmp_path):
    agg = _agg(tmp_path, {"rounds": 1}, min_collaborators=1)
    agg.rounds.exclude("col2", "test")
    assert "col2" in agg.rounds.excluded
    Tee(agg, "col2", sim_key(tmp_path)).join()
    assert "col2" not in agg.rounds.excluded


def test_seconds_cadence_lets_an_admitted_round_finish(tmp_path):
    agg = _agg(tmp_path, {"seconds": 60})
    now = [1000.0]
    agg.identity.clock = lambda: now[0]
    peers = {n: Tee(agg, n, sim_key(tmp_path)).join() for n in agg.names}
    for peer in peers.values():
        assert _wait(agg, peer, 0).round == 1  # admitted to round 1 at t+0
    now[0] += 61  # the attestations run out while round 1 trains ...
    assert agg.service.download("col1", 1, lambda: None).rnd == 1
    for peer in peers.values():
        assert _update(agg, peer, 1).accepted  # ... the round they began is still theirs
    agg.rounds.close_pending_round()
    assert _wait(agg, peers["col1"], 1).reattest  # the next one is not
    with pytest.raises(Refused, match=REATTEST_DUE):
        agg.service.download("col1", 2, lambda: None)
    col1 = Tee(agg, "col1", sim_key(tmp_path)).join()
    now[0] += 59
    assert _wait(agg, col1, 1).round == 2 and not _wait(agg, col1, 1).reattest


def test_a_refused_first_join_is_waited_for_as_before(tmp_path):
    """Only a member of the run whose renewal is refused is dropped: a refused first Join may
    be a party still starting, or someone else's Join with its enrolment key."""
    agg = _agg(tmp_path, {"rounds": 1}, min_collaborators=1)
    other = tmp_path / "other-sim.pem"  # a platform key the policy does not pin
    with pytest.raises(Refused, match="not in policy simulated_keys"):
        Tee(agg, "col2", other).join()
    assert agg.rounds.excluded == {}
    assert [v["accepted"] for v in _verdicts(agg, "col2")] == [False]
