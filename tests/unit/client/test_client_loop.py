"""The collaborator's loop and session on `MockTransport`: no sockets, no processes, a tiny model.

The fake aggregator below answers the transport requests the way the real one does for a run of
``ROUNDS`` rounds and an evaluation pass; each test bends one answer (a loss, a stale round, a
refusal) and checks what the collaborator does about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from teefl.client.collaborator import Collaborator
from teefl.client.session import Backoff
from teefl.errors import TeeflError
from teefl.plan import plan_from_dict
from teefl.security import attest
from teefl.transport.client import (
    Connect,
    Disconnect,
    GetModel,
    Join,
    Lost,
    Model,
    Open,
    PutUpdate,
    Reattest,
    Refused,
    Report,
    Stale,
    WaitRound,
    status_error,
)
from teefl.transport.mock import MockTransport
from teefl.wire import codec, roundconfig, teefl_pb2

ROUNDS = 3
PLAN = plan_from_dict(
    {
        "dataset": {"name": "synthetic"},
        "model": {"name": "small_cnn"},
        "federation": {"rounds": ROUNDS, "reconnect_timeout": 30},
        "collaborators": 2,
        "security": {"transport": "none"},
        "network": {"data_plane": "grpc"},
    }
)


class CountingTrainer:
    """A `Trainer` whose round adds the round number to every weight (in place), so each
    round's update is known exactly."""

    samples = 7

    def __init__(self) -> None:
        self.trained: list[int] = []
        self.configs: list[dict[str, Any]] = []

    def setup(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    def train_round(
        self, model: torch.nn.Module, r: int, config: Any, span: Any
    ) -> dict[str, float]:
        self.configs.append(dict(config))
        with span("train", round=r), torch.no_grad():
            for p in model.parameters():
                p.add_(float(r))
        self.trained.append(r)
        return {"train.loss": 1.0 / r}

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"accuracy": 0.5, "samples": 3}

    def describe(self) -> None:
        return None


