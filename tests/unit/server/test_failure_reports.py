"""Failure reports (``Header.failure``): a party's own workload code raised in a round.

Over `MemoryTransport` -- a real `Aggregator`, its `Service` with the same peer and session
checks the adapters apply -- first as whole federations of real `Collaborator`s (threads, one
process) where one party's ``train`` raises, then as reports made by hand, as a hostile or buggy
party could send them. The aggregator's serve loop (and so its round timeout) is not run: a
round that closes here closed because of the report, not because time passed.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fedutil import SYNTHETIC, read_jsonl
from teefl.analysis.summary import build_summary
from teefl.client.collaborator import Collaborator
from teefl.client.trainer import WorkloadTrainer
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.security import attest
from teefl.server.aggregator import Aggregator
from teefl.transport.client import Join, Lost, PutUpdate, Refused, Stale
from teefl.transport.memory import MemoryTransport
from teefl.wire import codec, teefl_pb2
from teefl.wire.failure import SUMMARY_LIMIT, failure_header
from teefl.workload.failure import WorkloadFailure
from teefl.workload.resolve import plan_workload

NAMES = ["col1", "col2", "col3"]
JOIN_S = 90.0  # bound on a whole federation (it takes seconds)
BOOM = "user code failed on purpose"


@pytest.fixture(autouse=True)
def _threads():
    """The collaborators set torch's thread count (plan ``training.threads``): put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _plan(rounds: int = 2, **fed: Any):
    return plan_from_dict(
        {
            **SYNTHETIC,
            "collaborators": NAMES,
            "federation": {"rounds": rounds, "update_staging": "disk", **fed},
        }
    )


def _aggregator(tmp_path: Path, plan, downloads: bool = True) -> Aggregator:
    """``downloads`` False: nobody downloads the models (reports and updates by hand), so
    checkpoints do not give way to downloads that never come."""
    run = tmp_path / "run"
    agg = Aggregator(plan, run, "rid", EventRecorder(run, "rid", "aggregator", "aggregator"))
    if not downloads:
        agg.checkpointer.give_way = lambda: None  # type: ignore[method-assign]
    return agg


def _raising_trainer(plan, index: int, at: int) -> WorkloadTrainer:
    """The plan's workload, whose own ``train`` (the user's method, under teefl's wrapper)
    raises in round ``at``."""
    workload = plan_workload(plan)
    train = workload.instance.train

    def raising(model, data, info):
        if info.round == at:
            raise RuntimeError(BOOM)
        return train(model, data, info)

    workload.instance.train = raising
    return WorkloadTrainer(plan, index, workload)


def _federation(tmp_path: Path, plan, failing: dict[str, int]):
    """Every collaborator in a thread, ``failing`` raising in its round; returns the
    aggregator, each party's error (None: it completed) and each party's transport."""
    agg = _aggregator(tmp_path, plan)
    transports = {n: MemoryTransport(agg.service, n) for n in NAMES}
    errors: dict[str, BaseException | None] = {}

    def run_one(name: str) -> None:
        index = NAMES.index(name)
        trainer = _raising_trainer(plan, index, failing[name]) if name in failing else None
        try:
            col = Collaborator(
                plan, name, "memory", agg.run_dir, trainer=trainer, transport=transports[name]
            )
            col.run()
            errors[name] = None
        except BaseException as exc:
            errors[name] = exc

    threads = [threading.Thread(target=run_one, args=(n,), daemon=True) for n in NAMES]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_S)
        assert not any(t.is_alive() for t in threads), "the federation did not end in time"
    finally:
        agg.checkpointer.join()
        agg.rec.close()
    return agg, errors, transports


def _events(agg: Aggregator, what: str) -> list[dict]:
    return [
        e for e in read_jsonl(agg.run_dir / "events" / "aggregator.jsonl") if e.get("what") == what
    ]


def test_with_a_quorum_the_run_goes_on_without_the_failed_party_and_records_it(
    tmp_path, caplog
) -> None:
    plan = _plan(rounds=2, min_collaborators=2)
    with caplog.at_level("ERROR", logger="teefl.collaborator"):
        agg, errors, _ = _federation(tmp_path, plan, {"col3": 1})
    assert agg.done and agg.rounds.failed is None
    assert errors["col1"] is None and errors["col2"] is None
    assert isinstance(errors["col3"], WorkloadFailure)
    line = f"col3: workload vision failed in train (round 1): RuntimeError: {BOOM}"
    assert str(errors["col3"]) == line
    # its traceback went to its own log
    assert "Traceback (most recent call last)" in caplog.text and BOOM in caplog.text
    # every round closed without col3 -- not on a timeout: none runs here
    lines = {m["round"]: m for m in read_jsonl(agg.run_dir / "metrics.jsonl")}
    assert sorted(lines[1]["collaborators"]) == ["col1", "col2"]
    summary = line.removeprefix("col3: ")
    assert lines[1]["failed"] == {"col3": {"phase": "train", "summary": summary}}
    assert sorted(lines[2]["collaborators"]) == ["col1", "col2"] and "failed" not in lines[2]
    assert sorted(lines["final"]["collaborators"]) == ["col1", "col2"]
    (failed,) = _events(agg, "round_failed")
    assert (failed["collaborator"], failed["round"], failed["phase"]) == ("col3", 1, "train")
    assert not _events(agg, "round_quorum") and not _events(agg, "run_failed")
    # summary.json's failures: party, round, phase and the one line
    assert build_summary(agg.run_dir)["failures"] == [
        {"collaborator": "col3", "round": 1, "phase": "train", "summary": line}
    ]


