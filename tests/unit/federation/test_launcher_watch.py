"""`teefl run`'s watch loop (`launcher._watch`) with stand-in processes and an events file the
test writes: which exits end the run, with which line.

A collaborator whose workload code raised reports the failed round and exits with code 2: once
the aggregator's events hold the report (``round_failed``) that exit is the run going on without
it; any other non-zero exit ends the run -- with the aggregator's ``run_failed`` reason where it
gave one, else the process's own error line.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from fedutil import SYNTHETIC
from teefl.errors import TeeflError
from teefl.federation.launcher import Proc, _watch
from teefl.plan import plan_from_dict

PLAN = plan_from_dict({**SYNTHETIC, "collaborators": ["col1", "col2", "col3"]})
SUMMARY = "workload ./task.py:Task failed in train (round 2): RuntimeError: [bold]boom[/bold]"
LINE = f"col3: {SUMMARY}"


class FakePopen:
    """``poll()`` answers ``codes`` one call after another (the last one from then on);
    ``on_poll``: run at the first call (an event written just as the process exits)."""

    def __init__(self, *codes: int | None, on_poll=None) -> None:
        self.codes, self.on_poll = list(codes), on_poll
        self.returncode = None

    def poll(self) -> int | None:
        if self.on_poll is not None:
            self.on_poll()
            self.on_poll = None
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        self.returncode = code
        return code


def _event(run: Path, what: str, **fields) -> None:
    path = run / "events" / "aggregator.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"type": "info", "what": what, **fields}) + "\n")


def _procs(run: Path, **popens: FakePopen) -> list[Proc]:
    out = []
    for name, popen in popens.items():
        log = run / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"error: {name} went wrong\n")
        out.append(Proc(name, popen, log))  # type: ignore[arg-type]
    return out


def _watch_it(run: Path, procs: list[Proc]) -> str:
    """What the watch printed (it returned: the run completed)."""
    out = io.StringIO()
    _watch(PLAN, run, procs, Console(file=out, width=200), show=False)
    return out.getvalue()


def _failed(run: Path, name: str = "col3") -> None:
    _event(run, "round_failed", collaborator=name, round=2, phase="train", summary=SUMMARY)


def test_a_reported_failure_is_one_line_and_the_run_goes_on(tmp_path) -> None:
    _failed(tmp_path)
    procs = _procs(
        tmp_path,
        aggregator=FakePopen(None, None, 0),
        **{"collaborator-col1": FakePopen(None, 0), "collaborator-col2": FakePopen(0)},
        **{"collaborator-col3": FakePopen(2)},
    )
    shown = _watch_it(tmp_path, procs)
    assert shown.strip() == LINE  # the party's text as written: its brackets are no markup


def test_a_report_recorded_as_the_reporter_exits_is_seen(tmp_path) -> None:
    """The exit is seen in the same poll that missed the event: the events are read again."""
    procs = _procs(
        tmp_path,
        aggregator=FakePopen(None, 0),
        **{"collaborator-col1": FakePopen(0), "collaborator-col2": FakePopen(0)},
        **{"collaborator-col3": FakePopen(2, on_poll=lambda: _failed(tmp_path))},
    )
    assert _watch_it(tmp_path, procs).strip() == LINE


def test_without_a_quorum_the_run_ends_with_the_aggregators_line(tmp_path) -> None:
    reason = f"{LINE}; round 2 cannot reach its quorum: 2 of 3 required updates possible"
    _failed(tmp_path)
    procs = _procs(
        tmp_path,
        aggregator=FakePopen(None),  # still stopping
        # told "run failed" at its next call, it exits before the aggregator does
        **{
            "collaborator-col1": FakePopen(
                2, on_poll=lambda: _event(tmp_path, "run_failed", reason=reason)
            )
        },
        **{"collaborator-col2": FakePopen(None), "collaborator-col3": FakePopen(2)},
    )
    with pytest.raises(TeeflError) as err:
        _watch_it(tmp_path, procs)
    assert str(err.value) == reason


def test_an_exit_nobody_reported_ends_the_run_with_its_line(tmp_path) -> None:
    _failed(tmp_path, "col2")  # another party's report does not cover col3
    procs = _procs(
        tmp_path,
        aggregator=FakePopen(None),
        **{"collaborator-col1": FakePopen(None), "collaborator-col2": FakePopen(2)},
        **{"collaborator-col3": FakePopen(2)},
    )
    with pytest.raises(TeeflError) as err:
        _watch_it(tmp_path, procs)
    assert str(err.value) == "collaborator-col3 failed: collaborator-col3 went wrong"
