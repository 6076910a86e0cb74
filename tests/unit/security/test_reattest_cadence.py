"""The re-attestation cadence (`teefl.security.reattest`), the plan field that sets it, and the
verdict files every re-attestation appends to."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from teefl.errors import TeeflError
from teefl.plan import plan_from_dict
from teefl.security import attest
from teefl.security.reattest import Attested, Cadence


def _plan(every, **attestation):
    att = {"collaborators": "required", "reattest_every": every, **attestation}
    return plan_from_dict({"security": {"transport": "mtls", "attestation": att}}, "p.yaml")


# -- the plan field ----------------------------------------------------------------------------
def test_the_plan_says_rounds_or_seconds() -> None:
    assert Cadence.of(_plan({"rounds": 2}).security.attestation) == Cadence(rounds=2)
    assert Cadence.of(_plan({"seconds": 600}).security.attestation) == Cadence(seconds=600.0)
    assert Cadence.of(_plan({"seconds": 0.5}).security.attestation) == Cadence(seconds=0.5)
    assert Cadence.of(_plan(None).security.attestation) is None  # at Join only


@pytest.mark.parametrize(
    ("every", "message"),
    [
        (2, "reattest_every: write {rounds: N} or {seconds: S}, not 2"),
        ("600", "reattest_every: write {rounds: N} or {seconds: S}, not '600'"),
        ({}, "reattest_every: give exactly one of rounds or seconds"),
        ({"rounds": 2, "seconds": 60}, "give exactly one of rounds or seconds"),
        ({"rounds": 0}, "reattest_every.rounds: Input should be greater than or equal to 1"),
        ({"rounds": 1.5}, "reattest_every.rounds: Input should be a valid integer"),
        ({"rounds": True}, "reattest_every.rounds: Input should be a valid integer"),
        ({"rounds": "2"}, "reattest_every.rounds: Input should be a valid integer"),
        ({"seconds": 0}, "reattest_every.seconds: Input should be greater than 0"),
        ({"seconds": float("inf")}, "reattest_every.seconds: Input should be a finite number"),
        ({"minutes": 5}, "reattest_every.minutes: unknown key"),
    ],
)
def test_a_bad_cadence_is_one_line_naming_the_key(every, message) -> None:
    with pytest.raises(TeeflError) as err:
        _plan(every)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_cadence_without_attestation_is_refused() -> None:
    with pytest.raises(TeeflError, match="reattest_every needs attestation: set collaborators"):
        _plan({"rounds": 2}, collaborators="off")
    # the aggregator's attestation alone is enough: collaborators re-check it
    assert _plan({"rounds": 2}, collaborators="off", aggregator="required")


def test_the_cadence_is_part_of_the_compared_plan() -> None:
    from teefl.plan import plan_sections

    a, b = _plan({"rounds": 2}), _plan({"rounds": 3})
    assert plan_sections(a)["security"] != plan_sections(b)["security"]


# -- the rule ----------------------------------------------------------------------------------
def test_rounds_cover_the_round_of_acceptance_and_the_next_ones() -> None:
    every2 = Cadence(rounds=2)
    last = Attested(round=1, at=0.0)
    assert [every2.due(last, r, now=1e9) for r in (1, 2, 3, 4)] == [False, False, True, True]
    joined_late = Attested(round=4, at=0.0)  # accepted while round 4 was open
    assert [every2.due(joined_late, r, 0.0) for r in (4, 5, 6)] == [False, False, True]
    every1 = Cadence(rounds=1)
    assert not every1.due(Attested(3, 0.0), 3, 0.0) and every1.due(Attested(3, 0.0), 4, 0.0)


def test_seconds_count_from_acceptance_when_a_round_is_handed_out() -> None:
    cadence = Cadence(seconds=60)
    last = Attested(round=1, at=100.0)
    assert not cadence.due(last, 2, now=159.9)
    assert cadence.due(last, 2, now=160.0)


def test_an_admitted_round_is_finished_under_its_attestation() -> None:
    cadence = Cadence(seconds=60)
    last = Attested(round=1, at=100.0)
    assert cadence.admit(last, 2, now=150.0) and last.began == 2
    assert not cadence.due(last, 2, now=500.0)  # its model and update stay its own
    assert cadence.due(last, 3, now=500.0)
    assert not cadence.admit(last, 3, now=500.0) and last.began == 2  # nothing begun


def test_describe() -> None:
    assert Cadence(rounds=1).describe() == "every 1 round"
    assert Cadence(rounds=2).describe() == "every 2 rounds"
    assert Cadence(seconds=600).describe() == "every 600 s"


# -- the verdict files -------------------------------------------------------------------------
def test_concurrent_verdicts_are_all_kept(tmp_path: Path) -> None:
    """Several writers append to one verdict file at once (every collaborator of a run writes
    ``aggregator.json``, all at the same instant when they re-attest together): none is lost."""
    writers, each = 6, 25

    def write(w: int) -> None:
        for i in range(each):
            attest.write_verdict(tmp_path, "aggregator", {"writer": w, "i": i})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    records = json.loads((tmp_path / "attestation" / "aggregator.json").read_text())
    assert sorted((r["writer"], r["i"]) for r in records) == [
        (w, i) for w in range(writers) for i in range(each)
    ]
    assert (tmp_path / "attestation" / "aggregator.json").stat().st_mode & 0o777 == 0o600
