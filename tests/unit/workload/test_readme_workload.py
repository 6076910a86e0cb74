"""The README's "Your own workload" task is a working workload: extracted from README.md as a
user would copy it, resolved through the plan, trained for a few rounds on a generated CSV."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from paths import REPO

from teefl.plan import plan_from_dict
from teefl.workload.api import Party, RoundInfo
from teefl.workload.resolve import plan_workload


def _readme_task() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own workload", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README section holds one complete task"
    return blocks[0]


def test_the_readme_task_learns_on_a_csv(tmp_path) -> None:
    code = _readme_task()
    assert len(code.splitlines()) <= 45  # "a complete task in ~40 lines"
    (tmp_path / "task.py").write_text(code)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)])
    df["label"] = (x[:, 0] + x[:, 1] > 0).astype(int)
    (tmp_path / "alice").mkdir()
    df.to_csv(tmp_path / "alice" / "data.csv", index=False)
    plan = plan_from_dict(
        {"collaborators": ["alice"], "workload": {"name": "./task.py:Task",
                                                  "options": {"features": 8}}},
        base=tmp_path,
    )  # fmt: skip
    w = plan_workload(plan)
    model = w.build_model(0)
    data = w.load(Party("alice", 0, 1, 0, tmp_path / "alice"))
    before = w.evaluate(model, data)["accuracy"]
    for r in range(1, 6):
        assert w.train(model, data, RoundInfo(r, r))["samples"] == 400
    after = w.evaluate(model, data)
    assert after["samples"] == 400 and after["accuracy"] >= 0.9 > before
