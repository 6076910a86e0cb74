"""The benchmark harness still drives the real aggregator and collaborator (benchmarks/_common.py):
a tiny federation and a raw echo, so the benchmark scripts do not silently rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import _common as C


def test_raw_echo_returns_the_same_bytes() -> None:
    times = C.raw_echo(b"teefl" * 1000, reps=2)
    assert len(times) == 2 and all(t > 0 for t in times)


@pytest.mark.parametrize("transport", ["none", "tls"])
def test_fed_transfer_reads_the_collaborators_spans(tmp_path: Path, transport: str) -> None:
    res = C.fed_transfer("linear16", transport, reps=2, workdir=tmp_path, collaborators=2)
    size = len(C.payload_of("linear16"))
    assert res.bytes == size
    assert len(res.download) == len(res.upload) == 2
    assert all(d > 0 for d in res.download) and all(u > 0 for u in res.upload)
    assert len(res.rounds) == 2 and all(r > 0 for r in res.rounds)
    assert res.agg_peak_rss >= res.agg_base_rss > 0
    assert "agg:receive_update" in res.spans
