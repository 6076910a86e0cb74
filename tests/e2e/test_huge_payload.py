"""No size limit below 2**63 (issue 23, item 2): a model with a single tensor over 2 GiB and a
payload over 4 GiB goes round a real federation (`teefl run`: an aggregator and a collaborator
process) over the socket data plane and over gRPC, with its checks (CRC32C over transport none),
and comes back into the final model.

How the test stays within this machine's memory: the model is two uint8 buffers made with
``torch.zeros`` (no page is touched until it is copied into the wire payload), "training" writes a
few bytes, FedAvg aggregates integer tensors by maximum (no float64 sum), and the aggregator runs
``federation.memory: flat`` -- the update is received into its file and summed from it window by
window. The aggregator holds the model and the next one's buffer (~8.8 GB at the close), the
collaborator the model once (~4.4 GB); nothing else is resident.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedutil import read_jsonl, run_plan

pytestmark = pytest.mark.slow

BIG = 2_300_000_000  # elements (= bytes) of the first tensor: over 2 GiB
REST = 2_100_000_000  # the second: together over 4 GiB
MARK = 201  # what the collaborator writes: FedAvg's maximum of uint8 counters keeps it

HUGE = f'''
import torch
from torch import nn


class Huge:
    """Two uint8 buffers, {BIG} and {REST} bytes; "training" marks a few bytes of each."""

    def build_model(self, seed):
        net = nn.Module()
        net.register_buffer("a", torch.zeros({BIG}, dtype=torch.uint8))
        net.register_buffer("b", torch.zeros({REST}, dtype=torch.uint8))
        return net

    def load(self, party):
        return None

    def train(self, model, data, info):
        model.a[-1] = {MARK}
        model.b[0] = {MARK} - 1
        model.b[-1] = {MARK} - 2
        return {{"samples": 1}}

    def evaluate(self, model, data):
        return {{"samples": 1, "mark": int(model.b[-1])}}
'''


def _tensor_bytes(path: Path, name: str, at: list[int]) -> tuple[int, list[int]]:
    """A safetensors file's tensor ``name``: its size, and its bytes at offsets ``at``
    (negative: from its end), read with seeks (the file is never loaded)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        begin, end = header[name]["data_offsets"]
        out = []
        for i in at:
            fh.seek(8 + n + (begin if i >= 0 else end) + i)
            out.append(fh.read(1)[0])
    return end - begin, out


@pytest.mark.parametrize("data_plane", ["socket", "grpc"])
def test_a_tensor_over_2_gib_in_a_payload_over_4_gib_goes_round(
    tmp_path: Path, data_plane: str
) -> None:
    d = tmp_path / data_plane
    d.mkdir()
    (d / "huge.py").write_text(HUGE)
    data = {
        "collaborators": 1,
        "workload": {"name": "./huge.py:Huge"},
        "federation": {"rounds": 1, "memory": "flat", "round_timeout": 900},
        "network": {"data_plane": data_plane},
        "training": {"threads": 1},
    }
    run, _ = run_plan(d, data, "none")
    final = run / "model" / "final.safetensors"
    assert final.stat().st_size > 4 << 30
    size, (last,) = _tensor_bytes(final, "a", [-1])
    assert size == BIG > 2 << 30 and last == MARK
    size, marks = _tensor_bytes(final, "b", [0, 1, -1])
    assert size == REST and marks == [MARK - 1, 0, MARK - 2]
    # the final pass evaluated the final model, downloaded whole (its CRC32C checked)
    final_pass = [m for m in read_jsonl(run / "metrics.jsonl") if m["round"] == "final"]
    assert final_pass[-1]["weighted"]["final.mark"] == MARK - 2, final_pass
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["model_info"]["size_bytes"] > 4 << 30
