"""FedAdam through the CLI, its aggregator SIGKILLed mid-run and restarted: the run ends
bit-identical to the same run without the kills (issue 15's acceptance), because the server
optimiser's state (m, v, t) is saved with each round's checkpoint and restored from the one a
restart resumes from.

The kills, at fault points (`teefl.faults`): right after round 1's checkpoint and
strategy state are durable; at round 2's first acknowledgement (resumed from round 1's state,
the acknowledged update replayed); during round 2's checkpoint write, after the close has already
stepped the optimiser in memory (the restart must take round 1's state again, not a newer one).
Deterministic CPU training (one thread, fixed seed), tiny synthetic data.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedutil import CHAOS_NAMES, CHAOS_ROUNDS, ChaosFederation, model_files, read_jsonl
from teefl.measure.events import read_events

pytestmark = pytest.mark.slow

FEDADAM = {"strategy": {"name": "fedadam", "options": {"eta": 0.01, "eta_l": 0.005}}}


def _durable(fed: ChaosFederation) -> int:
    """The last round whose checkpoint the resume pointer names."""
    return json.loads((fed.run / "state.json").read_text())["completed_round"]


def _killed_itself(fed: ChaosFederation) -> None:
    rc = fed.parties.procs["aggregator"].wait(timeout=240)
    assert rc == -signal.SIGKILL, f"aggregator exited {rc}:\n" + fed.log()[-4000:]


def test_fedadam_killed_and_restarted_ends_bit_identical(tmp_path: Path) -> None:
    (tmp_path / "free").mkdir()
    (tmp_path / "chaos").mkdir()
    free = ChaosFederation(tmp_path / "free", "none", FEDADAM)
    try:
        free.start()
        free.finish()
    finally:
        free.stop()
    expected = model_files(free.run / "model")
    # every round's checkpoint and strategy state, and the final model
    assert len(expected) == 2 * CHAOS_ROUNDS + 1, sorted(expected)

    fed = ChaosFederation(tmp_path / "chaos", "none", FEDADAM)
    try:
        fed.start_aggregator(fault="durable:1")  # round 1 durable, then killed
        for name in CHAOS_NAMES:
            fed.parties.collaborator(name)
        _killed_itself(fed)
        assert _durable(fed) == 1
        fed.start_aggregator(fault="acked:2")  # resumed from round 1; killed at an ack
        _killed_itself(fed)
        fed.start_aggregator(fault="checkpoint:2")  # round 2 closed in memory, not durable
        _killed_itself(fed)
        assert _durable(fed) == 1
        fed.start_aggregator()
        fed.finish()
    finally:
        fed.stop()

    got = model_files(fed.run / "model")
    assert got.keys() == expected.keys()
    for name, data in expected.items():
        assert got[name] == data, f"{name} differs from the run without kills"
    state = json.loads((fed.run / "state.json").read_text())
    assert state["strategy"] == "fedadam" and state["completed_round"] == CHAOS_ROUNDS
    lines = read_jsonl(fed.run / "metrics.jsonl")
    assert [m["round"] for m in lines] == [*range(1, CHAOS_ROUNDS + 1), "final"]
    for m in lines:
        assert sorted(m["collaborators"]) == sorted(CHAOS_NAMES), m
    info = json.loads((fed.run / "run.json").read_text())
    assert info["status"] == "completed" and info["restarts"] == 3
    # the round config reached every collaborator: FedAdam's eta_l as the round's lr
    for name in CHAOS_NAMES:
        seen = {
            e["round"]: e["config"]
            for e in read_events(fed.run / "events" / f"collaborator-{name}.jsonl")
            if e.get("what") == "round_config"
        }
        assert set(seen) == set(range(1, CHAOS_ROUNDS + 1)), seen
        assert all(c == {"lr": 0.005} for c in seen.values()), seen