class FakeAggregator:
    """Answers like an aggregator with ``ROUNDS`` rounds; ``fail`` maps (request type, round)
    to the exception the next such request gets, once."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.round = 1  # the open round
        self.done: set[int] = set()  # rounds whose update it holds
        self.uploads: list[tuple[int, teefl_pb2.Header, bytes]] = []
        self.payloads: list[Any] = []  # the objects uploads were sent from
        self.reports: list[teefl_pb2.Header] = []
        self.fail: dict[tuple[type, int], Exception] = {}
        self.joins = 0
        self.round_config: dict[str, float] = {}  # sent with every training round

    def __call__(self, request: Any) -> Any:
        key = (type(request), getattr(request, "round", getattr(request, "after_round", 0)))
        if key in self.fail:
            raise self.fail.pop(key)
        match request:
            case Connect() | Open() | Disconnect():
                return None
            case Join():
                self.joins += 1
                return teefl_pb2.JoinReply(
                    run_id="mock",
                    rounds=ROUNDS,
                    current_round=self.round,
                    holds_update=self.round in self.done,
                    plan_sections=attest.config_sections(PLAN),
                )
            case WaitRound(after_round=after):
                if after >= ROUNDS + 1:
                    return teefl_pb2.WaitReply(done=True)
                self.round = max(self.round, after + 1)
                return teefl_pb2.WaitReply(
                    round=self.round,
                    evaluate_only=self.round > ROUNDS,
                    durable_round=after,
                    round_config=roundconfig.to_proto(self.round_config),
                )
            case GetModel():
                return Model({k: v.clone() for k, v in self.state.items()}, 100)
            case PutUpdate(round=r, header=h, payload=p):
                self.payloads.append(p)
                self.uploads.append((r, h, bytes(p)))
                self.done.add(r)
                self.round = r + 1
                return teefl_pb2.UpdateAck(accepted=True, message="ok")
            case Report(header=h):
                self.reports.append(h)
                return None
        raise AssertionError(f"unexpected request {request!r}")


def _collaborator(tmp_path: Path) -> tuple[Collaborator, FakeAggregator, CountingTrainer]:
    trainer = CountingTrainer()
    agg = FakeAggregator(trainer.setup())
    col = Collaborator(
        PLAN, "col1", "mock:1", tmp_path, trainer=trainer, transport=MockTransport(agg)
    )
    col.session.sleep = lambda s: None  # the backoff's waits, not its bounds, are skipped
    return col, agg, trainer


def _expected(agg: FakeAggregator, r: int) -> bytes:
    """The update of round ``r``: the global model plus ``r`` on every weight."""
    return bytes(codec.encode_state({k: v + r for k, v in agg.state.items()}))


def test_each_round_is_trained_and_its_update_sent_from_the_model_itself(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    assert col.run() == "mock"
    assert trainer.trained == [1, 2, 3] and trainer.configs == [{}] * ROUNDS
    assert [(r, h.round, h.num_samples) for r, h, _ in agg.uploads] == [
        (r, r, 7) for r in (1, 2, 3)
    ]
    for r, h, data in agg.uploads:
        assert data == _expected(agg, r) and h.crc32c == codec.crc32c(data)
        assert dict(h.metrics) == pytest.approx({"train.loss": 1.0 / r})
    # no copy on the way out: every upload was the resident model's own memory
    assert col.resident is not None
    assert all(p is col.resident.payload for p in agg.payloads)
    assert [h.round for h in agg.reports] == [ROUNDS + 1]
    assert agg.reports[0].evaluate_only and agg.reports[0].num_samples == 3
    assert col.transport.closed  # type: ignore[attr-defined]


def test_the_round_config_reaches_the_trainer(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    agg.round_config = {"proximal_mu": 0.25}
    assert col.run() == "mock"
    assert trainer.configs == [{"proximal_mu": 0.25}] * ROUNDS


def test_an_update_lost_mid_upload_is_kept_and_sent_again_after_the_rejoin(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    agg.fail[(PutUpdate, 2)] = Lost("the aggregator restarted")
    assert col.run() == "mock"
    assert trainer.trained == [1, 2, 3]  # round 2 trained once
    assert agg.joins == 2
    assert [r for r, _, _ in agg.uploads] == [1, 2, 3]
    requests = col.transport.requests  # type: ignore[attr-defined]
    lost_at = next(i for i, q in enumerate(requests) if isinstance(q, Disconnect))
    resent = [q for q in requests[lost_at:] if isinstance(q, PutUpdate) and q.round == 2]
    assert len(resent) == 1  # sent again right after the rejoin, before any new WaitRound
    rejoin = [type(q) for q in requests[lost_at : lost_at + 5]]
    assert rejoin == [Disconnect, Connect, Join, Open, PutUpdate]
    assert agg.uploads[1][2] == _expected(agg, 2)


def test_a_kept_update_is_sent_again_when_a_restarted_aggregator_lost_it(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    original = agg.__call__

    def restart_after_round_2(request: Any) -> Any:
        if isinstance(request, WaitRound) and request.after_round == 2 and agg.joins == 1:
            agg.done.discard(2)  # its staging went with the host: round 2 open again
            agg.round = 2
            raise Lost("the aggregator restarted")
        return original(request)

    col.transport = col.session.transport = MockTransport(restart_after_round_2)
    assert col.run() == "mock"
    assert trainer.trained == [1, 2, 3]  # not trained again: the kept copy went
    assert [r for r, _, _ in agg.uploads] == [1, 2, 2, 3]
    assert agg.uploads[1][1] == agg.uploads[2][1] and agg.uploads[1][2] == agg.uploads[2][2]


def test_a_stale_round_is_skipped(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    original = agg.__call__

    def quorum_closed_round_2(request: Any) -> Any:
        if isinstance(request, GetModel) and request.round == 2:
            agg.round = 3  # round 2 closed (quorum) before this collaborator asked for it
            raise Stale("round 2 is not open")
        return original(request)

    col.transport = col.session.transport = MockTransport(quorum_closed_round_2)
    assert col.run() == "mock"
    assert trainer.trained == [1, 3]
    assert [r for r, _, _ in agg.uploads] == [1, 3]


def test_an_update_refused_as_stale_is_not_kept(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    agg.fail[(PutUpdate, 2)] = Stale("stale round")
    assert col.run() == "mock"
    assert trainer.trained == [1, 2, 3]
    assert [r for r, _, _ in agg.uploads] == [1, 3]
    assert 2 not in col.keeper.kept and col.keeper.pending is None


def test_refused_ends_the_run_with_one_clear_line(tmp_path) -> None:
    col, agg, _ = _collaborator(tmp_path)
    agg.fail[(Join, 0)] = status_error("PERMISSION_DENIED", "col1 is not in this run", "col1")
    with pytest.raises(TeeflError) as err:
        col.run()
    assert isinstance(err.value, Refused)
    assert str(err.value) == "aggregator refused col1: col1 is not in this run"
    assert "\n" not in str(err.value)
    assert agg.joins == 0 and not any(
        isinstance(q, Disconnect)
        for q in col.transport.requests  # type: ignore[attr-defined]
    )


def _reattesting(agg: FakeAggregator, due: set[int], refuse: bool = False) -> MockTransport:
    """``agg`` answering the WaitRound of each round in ``due`` with ``reattest`` once (as the
    aggregator does when a collaborator's attestation does not cover the round); ``refuse``:
    the Join that follows is refused, as fresh evidence that no longer verifies is."""

    def handle(request: Any) -> Any:
        if isinstance(request, Join) and refuse and agg.joins == 1:
            raise status_error("PERMISSION_DENIED", "MRTD 6666 not in policy", "col1")
        reply = agg(request)
        if isinstance(request, WaitRound) and reply.round in due:
            due.discard(reply.round)
            reply.reattest = True
        return reply

    return MockTransport(handle)


def _events(tmp_path: Path) -> list[dict[str, Any]]:
    import json

    path = tmp_path / "events" / "collaborator-col1.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_reattest_reply_joins_again_at_once_and_loses_nothing(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    col.transport = col.session.transport = _reattesting(agg, {2, ROUNDS + 1})
    col.session.sleep = lambda s: pytest.fail("a re-attestation waits no backoff")
    assert col.run() == "mock"
    assert trainer.trained == [1, 2, 3]  # every round trained once, none skipped
    assert [r for r, _, _ in agg.uploads] == [1, 2, 3]
    assert [h.round for h in agg.reports] == [ROUNDS + 1]
    assert agg.joins == 3  # the first Join, and one before round 2 and the evaluation pass
    requests = col.transport.requests  # type: ignore[attr-defined]
    assert not any(isinstance(q, Disconnect) for q in requests)
    kinds = [type(q) for q in requests]
    first = kinds.index(GetModel)  # round 1's download
    # before round 2: WaitRound (reattest) -> Connect (nothing to do) -> Join -> Open ->
    # WaitRound -> GetModel
    again = kinds.index(Join, first)
    assert kinds[again - 2 : again + 4] == [WaitRound, Connect, Join, Open, WaitRound, GetModel]
    renewals = [e for e in _events(tmp_path) if e.get("reattest")]
    assert [(e["phase"], e.get("round"), e["accepted"]) for e in renewals] == [
        ("join", 2, True),
        ("join", None, True),  # the evaluation pass is no training round
    ]
    assert not any(e.get("what") == "lost_aggregator" for e in _events(tmp_path))


def test_a_refused_reattestation_ends_the_run_saying_so(tmp_path) -> None:
    col, agg, trainer = _collaborator(tmp_path)
    col.transport = col.session.transport = _reattesting(agg, {2}, refuse=True)
    with pytest.raises(TeeflError) as err:
        col.run()
    assert str(err.value) == (
        "col1 leaves the run: re-attestation before round 2 failed: aggregator refused col1: "
        "MRTD 6666 not in policy"
    )
    assert trainer.trained == [1] and [r for r, _, _ in agg.uploads] == [1]
    refused = [e for e in _events(tmp_path) if e.get("reattest")]
    assert [(e["round"], e["accepted"]) for e in refused] == [(2, False)]
    assert "MRTD 6666" in refused[0]["reason"]


def test_an_aggregator_lost_for_good_ends_after_the_reconnect_timeout(tmp_path) -> None:
    col, _, _ = _collaborator(tmp_path)
    now = [100.0]
    waits: list[float] = []
    col.session.backoff.clock = lambda: now[0]

    def sleep(s: float) -> None:
        waits.append(s)
        now[0] += s

    col.session.sleep = sleep

    def gone(request: Any) -> Any:
        if isinstance(request, Join):
            raise Lost("UNAVAILABLE: connection refused")
        return None

    col.transport = col.session.transport = MockTransport(gone)
    with pytest.raises(TeeflError, match=r"lost the aggregator at mock:1 for more than 30 s"):
        col.run()
    assert waits[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0] and max(waits) == 10.0
    assert 30 <= sum(waits) <= 40  # gave up once the loss outlasted the limit, not later


def test_backoff_doubles_to_its_cap_and_starts_over_after_contact() -> None:
    now = [0.0]
    b = Backoff(5.0, clock=lambda: now[0])
    assert [b.next("x") for _ in range(3)] == [0.5, 1.0, 2.0]
    now[0] = 5.5
    with pytest.raises(TeeflError, match="for more than 5 s"):
        b.next("x")
    b.reset()
    assert b.next("x") == 0.5


@pytest.mark.parametrize(
    ("code", "details", "kind"),
    [
        ("UNAVAILABLE", "connection refused", Lost),
        ("CANCELLED", "", Lost),
        ("NO_SUCH_CODE", "", Lost),  # an unknown code: as UNKNOWN
        ("PERMISSION_DENIED", "col1 has not passed attestation", Lost),
        ("UNAUTHENTICATED", "Join first", Lost),
        ("RESOURCE_EXHAUSTED", "rate limit", Lost),
        ("FAILED_PRECONDITION", "round 3 is not open", Stale),
        ("FAILED_PRECONDITION", "stale session", Stale),
        ("FAILED_PRECONDITION", "re-attestation due: col1 (not open, stale)", Reattest),
        ("PERMISSION_DENIED", "not a member", Refused),
        ("INVALID_ARGUMENT", "bad header", Refused),
    ],
)
def test_status_codes_map_to_neutral_errors(code: str, details: str, kind: type) -> None:
    assert type(status_error(code, details, "col1")) is kind


# -- the workload's own code raising ----------------------------------------------------------
class RaisingTrainer(CountingTrainer):
    """Trains like `CountingTrainer`, but the user's code raises in round ``at`` (turned into a
    `WorkloadFailure` by `run_metrics`, as `LoadedWorkload.train` does)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def train_round(self, model, r, config, span):
        from teefl.workload.failure import run_metrics

        if r == self.at:

            def train() -> dict:
                raise RuntimeError("shape\x1b[2J mismatch\nin layer 3")

            run_metrics(train, ref="./task.py:Task", phase="train", party="col1", round=r)
        return super().train_round(model, r, config, span)


