"""examples/tabular and examples/image-folder without a federation (tests/e2e/test_workload_e2e.py
runs them with `teefl run`): the plan validates, its workload resolves from its directory, and the
workload learns the generated data in rounds of FedAvg computed in this process (teefl's own
`RunningFedAvg`, no aggregator or collaborator processes) to the accuracy the READMEs state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from paths import REPO

from teefl.plan import plan_from_dict
from teefl.strategy.running import RunningFedAvg
from teefl.workload.api import Party, RoundInfo, round_seed
from teefl.workload.digest import workload_digest
from teefl.workload.resolve import LoadedWorkload, resolve_workload

EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_example(name: str) -> tuple[dict, LoadedWorkload]:
    path = EXAMPLES / name / "plan.yaml"
    data = yaml.safe_load(path.read_text())
    plan_from_dict(data, str(path), base=path.parent)  # the whole plan validates
    wl = data["workload"]
    return data, resolve_workload(wl["name"], wl.get("options"), path.parent, source=str(path))


def generate(name: str, out: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, str(EXAMPLES / name / "generate.py"), "--out", str(out), *args],
        check=True,
        capture_output=True,
        timeout=300,
    )


def fedavg_rounds(w: LoadedWorkload, plan: dict, data_root: Path, rounds: int) -> list[list[float]]:
    """``rounds`` rounds of FedAvg over the plan's collaborators, each with its own data dir
    (``data_root/<name>``); the global model's accuracy on each party's held-out data after
    each round."""
    names, seed = plan["collaborators"], plan["seed"]
    parties = [Party(n, i, len(names), seed, data_root / n) for i, n in enumerate(names)]
    datas = [w.load(p) for p in parties]
    glob = w.build_model(seed)
    history = []
    for r in range(1, rounds + 1):
        avg = RunningFedAvg({k: v.clone() for k, v in glob.state_dict().items()})
        for p, d in zip(parties, datas, strict=True):
            local = w.build_model(seed)
            local.load_state_dict(glob.state_dict())
            m = w.train(local, d, RoundInfo(r, round_seed(seed, p.index, r)), party=p.name)
            avg.add(local.state_dict(), m["samples"])
        glob.load_state_dict(avg.result())
        history.append([w.evaluate(glob, d)["accuracy"] for d in datas])
    return history


def test_tabular_task_is_user_code_outside_teefl():
    plan, w = load_example("tabular")
    assert plan["workload"]["name"] == "./task.py:Task"
    assert w.target.kind == "file" and w.target.path == EXAMPLES / "tabular" / "task.py"
    text = (EXAMPLES / "tabular" / "task.py").read_text()
    assert "import teefl" not in text and "from teefl" not in text
    assert w.digest == workload_digest("./task.py:Task", EXAMPLES / "tabular")


def test_tabular_example_converges(tmp_path):
    """README: each party's held-out accuracy >= 0.85 after 3 rounds (labels are 5 % noise)."""
    plan, w = load_example("tabular")
    generate("tabular", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["col1", "col2", "col3"]
    history = fedavg_rounds(w, plan, tmp_path, 3)
    assert min(history[-1]) >= 0.85, history
    assert min(history[0]) < 0.97  # it learns over rounds; the task is not trivial


def test_tabular_data_also_fits_the_builtin_workload(tmp_path):
    """The README's alternative plan: the same CSVs with the built-in ``tabular`` workload."""
    plan, _ = load_example("tabular")
    generate("tabular", tmp_path, "--rows", "300")
    readme = (EXAMPLES / "tabular" / "README.md").read_text()
    block = readme.split("```yaml\n")[1].split("```")[0]
    wl = yaml.safe_load(block)["workload"]
    w = resolve_workload(wl["name"], wl["options"])
    history = fedavg_rounds(w, plan, tmp_path, 3)
    assert min(history[-1]) >= 0.8, history


def test_image_folder_plan_resolves():
    plan, w = load_example("image-folder")
    assert w.target.kind == "builtin" and w.options.model == "resnet18"
    assert w.build_model(plan["seed"]).fc.out_features == 3


@pytest.mark.slow
def test_image_folder_example_converges(tmp_path):
    """README: after 1 round (2 local epochs each) the global ResNet-18 classifies each party's
    held-out images with accuracy >= 0.8."""
    plan, w = load_example("image-folder")
    generate("image-folder", tmp_path)
    history = fedavg_rounds(w, plan, tmp_path, 1)
    assert min(history[-1]) >= 0.8, history
