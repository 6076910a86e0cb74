"""A bad workload reference stops `teefl run` with one line before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedutil import teefl, write_plan

CASES = {
    "missing_module_xyz:Task": "no module named 'missing_module_xyz'",
    "./task.py:Nope": "Nope",
    "./task.py:NotAWorkload": "lacks build_model",
}


@pytest.mark.parametrize("ref", sorted(CASES))
def test_teefl_run_with_a_bad_reference_is_one_line_and_starts_nothing(tmp_path: Path, ref):
    (tmp_path / "task.py").write_text("class NotAWorkload:\n    pass\n")
    plan = write_plan(
        tmp_path / "plan.yaml",
        {"collaborators": 2, "workload": {"name": ref}, "security": {"transport": "none"}},
    )
    res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and CASES[ref] in lines[0] and ref in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.glob("runs/*/logs/*"))  # no party was started
