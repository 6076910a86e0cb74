"""The server's parts driven through `Service` with fake `Peer`s: no gRPC, no sockets."""

from __future__ import annotations

import pytest
import torch

from fedutil import SYNTHETIC
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.server.aggregator import Aggregator
from teefl.server.intake import StaleUpdate
from teefl.transport.base import Peer, Refused
from teefl.wire import codec, teefl_pb2
from teefl.wire.checks import UpdateRejected


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _agg(tmp_path, **fed) -> Aggregator:
    plan = plan_from_dict({**SYNTHETIC, "federation": {"rounds": 2, **fed}})
    return Aggregator(plan, tmp_path, "t", EventRecorder(tmp_path, "t", "aggregator", "agg"))


def _join(agg: Aggregator, name: str, digest: str | None = None) -> Peer:
    from teefl.security import attest

    req = teefl_pb2.JoinRequest(
        collaborator=name,
        plan_sections=attest.config_sections(agg.plan),
        workload_digest=agg.workload.digest if digest is None else digest,
    )
    reply = agg.service.join(Peer(name), req)
    return Peer(name, token=reply.session_token, handle=Handle(), on_end=lambda fn: True)


def _header(
    agg: Aggregator, name: str, rnd: int | None = None, payload: bytes = b"", **kw
) -> teefl_pb2.Header:
    return teefl_pb2.Header(
        collaborator=name,
        round=agg.round if rnd is None else rnd,
        total_size=len(payload or agg.payload),
        format=kw.pop("format", codec.FORMAT),
        num_samples=kw.pop("samples", 10),
        crc32c=codec.crc32c(payload or agg.payload),
        **kw,
    )


def _put(agg: Aggregator, peer: Peer, payload: bytes, **kw) -> teefl_pb2.UpdateAck:
    """One update as a transport drives it: check, slot, open, prepare, fill, complete."""
    name = agg.identity.check(peer)
    h = _header(agg, name, payload=payload, **kw)
    up = agg.service.upload(name, h, peer.handle.cancel, None, peer.token, 0)
    try:
        up.acquire()
        dup = up.open()
        if dup is not None:
            return dup
        asm = up.prepare(data_plane=False)
        asm.add(payload)
        return up.complete(defer_add=False)[0]
    except UpdateRejected as exc:
        up.reject(exc)
        raise
    finally:
        up.close()


def _shifted(agg: Aggregator, by: float) -> bytes:
    return bytes(
        codec.encode_state(
            {k: v + by if v.is_floating_point() else v for k, v in agg.global_state.items()}
        )
    )


# -- identity ----------------------------------------------------------------------------------
def test_a_wrong_or_outdated_token_is_refused(tmp_path) -> None:
    agg = _agg(tmp_path)
    with pytest.raises(Refused) as err:
        agg.identity.check(Peer("col1", token=b"x" * 32))
    assert err.value.status == "UNAUTHENTICATED"
    old = _join(agg, "col1")
    assert agg.identity.check(old) == "col1"
    new = _join(agg, "col1")  # a newer Join ends the older session and cancels its calls
    assert old.handle.cancelled
    with pytest.raises(Refused, match="Join first"):
        agg.identity.check(old)
    assert agg.identity.check(new) == "col1"


def test_a_revoked_session_refuses_its_calls(tmp_path) -> None:
    agg = _agg(tmp_path)
    peer = _join(agg, "col2")
    assert agg.identity.check(peer) == "col2"  # a call in flight, remembered with its session
    agg.identity.revoke("col2", "test")
    assert peer.handle.cancelled
    with pytest.raises(Refused) as err:
        agg.identity.check(peer)
    assert err.value.status == "UNAUTHENTICATED"


def test_under_mtls_the_certificate_cn_must_be_the_claimed_name(tmp_path) -> None:
    agg = _agg(tmp_path)
    agg.identity.transport = "mtls"  # the rule only; the certificate checks need a PKI
    with pytest.raises(Refused, match="does not match claimed collaborator name 'col1'") as err:
        agg.identity.check(Peer("col1", tls_version="TLSv1.3", cn="col2"), attested=False)
    assert err.value.status == "PERMISSION_DENIED"
    with pytest.raises(Refused, match=r"requires TLSv1\.3"):
        agg.identity.check(Peer("col1", tls_version="TLSv1.2", cn="col1"), attested=False)
    with pytest.raises(Refused, match="not a collaborator"):
        agg.identity.check(Peer("mallory", tls_version="TLSv1.3", cn="mallory"), attested=False)


# -- rounds ------------------------------------------------------------------------------------
def test_the_round_closes_when_every_update_is_in_and_the_mean_is_published(tmp_path) -> None:
    agg = _agg(tmp_path)
    before = {k: v.clone() for k, v in agg.global_state.items()}
    for i, name in enumerate(agg.names):
        ack = _put(agg, _join(agg, name), _shifted(agg, float(i)))
        assert ack.accepted and ack.message == "accepted"
    assert agg.rounds.close_pending
    agg.rounds.close_pending_round()
    agg.checkpointer.join()
    assert agg.round == 2 and agg.received == {}
    for k, v in before.items():  # the mean of +0, +1, +2 (equal samples) is +1
        want = v + 1.0 if v.is_floating_point() else v
        assert torch.allclose(agg.global_state[k], want)
    assert bytes(agg.payload) == bytes(codec.encode_state(agg.global_state))


