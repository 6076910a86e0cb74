"""Chaos: a real federation started through the CLI, its parties SIGKILLed at phases read from the
live events, restarted with the same command -- and the run must end as if nothing happened.

Each federation is compared with a fault-free run of the same seed: every checkpoint and the
final model bit-identical, every acknowledged update counted exactly once (one metrics line per
round naming each collaborator once), every aggregator start counted, nothing left behind in the
run or staging directories. The kills (issue 22): the aggregator in round 1 after one
acknowledgement, after all of them, during the round-1 close before its checkpoint is durable,
in the final evaluation pass together with a collaborator; over transport none the first kill
also empties the staging directory, as a host restart does, so the acknowledged update survives
only in its collaborator's kept copy.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedutil import CHAOS_NAMES as NAMES
from fedutil import CHAOS_ROUNDS as ROUNDS
from fedutil import ChaosFederation as Chaos
from fedutil import model_files as _files
from fedutil import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory) -> dict[str, bytes]:
    """The checkpoints and final model of a run without faults (transport none)."""
    tmp = tmp_path_factory.mktemp("fault-free")
    fed = Chaos(tmp, "none")
    try:
        fed.start()
        fed.finish()
    finally:
        fed.stop()
    models = _files(fed.run / "model")
    assert len(models) == ROUNDS + 1, sorted(models)  # round-0001.. and the final model
    return models


@pytest.mark.parametrize(
    ("transport", "memory"), [("none", "fast"), ("mtls", "fast"), ("none", "flat")]
)
def test_killed_anywhere_the_run_ends_bit_identical(
    tmp_path: Path, transport: str, memory: str, fault_free: dict[str, bytes]
) -> None:
    """``flat`` (``federation.memory: flat``): updates received into their files and summed at
    the close from their maps, mapped again after each restart -- the fault-free run (``fast``
    memory) to the bit."""
    fed = Chaos(tmp_path, transport, {"memory": memory})
    try:
        # 1. round 1, after one acknowledgement
        if transport == "none" and memory == "fast":
            # killed by its own hand at the first update acknowledged from shared memory and
            # not yet in the run directory; then the host "restarts": staging is emptied, and
            # only the collaborator's kept copy is left of that update
            fed.start_aggregator(fault="settle:1")
            for name in NAMES:
                fed.parties.collaborator(name)
            assert fed.parties.procs["aggregator"].wait(timeout=240) == -signal.SIGKILL
            staged = list(fed.staging.rglob("*.safetensors"))
            assert staged, "the acknowledged update should have been waiting in staging"
            for p in staged:
                p.unlink()
        else:
            fed.start()
            fed.wait("round 1: one update acknowledged", lambda: len(fed.accepted(1)) >= 1)
            fed.kill("aggregator")
        # 2. round 1, after every acknowledgement (the close may have begun)
        since = len(fed.events())
        fed.start_aggregator()
        fed.wait(
            "round 1: every update acknowledged",
            lambda: fed.accepted(1, since) >= set(NAMES),
        )
        fed.kill("aggregator")
        # 3. during a round close, before its checkpoint is durable (round 1, unless step 2's
        # kill came after that checkpoint)
        closing = fed.completed_rounds() + 1
        fed.start_aggregator(fault=f"checkpoint:{closing}")
        assert fed.parties.procs["aggregator"].wait(timeout=240) == -signal.SIGKILL, fed.log()[
            -4000:
        ]
        # 4. the final evaluation pass, the aggregator and a collaborator at once
        fed.start_aggregator()
        fed.wait(
            "the final evaluation pass",
            lambda: any(
                e.get("what") == "round_closed" and e.get("round") == ROUNDS for e in fed.events()
            ),
        )
        fed.kill("aggregator")
        fed.kill("col2")
        fed.start_aggregator()
        fed.parties.collaborator("col2")
        fed.finish()
    finally:
        fed.stop()

    run = fed.run
    # bit-identical to the fault-free run: every checkpoint and the final model
    got = _files(run / "model")
    assert got.keys() == fault_free.keys()
    for name, data in fault_free.items():
        assert got[name] == data, f"{name} differs from the fault-free run's"
    # one metrics line per round, each update counted exactly once
    lines = read_jsonl(run / "metrics.jsonl")
    assert [m["round"] for m in lines] == [*range(1, ROUNDS + 1), "final"]
    for m in lines:
        assert sorted(m["collaborators"]) == sorted(NAMES), m
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["rounds_completed"] == ROUNDS
    assert info["restarts"] == len(fed.aggregator_pids) - 1
    # nothing left behind: no temporary files, no stored updates, nothing staged
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or p.suffix == ".tmp"]
    assert not leftovers, leftovers
    updates = run / "updates"
    assert not updates.exists() or not [p for p in updates.rglob("*") if p.is_file()], list(
        updates.rglob("*")
    )
    assert not fed.staging.exists() or not [p for p in fed.staging.rglob("*") if p.is_file()]
    # the collaborators' kept copies were used where the aggregator had lost an update
    if transport == "none":
        assert "sending our kept update" in fed.log()
