"""What a restarted aggregator makes of its run directory (no processes: an `Aggregator` built
twice on the same directory, the first one "killed" by simply being dropped).

Round 1 included (no checkpoint yet), staged updates of a dead process, every bound checked
again on replay, one metrics line and one ``round_closed`` per round, restarts counted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from fedutil import SYNTHETIC, read_jsonl
from teefl.measure.events import EventRecorder, read_events
from teefl.plan import plan_from_dict
from teefl.rundir import RunDir
from teefl.server.aggregator import Aggregator
from teefl.wire import codec

NAMES = ["col1", "col2", "col3"]


def _agg(tmp_path: Path, staging: str = "disk", **fed) -> Aggregator:
    fed = {"rounds": 2, "update_staging": staging, "staging_dir": str(tmp_path / "shm"), **fed}
    plan = plan_from_dict({**SYNTHETIC, "collaborators": NAMES, "federation": fed})
    run = tmp_path / "run"
    return Aggregator(plan, run, "rid", EventRecorder(run, "rid", "aggregator", "aggregator"))


def _stop(agg: Aggregator) -> None:
    """The process dies: nothing more is written (its staged slots stay, as after SIGKILL)."""
    agg.checkpointer.join()
    agg.rec.close()


def _store(agg: Aggregator, rnd: int, name: str, samples: int = 10, payload=None, **meta):
    payload = bytes(agg.payload) if payload is None else payload
    metrics = meta.pop("metrics", {"train.loss": 0.5})
    agg.store.save_update(rnd, name, payload, {"samples": samples, "metrics": metrics, **meta})


def _events(tmp_path: Path, what: str) -> list[dict]:
    path = tmp_path / "run/events/aggregator.jsonl"
    return [e for e in read_events(path) if e.get("what") == what]


def test_a_restart_in_round_1_replays_its_acknowledged_updates(tmp_path: Path) -> None:
    first = _agg(tmp_path)
    _store(first, 1, "col2", samples=7)
    _store(first, 1, "col3", samples=9)
    _stop(first)
    agg = _agg(tmp_path)  # no state.json: no round had a durable checkpoint yet
    assert agg.round == 1 and agg.resumed_from == 0
    assert agg.received == {
        "col2": {"samples": 7, "train.loss": 0.5},
        "col3": {"samples": 9, "train.loss": 0.5},
    }
    assert agg.model.fedavg.count == 2
    _stop(agg)


def test_a_staged_update_of_a_dead_process_is_found_by_its_metadata(tmp_path: Path) -> None:
    first = _agg(tmp_path, staging="memory")
    assert first.staging is not None
    payload = bytes(first.payload)
    slot = first.staging.take(len(payload))
    assert slot is not None
    slot.mem[:] = payload
    first.store.commit_staged(1, "col1", slot, {"samples": 3, "metrics": {}}, {}, True)
    staged = next((tmp_path / "shm").glob("teefl-*/*round-0001-col1*"))
    first.staging.close()  # killed before the move: only the slot holds the update
    _stop(first)
    agg = _agg(tmp_path, staging="memory")  # another PID and another tag
    assert agg.received == {"col1": {"samples": 3}} and agg.resumed_from == 0
    assert not staged.exists()
    assert (tmp_path / "run/updates/round-0001/col1.safetensors").read_bytes() == payload
    agg.staging.close()
    _stop(agg)


def _bad_payload(agg: Aggregator) -> bytes:
    state = codec.decode_state(bytes(agg.payload))
    t = next(t for t in state.values() if t.is_floating_point())
    t.view(-1)[0] = float("nan")
    return bytes(codec.encode_state(state))


def test_every_bound_is_checked_again_on_replay(tmp_path: Path) -> None:
    first = _agg(tmp_path, max_samples_per_update=1000)
    first.store.save_checkpoint(1, bytes(first.payload), final=False)
    _store(first, 2, "col1", samples=1000)  # the only update that fits
    _store(first, 2, "col2", samples=10**9)  # edited on disk: the bound still holds
    _store(first, 2, "col3", payload=_bad_payload(first))  # a NaN
    _store(first, 2, "mallory")  # no collaborator of this plan
    _stop(first)
    agg = _agg(tmp_path, max_samples_per_update=1000)
    assert agg.round == 2 and list(agg.received) == ["col1"]
    dropped = {e["collaborator"]: e["reason"] for e in _events(tmp_path, "update_dropped")}
    assert "sample count 1000000000 outside 1..1000" in dropped["col2"]
    assert "NaN or Inf" in dropped["col3"]
    assert "not a collaborator" in dropped["mallory"]
    left = sorted(p.name for p in (tmp_path / "run/updates/round-0002").iterdir())
    assert left == ["col1.json", "col1.safetensors"]  # the others are gone: sent again, counted
    _stop(agg)


def test_metrics_that_are_not_numbers_are_dropped_on_replay(tmp_path: Path) -> None:
    first = _agg(tmp_path)
    _store(first, 1, "col1", metrics={"loss": "1; rm -rf"})
    _store(first, 1, "col2", metrics={"loss": float("nan")})  # a NaN loss is a number
    _stop(first)
    agg = _agg(tmp_path)
    assert list(agg.received) == ["col2"] and math.isnan(agg.received["col2"]["loss"])
    _stop(agg)


def test_a_round_closed_before_its_checkpoint_is_closed_again_once(tmp_path: Path) -> None:
    """Killed between the mean and its durable checkpoint: round 1's updates are all stored, its
    metrics line and round_closed event were written, round 2 had an update already."""
    first = _agg(tmp_path)
    for name in NAMES:
        _store(first, 1, name)
    _store(first, 2, "col2", samples=4)
    with first.rounds.cond:
        first.rounds.write_metrics(1)
    first.rec.info("round_closed", round=1)
    tmp = tmp_path / "run/model" / ".round-0001.safetensors.tmp-4000001"
    tmp.write_bytes(b"half a checkpoint")
    _stop(first)

    agg = _agg(tmp_path)
    assert not tmp.exists()  # a dead process's temporary file
    assert agg.round == 1 and len(agg.received) == 3
    with agg.rounds.cond:  # what `serve` does first
        agg.rounds.close_round()
    assert agg.round == 2 and agg.received == {"col2": {"samples": 4, "train.loss": 0.5}}
    _stop(agg)
    lines = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [m["round"] for m in lines] == [1]
    assert [e["round"] for e in _events(tmp_path, "round_closed")] == [1]
    assert json.loads((tmp_path / "run/state.json").read_text())["completed_round"] == 1
    assert RunDir(tmp_path / "run").read()["rounds_completed"] == 1
    assert not (tmp_path / "run/updates/round-0001").exists()


def test_a_resent_update_completes_the_round_and_the_next_ones_stored_updates_count(
    tmp_path: Path,
) -> None:
    """Round 1 is missing one update after the restart (its collaborator sends it again) while
    round 2 already holds updates acknowledged before the crash: once round 1 closes, round 2
    counts them instead of waiting for uploads that will never come."""
    first = _agg(tmp_path)
    _store(first, 1, "col1")
    _store(first, 1, "col2")
    for name in NAMES:
        _store(first, 2, name)
    _stop(first)
    agg = _agg(tmp_path)
    assert agg.round == 1 and sorted(agg.received) == ["col1", "col2"]
    state = codec.decode_state(bytes(agg.payload))
    ack, _ = agg.intake.accept("col3", 1, state, 10, {}, bytes(agg.payload), 0.0)  # the resend
    assert ack.accepted and agg.rounds.close_pending
    agg.rounds.close_pending_round()
    assert agg.round == 3  # round 2 was complete from its stored updates and closed too
    _stop(agg)
    assert [m["round"] for m in read_jsonl(tmp_path / "run/metrics.jsonl")] == [1, 2]


def test_a_resumed_checkpoint_must_fit_the_plans_model(tmp_path: Path) -> None:
    first = _agg(tmp_path)
    other = {"w": torch.zeros(3)}
    first.store.save_checkpoint(1, bytes(codec.encode_state(other)), final=False)
    _stop(first)
    with pytest.raises(Exception, match="does not fit the plan's model"):
        _agg(tmp_path)


# -- run.json and the events --------------------------------------------------------------------
def test_every_start_is_counted_durably_before_anything_else(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert [RunDir(run).count_start() for _ in range(3)] == [0, 1, 2]
    assert RunDir(run).read()["restarts"] == 2
    assert (run.stat().st_mode & 0o777) == 0o700
    assert (run / "run.json").stat().st_mode & 0o777 == 0o600
    RunDir(run).update(status="completed")
    assert RunDir(run).count_start() == 2  # refused by the caller: a completed run is not restarted
    assert RunDir(run).read()["restarts"] == 2


def test_a_torn_events_line_does_not_swallow_the_next_process_anchor(tmp_path: Path) -> None:
    first = EventRecorder(tmp_path, "r", "aggregator", "aggregator")
    first.info("round_closed", round=1)
    first.close()
    with open(tmp_path / "events/aggregator.jsonl", "a") as fh:
        fh.write('{"run":"r","type":"info","what":"round_clo')  # SIGKILL mid-line
    EventRecorder(tmp_path, "r", "aggregator", "aggregator").close()
    events = read_events(tmp_path / "events/aggregator.jsonl")
    assert [e["type"] for e in events] == ["anchor", "info", "anchor"]
    assert events[-1]["pid"] == os.getpid()
    assert (tmp_path / "events/aggregator.jsonl").stat().st_mode & 0o777 == 0o600


def test_a_restart_during_the_evaluation_pass_keeps_the_reports_received(tmp_path: Path) -> None:
    first = _agg(tmp_path)
    first.store.save_checkpoint(2, bytes(first.payload), final=True)  # SYNTHETIC: 2 rounds
    _stop(first)
    second = _agg(tmp_path)
    assert second.rounds.evaluating
    ack, _ = second.intake.accept("col1", 3, None, 50, {"final.accuracy": 0.75}, None, 0.0)
    assert ack.accepted
    with second.rounds.cond:
        second.rounds.write_metrics(3)  # as if it had closed the pass, then died before the end
    _stop(second)
    agg = _agg(tmp_path)
    assert agg.received == {"col1": {"samples": 50, "final.accuracy": 0.75}}
    for name in ("col2", "col3"):
        agg.intake.accept(name, 3, None, 50, {"final.accuracy": 0.5}, None, 0.0)
    agg.rounds.close_pending_round()
    assert agg.done
    _stop(agg)
    (final,) = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert final["round"] == "final" and set(final["collaborators"]) == set(NAMES)
    # kept until every collaborator heard of the end (`serve`), in case of one more restart
    assert len(list((tmp_path / "run/updates/round-0003").glob("*.json"))) == 3


def test_an_evaluation_report_is_not_an_update_of_a_training_round(tmp_path: Path) -> None:
    first = _agg(tmp_path)
    first.store.save_report(1, "col1", {"samples": 5, "metrics": {}})  # edited into round 1
    _stop(first)
    agg = _agg(tmp_path)
    assert agg.received == {}
    (dropped,) = _events(tmp_path, "update_dropped")
    assert "evaluation report outside the evaluation pass" in dropped["reason"]
    _stop(agg)