def test_timeout_closes_with_a_quorum(tmp_path) -> None:
    agg = _agg(tmp_path, round_timeout=0.2, min_collaborators=2)
    for name in agg.names[:2]:
        assert _put(agg, _join(agg, name), _shifted(agg, 0.0)).accepted
    r = agg.rounds
    r.round_opened -= 1.0
    import threading

    t = threading.Thread(target=r.supervise, daemon=True)
    t.start()
    with r.cond:
        assert r.cond.wait_for(lambda: r.round == 2, timeout=10)
        r.done = True  # ends the supervisor
        r.cond.notify_all()
    t.join(5)
    events = "".join(p.read_text() for p in tmp_path.glob("events/*.jsonl"))
    assert '"round_quorum"' in events and "col3" in events


def test_an_update_for_a_closed_round_is_stale_and_changes_nothing(tmp_path) -> None:
    agg = _agg(tmp_path)
    peer = _join(agg, "col1")
    with pytest.raises(StaleUpdate):
        _put(agg, peer, _shifted(agg, 1.0), rnd=agg.round + 1)
    assert agg.received == {} and agg.model.fedavg.count == 0
    assert (
        not list((tmp_path / "updates").rglob("col1*")) if (tmp_path / "updates").exists() else True
    )


# -- intake ------------------------------------------------------------------------------------
def test_checks_before_the_first_byte_refuse_without_reading(tmp_path) -> None:
    agg = _agg(tmp_path)
    peer = _join(agg, "col1")
    for bad, why in (
        ({"samples": 0}, "sample count"),
        ({"format": "pickle"}, "unsupported payload format"),
        ({"evaluate_only": True}, "metrics-only"),
    ):
        h = _header(agg, "col1", **bad)
        up = agg.service.upload("col1", h, peer.handle.cancel, None, peer.token, 0)
        up.acquire()
        try:
            with pytest.raises(UpdateRejected, match=why):
                up.open()
            assert up.asm is None and up.receiver is None  # nothing made to receive into
        finally:
            up.close()
    assert agg.intake.slots.held == 0 and not agg.rounds.inflight and agg.rounds.active == 0


def test_a_rejected_update_changes_nothing(tmp_path) -> None:
    agg = _agg(tmp_path)
    peer = _join(agg, "col1")
    state = {k: v.clone() for k, v in agg.global_state.items()}
    k = next(k for k, v in state.items() if v.is_floating_point())
    state[k].view(-1)[0] = float("nan")
    with pytest.raises(UpdateRejected):
        _put(agg, peer, bytes(codec.encode_state(state)))
    assert agg.received == {} and agg.model.fedavg.count == 0
    assert _put(agg, peer, _shifted(agg, 0.0)).accepted  # the member may send again
    assert _put(agg, peer, _shifted(agg, 0.0)).message == "duplicate: already counted once"


@pytest.mark.parametrize("staging", ["disk", "memory"])
def test_each_data_plane_receiver_stores_before_the_ack_and_settles(tmp_path, staging) -> None:
    from teefl.server import receivers

    agg = _agg(tmp_path, update_staging=staging)
    peer = _join(agg, "col1")
    name = agg.identity.check(peer)
    payload = _shifted(agg, 1.0)
    h = _header(agg, name, payload=payload)
    up = agg.service.upload(name, h, peer.handle.cancel, None, peer.token, 0)
    up.acquire()
    try:
        assert up.open() is None
        asm = up.prepare(data_plane=True)
        kind = type(up.receiver)
        asm.add(payload)
        ack, add = up.complete(defer_add=True)
        assert ack.accepted and add is not None and agg.rounds.adding == 1
        assert [u.name for u in agg.store.load_updates(1)] == ["col1"]  # stored before the add
        add()
    finally:
        up.close()
    assert agg.rounds.adding == 0 and agg.model.fedavg.count == 1
    if agg.staging is not None:
        assert kind is receivers.StagedReceiver
        agg.staging.close()
    else:
        assert kind is receivers.FileReceiver
    assert (tmp_path / "updates" / "round-0001" / "col1.safetensors").exists()


def test_a_collaborator_with_other_workload_code_is_refused_naming_both_digests(tmp_path) -> None:
    agg = _agg(tmp_path)
    other = "ab" * 32
    with pytest.raises(Refused) as err:
        _join(agg, "col1", other)
    assert other in str(err.value) and agg.workload.digest in str(err.value)
    with pytest.raises(Refused, match=r"\(none sent\)"):
        _join(agg, "col2", "")
    _join(agg, "col3")  # its own digest: admitted


def test_allowed_digests_admit_another_workload_code(tmp_path) -> None:
    other = "cd" * 32
    plan = plan_from_dict(
        {**SYNTHETIC, "federation": {"rounds": 2}, "workload": {"allowed_digests": [other]}}
    )
    agg = Aggregator(plan, tmp_path, "t", EventRecorder(tmp_path, "t", "aggregator", "agg"))
    _join(agg, "col1", other)
    with pytest.raises(Refused):
        _join(agg, "col2", "ef" * 32)
