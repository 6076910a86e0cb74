"""examples/lora as a user runs it (`./run.sh`: generate the text, `teefl run` with 1 aggregator
and 3 collaborator processes): only the LoRA adapters travel, are averaged and saved, and the
model learns. Slow (three small language models training on 2 cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO

from fedutil import final_accuracy, read_jsonl, run_dir_of
from teefl.server.aggregator import final_state

pytestmark = pytest.mark.slow
pytest.importorskip("peft", reason="examples/lora needs transformers and peft (the dev extra)")


def test_the_lora_example_moves_only_adapters_and_learns(tmp_path: Path) -> None:
    work = tmp_path / "lora"
    shutil.copytree(REPO / "examples" / "lora", work)
    res = subprocess.run(
        ["bash", str(work / "run.sh"), "--runs-dir", str(work / "runs"), "--no-progress"],
        env={**os.environ, "TEEFL": f"{sys.executable} -m teefl", "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = run_dir_of(work / "runs")
    final = final_state(run)
    assert final and all("lora_" in name for name in final)  # the frozen base never travels
    adapter_bytes = sum(t.numel() * t.element_size() for t in final.values())
    uploads = [
        e["bytes"]
        for f in (run / "events").glob("collaborator-*.jsonl")
        for e in read_jsonl(f)
        if e.get("phase") == "upload" and e.get("type") == "span"
    ]
    assert len(uploads) == 9  # 3 collaborators x 3 rounds
    assert all(adapter_bytes <= b < adapter_bytes + 4096 for b in uploads), uploads
    # the README's figure: next-character accuracy of the averaged adapters after 3 rounds
    assert final_accuracy(run) >= 0.25