def test_without_a_quorum_the_run_stops_at_once_with_the_line(tmp_path) -> None:
    plan = _plan(rounds=2)  # no min_collaborators: every party is required
    agg, errors, _ = _federation(tmp_path, plan, {"col2": 2})
    line = f"col2: workload vision failed in train (round 2): RuntimeError: {BOOM}"
    assert agg.rounds.failed == (
        f"{line}; round 2 cannot reach its quorum: 2 of 3 required updates possible"
    )
    assert not agg.done and agg.round == 2
    assert str(errors["col2"]) == line
    for name in ("col1", "col3"):  # told at their next call, not left waiting
        assert isinstance(errors[name], Refused) and line in str(errors[name])
    (ended,) = _events(agg, "run_failed")
    assert ended["reason"] == agg.rounds.failed


def test_a_failure_in_the_evaluation_pass_is_counted_out_of_it(tmp_path) -> None:
    plan = _plan(rounds=1, min_collaborators=2)
    agg = _aggregator(tmp_path, plan, downloads=False)
    me = {n: _joined(agg, n) for n in NAMES}
    for n in NAMES:
        _update(agg, me[n], n, 1)
    _wait_round(agg, 2)
    assert agg.rounds.evaluating
    bad = failure_header("col1", 2, "evaluate", "workload x failed in evaluate: KeyError: 'y'")
    with pytest.raises(Refused, match="evaluation pass outside it, or vice versa"):
        me["col1"].handle(PutUpdate(2, bad, None))
    bad.evaluate_only = True
    ack = me["col1"].handle(PutUpdate(2, bad, None))
    assert ack.accepted and ack.message == "failure recorded"
    for n in ("col2", "col3"):
        _report(agg, me[n], n, 2)
    _wait_round(agg, 3)
    assert agg.done  # closed once the others reported: col1 is not waited for
    try:
        final = [m for m in read_jsonl(agg.run_dir / "metrics.jsonl") if m["round"] == "final"]
        assert sorted(final[0]["collaborators"]) == ["col2", "col3"]
        assert list(final[0]["failed"]) == ["col1"]
    finally:
        agg.checkpointer.join()
        agg.rec.close()
    run_json = agg.run_dir / "run.json"
    run_json.write_text(json.dumps({"rounds": 1, "status": "completed"}))
    (entry,) = build_summary(agg.run_dir)["failures"]
    assert entry["round"] == "final" and entry["phase"] == "evaluate"


# -- by hand ----------------------------------------------------------------------------------
def _joined(agg: Aggregator, name: str) -> MemoryTransport:
    t = MemoryTransport(agg.service, name)
    t.handle(Join(attest.config_sections(agg.plan), workload_digest=agg.workload.digest))
    return t


def _failure(name: str, rnd: int, summary: str = f"workload x failed: {BOOM}", **kw):
    return failure_header(name, rnd, "train", summary, **kw)


def _update(agg: Aggregator, t: MemoryTransport, name: str, rnd: int) -> Any:
    payload = bytes(agg.payload)
    h = teefl_pb2.Header(
        collaborator=name,
        round=rnd,
        total_size=len(payload),
        num_samples=5,
        format=codec.FORMAT,
        crc32c=codec.crc32c(payload),
        sha256=codec.sha256(payload),
    )
    return t.handle(PutUpdate(rnd, h, payload))


def _report(agg: Aggregator, t: MemoryTransport, name: str, rnd: int) -> Any:
    h = teefl_pb2.Header(
        collaborator=name,
        round=rnd,
        evaluate_only=True,
        num_samples=3,
        metrics={"final.accuracy": 0.5},
        format=codec.FORMAT,
    )
    return t.handle(PutUpdate(rnd, h, None))


def _wait_round(agg: Aggregator, rnd: int) -> None:
    """The round closes in its own thread after the last acknowledgement (``close_soon``)."""
    r = agg.rounds
    with r.cond:
        assert r.cond.wait_for(lambda: r.round >= rnd or r.done, timeout=30), r.round


@pytest.fixture
def agg(tmp_path):
    a = _aggregator(tmp_path, _plan(rounds=3, min_collaborators=2), downloads=False)
    yield a
    a.checkpointer.join()
    a.rec.close()


