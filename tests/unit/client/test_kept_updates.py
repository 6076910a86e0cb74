"""The collaborator's kept copies (docs/reliability.md 1a), decided without processes: what a
Join reply makes it send again, keep or drop. `tests/e2e/test_chaos.py` runs them for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from teefl.client.keeper import Keeper
from teefl.client.session import LOSS_ERRORS as _LOSS_ERRORS
from teefl.client.session import Session
from teefl.measure.events import EventRecorder
from teefl.transport.client import Lost as _Lost
from teefl.transport.client import PutUpdate
from teefl.transport.mock import MockTransport
from teefl.wire import teefl_pb2


class _Col:
    """A collaborator's session, keeper and last round: what a Join reply acts on."""

    def __init__(self, tmp_path: Path) -> None:
        self.last, self.keeper, self.sent = 0, Keeper(), []
        self.rec = EventRecorder(tmp_path, "run", "col1", "collaborator")

        def aggregator(request):
            assert isinstance(request, PutUpdate)
            self.sent.append((request.round, request.header, bytes(request.payload)))
            return teefl_pb2.UpdateAck(accepted=True)

        self.session = Session.__new__(Session)  # only what `resync` uses: no plan, no channel
        self.session.name, self.session.keeper = "col1", self.keeper
        self.session.transport = MockTransport(aggregator)

    def _resync(self, _stub, reply: teefl_pb2.JoinReply) -> None:
        self.last = self.session.resync(reply, self.last, self.rec)


@pytest.fixture
def col(tmp_path: Path) -> _Col:
    return _Col(tmp_path)


def _reply(r: int, holds: bool = False, durable: int = 0) -> teefl_pb2.JoinReply:
    return teefl_pb2.JoinReply(rounds=5, current_round=r, holds_update=holds, durable_round=durable)


def _header(r: int) -> teefl_pb2.Header:
    return teefl_pb2.Header(collaborator="col1", round=r, num_samples=10)


def test_a_round_the_aggregator_lost_is_sent_again_from_the_kept_copy(col) -> None:
    col.keeper.kept = {1: (_header(1), b"round one"), 2: (_header(2), b"round two")}
    col.last = 2
    col._resync(None, _reply(2, durable=1))
    assert col.sent == [(2, _header(2), b"round two")]
    assert col.last == 2 and list(col.keeper.kept) == [2]  # round 1 is durable: its copy went


def test_nothing_is_sent_when_the_aggregator_holds_the_update(col) -> None:
    col.keeper.kept = {2: (_header(2), b"round two")}
    col.last = 1
    col._resync(None, _reply(2, holds=True))
    assert col.sent == [] and col.last == 2


def test_an_upload_that_broke_off_is_sent_again_with_the_same_bytes(col) -> None:
    col.keeper.pending = (3, _header(3), bytearray(b"half-sent"))
    col.last = 2
    col._resync(None, _reply(3))
    assert col.sent == [(3, _header(3), b"half-sent")] and col.last == 3
    assert col.keeper.pending is None and 3 in col.keeper.kept


def test_without_a_copy_the_round_is_done_again(col) -> None:
    col.last = 4  # a restarted aggregator is back at round 3, and we kept nothing of it
    col._resync(None, _reply(3))
    assert col.sent == [] and col.last == 2  # WaitRound(after_round=2) hands out round 3


def test_the_evaluation_pass_is_never_answered_from_a_kept_update(col) -> None:
    col.keeper.kept = {6: (_header(6), b"not an update")}  # round 6 of 5: the evaluation pass
    col.last = 6
    col._resync(None, _reply(6))
    assert col.sent == [] and col.last == 5


def test_the_resident_model_memory_is_copied_when_kept() -> None:
    class Resident:
        payload = bytearray(b"model memory")

    keeper = Keeper(Resident.payload)
    keeper.acked(1, _header(1), Resident.payload)
    Resident.payload[:5] = b"XXXXX"  # the next download overwrites the model
    assert keeper.kept[1][1] == b"model memory"


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError(104, "reset"), BrokenPipeError(), TimeoutError(), EOFError()],
)
def test_socket_errors_mean_a_lost_aggregator_not_the_end(error) -> None:
    assert isinstance(error, _LOSS_ERRORS) and _Lost in _LOSS_ERRORS
    assert not isinstance(ValueError("a bug"), _LOSS_ERRORS)