def _raising(tmp_path: Path, at: int) -> tuple[Collaborator, FakeAggregator, RaisingTrainer]:
    trainer = RaisingTrainer(at)
    agg = FakeAggregator(trainer.setup())
    col = Collaborator(
        PLAN, "col1", "mock:1", tmp_path, trainer=trainer, transport=MockTransport(agg)
    )
    return col, agg, trainer


def test_a_raising_workload_reports_its_failed_round_logs_the_traceback_and_stops(
    tmp_path, caplog
) -> None:
    from teefl.workload.failure import WorkloadFailure

    col, agg, trainer = _raising(tmp_path, at=2)
    with (
        caplog.at_level("INFO", logger="teefl.collaborator"),
        pytest.raises(WorkloadFailure) as err,
    ):
        col.run()
    line = str(err.value)
    assert line.startswith("col1: workload ./task.py:Task failed in train (round 2): RuntimeError")
    assert "\n" not in line
    # the round before was sent; nothing was sent for round 2 but the report, nothing after it
    assert [r for r, _, _ in agg.uploads] == [1] and trainer.trained == [1]
    (report,) = agg.reports
    assert report.round == 2 and report.HasField("failure") and not report.evaluate_only
    assert report.failure.phase == "train"
    # without the name (the aggregator puts the authenticated one in front), one printable line
    assert report.failure.summary == line.removeprefix("col1: ").replace("\x1b", "\\x1b")
    assert report.failure.summary.isprintable()
    assert not (report.total_size or report.num_samples or report.metrics or report.sha256)
    requests = col.transport.requests  # type: ignore[attr-defined]
    assert isinstance(requests[-1], Report) and col.transport.closed  # type: ignore[attr-defined]
    # the whole traceback is in this party's log
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback (most recent call last)" in logged and "in layer 3" in logged
    assert "reported the failed round 2" in logged
    events = (tmp_path / "events" / "collaborator-col1.jsonl").read_text()
    assert '"round_failed"' in events


def test_a_failure_report_that_cannot_be_delivered_still_stops_with_the_line(
    tmp_path, caplog
) -> None:
    from teefl.workload.failure import WorkloadFailure

    col, agg, _ = _raising(tmp_path, at=1)
    agg.fail[(Report, 0)] = Lost("UNAVAILABLE: the aggregator is gone")
    with caplog.at_level("WARNING", logger="teefl.collaborator"), pytest.raises(WorkloadFailure):
        col.run()
    assert agg.reports == [] and agg.uploads == []
    assert "could not be reported to the aggregator" in caplog.text