def test_a_failed_party_is_out_of_later_rounds_until_it_joins_again(agg) -> None:
    me = {n: _joined(agg, n) for n in NAMES}
    me["col3"].handle(PutUpdate(1, _failure("col3", 1), None))
    # checkpoints give way to the downloads of the parties still in, not to col3's
    assert agg.checkpointer.members == 2
    _update(agg, me["col1"], "col1", 1)
    assert agg.round == 1  # col2 is still awaited
    _update(agg, me["col2"], "col2", 1)
    _wait_round(agg, 2)
    # round 2: col3 stopped after its report -- not waited for
    for n in ("col1", "col2"):
        _update(agg, me[n], n, 2)
    _wait_round(agg, 3)
    # col3 back (a restarted collaborator joins again): round 3 waits for it
    me["col3"] = _joined(agg, "col3")
    assert agg.checkpointer.members == 3
    for n in ("col1", "col2"):
        _update(agg, me[n], n, 3)
    with agg.rounds.cond:
        assert agg.round == 3 and not agg.rounds.complete()
    _update(agg, me["col3"], "col3", 3)
    _wait_round(agg, 4)
    rounds = [m["round"] for m in read_jsonl(agg.run_dir / "metrics.jsonl")]
    assert rounds == [1, 2, 3]


def test_a_report_passes_the_checks_an_update_passes(agg) -> None:
    col1 = _joined(agg, "col1")
    stranger = MemoryTransport(agg.service, "mallory")
    with pytest.raises(Refused, match="not a collaborator"):
        stranger.handle(PutUpdate(1, _failure("mallory", 1), None))
    never_joined = MemoryTransport(agg.service, "col2")  # no session token
    with pytest.raises(Lost, match="Join first"):
        never_joined.handle(PutUpdate(1, _failure("col2", 1), None))
    with pytest.raises(Stale):
        col1.handle(PutUpdate(2, _failure("col1", 2), None))  # round 2 is not open
    old = _joined(agg, "col2")
    _joined(agg, "col2")  # a newer Join ends the older session
    with pytest.raises(Lost):
        old.handle(PutUpdate(1, _failure("col2", 1), None))
    assert agg.rounds.failures == {} and agg.rounds.left == set()
    # a report cannot replace an update already counted
    _update(agg, col1, "col1", 1)
    with pytest.raises(Refused, match="cannot replace it"):
        col1.handle(PutUpdate(1, _failure("col1", 1), None))
    assert agg.rounds.failures == {} and "col1" in agg.received


@pytest.mark.parametrize(
    ("change", "fault"),
    [
        (lambda h: setattr(h, "num_samples", 5), "carries no payload, samples or metrics"),
        (lambda h: h.metrics.update({"train.loss": 1.0}), "carries no payload, samples"),
        (lambda h: setattr(h, "total_size", 10), "carries no payload, samples"),
        (lambda h: setattr(h, "crc32c", 7), "carries no payload, samples"),
        (lambda h: setattr(h, "format", codec.FORMAT), "carries no payload, samples"),
        (lambda h: setattr(h.failure, "phase", "Train; rm -rf"), "phase must be a short"),
        (lambda h: setattr(h.failure, "summary", ""), "empty summary"),
        (lambda h: setattr(h.failure, "summary", "x" * 100_000), "100000 characters exceeds"),
        (
            lambda h: setattr(h.failure, "summary", "ok\n2026-01-01 WARNING round 1 closed"),
            "not one printable line",
        ),
        (lambda h: setattr(h.failure, "summary", "ok \x1b[2J"), "not one printable line"),
    ],
)
def test_a_malformed_report_is_refused_and_changes_nothing(agg, change, fault) -> None:
    col1 = _joined(agg, "col1")
    h = _failure("col1", 1)
    change(h)
    with pytest.raises(Refused, match=fault):
        col1.handle(PutUpdate(1, h, None))
    assert agg.rounds.failures == {} and agg.rounds.left == set()
    rejected = _events(agg, "update_rejected")
    assert len(rejected) == 1 and rejected[0]["collaborator"] == "col1"


def test_a_report_with_a_payload_is_refused(agg) -> None:
    col1 = _joined(agg, "col1")
    with pytest.raises(Refused, match="must not carry a payload"):
        col1.handle(PutUpdate(1, _failure("col1", 1), b"data"))
    assert agg.rounds.failures == {}


def test_the_party_is_the_authenticated_one_whatever_the_text_says(agg) -> None:
    col1 = _joined(agg, "col1")
    forged = _failure("col1", 1, f"col2: workload x failed in train: {BOOM}")
    forged.collaborator = "col1"
    ack = col1.handle(PutUpdate(1, forged, None))
    assert ack.accepted and ack.message == "failure recorded"
    again = col1.handle(PutUpdate(1, forged, None))
    assert again.accepted and again.message == "duplicate: already counted once"
    assert list(agg.rounds.failures) == ["col1"] and agg.rounds.left == {"col1"}
    (failed,) = _events(agg, "round_failed")
    assert failed["collaborator"] == "col1"  # what the summary claims names nobody


def test_the_summary_limit_is_the_workload_failures(agg) -> None:
    """What `WorkloadFailure` makes fits what the aggregator accepts."""
    from teefl.workload import failure

    assert failure.SUMMARY_LIMIT == SUMMARY_LIMIT
    long = failure_header("col1", 1, "train", "é" * 5000)
    assert len(long.failure.summary) == SUMMARY_LIMIT
    col1 = _joined(agg, "col1")
    assert col1.handle(PutUpdate(1, long, None)).accepted
