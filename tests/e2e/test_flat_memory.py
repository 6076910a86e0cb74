"""``federation.memory: flat`` (docs/large-models.md): a real federation whose aggregator receives
each update into its file and sums the round from the files when it closes ends with exactly the
models of the same federation in ``fast`` memory -- over the socket data plane and over gRPC."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fedutil import SYNTHETIC, model_files, read_jsonl, run_plan

pytestmark = pytest.mark.slow


def _models(tmp: Path, memory: str, data_plane: str) -> dict[str, bytes]:
    data = copy.deepcopy(SYNTHETIC)
    data["federation"] = {**data["federation"], "memory": memory}
    data["network"] = {"data_plane": data_plane}
    run, _ = run_plan(tmp / f"{memory}-{data_plane}", data, "none")
    events = read_jsonl(run / "events" / "aggregator.jsonl")
    spans = [e for e in events if e.get("type") == "span" and e["phase"] == "persist_update"]
    assert len(spans) == 3 * SYNTHETIC["federation"]["rounds"]  # every update stored once
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    return model_files(run / "model")


def test_flat_memory_ends_bit_identical_to_fast(tmp_path: Path) -> None:
    fast = _models(tmp_path, "fast", "socket")
    assert len(fast) == SYNTHETIC["federation"]["rounds"] + 1  # the checkpoints and final
    for data_plane in ("socket", "grpc"):
        flat = _models(tmp_path, "flat", data_plane)
        assert flat.keys() == fast.keys()
        for name, data in fast.items():
            assert flat[name] == data, f"{name} ({data_plane}) differs from the fast run's"
