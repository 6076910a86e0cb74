"""`teefl run`'s watch over its processes: a party that fails ends the run, except a
collaborator the aggregator dropped (its re-attestation refused), which the others outlive."""

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
from teefl.rundir import RunDir


class FakePopen:
    """A process whose exit codes, one per poll, are scripted (the last one repeats)."""

    def __init__(self, *codes: int | None) -> None:
        self.codes = list(codes)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        self.returncode = code
        return code


def _run(tmp_path: Path, events: list[dict], col3: FakePopen) -> None:
    plan = plan_from_dict(SYNTHETIC)
    path = RunDir(tmp_path).events()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    log = tmp_path / "col3.log"
    log.write_text("error: col3 leaves the run: re-attestation before round 3 failed: no\n")
    procs = [
        Proc("aggregator", FakePopen(None, None, 0), log),  # type: ignore[arg-type]
        Proc("collaborator-col1", FakePopen(None, 0), log),  # type: ignore[arg-type]
        Proc("collaborator-col2", FakePopen(None, 0), log),  # type: ignore[arg-type]
        Proc("collaborator-col3", col3, log),  # type: ignore[arg-type]
    ]
    _watch(plan, tmp_path, procs, Console(file=io.StringIO()), show=False)


def test_a_dropped_collaborator_leaving_does_not_end_the_run(tmp_path: Path) -> None:
    dropped = {"type": "info", "what": "dropped", "collaborator": "col3", "round": 3}
    _run(tmp_path, [dropped], FakePopen(2))  # returns once the others have finished


def test_any_other_failed_party_ends_the_run(tmp_path: Path) -> None:
    with pytest.raises(TeeflError, match="collaborator-col3 failed: col3 leaves the run"):
        _run(tmp_path, [], FakePopen(2))
