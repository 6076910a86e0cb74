"""The Slurm executor's and the Slurm federation's own logic, without a cluster: resources per
cell, the batch scripts, task placement, the study's executor options and their errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from teefl.bench.matrix import expand
from teefl.bench.slurm_script import resources_for, sbatch_options, write_script
from teefl.bench.study import study_from_dict
from teefl.errors import TeeflError
from teefl.slurm.client import tasks_per_node
from teefl.slurm.federation import JobSpec, aggregator_host, check_spec, place

BASE = {
    "dataset": {"name": "synthetic"},
    "model": {"name": "small_cnn"},
    "federation": {"rounds": 1},
    "collaborators": 3,
}


def _study(**executor):
    return study_from_dict(
        {
            "name": "u",
            "base": BASE,
            "axes": {"transport": ["none", "tls", "mtls"], "launcher": ["native", "gramine-sgx"]},
            "executor": {"kind": "slurm", **executor},
        }
    )


def test_cells_get_the_study_resources_and_those_of_matching_rules() -> None:
    study = _study(
        slurm={
            "partition": "batch",
            "time": 30,
            "options": ["--qos=normal"],
            "cells": [
                {"match": {"launcher": "gramine-sgx"}, "constraint": "sgx", "options": ["--x=1"]},
                {"match": {"launcher": "gramine-sgx", "transport": "mtls"}, "time": "2:00:00"},
            ],
        }
    )
    cells, _ = expand(study)
    spec = study.executor.slurm
    by = {c.name: sbatch_options(resources_for(spec, c)) for c in cells}
    native = by["small_cnn-synthetic-tls-r1"]
    assert native == [
        "--nodes=1",
        "--ntasks=1",
        "--partition=batch",
        "--time=30",
        "--exclusive",
        "--qos=normal",
    ]
    sgx = by["small_cnn-synthetic-gramine-sgx+tls-r1"]
    assert "--constraint=sgx" in sgx and sgx[-2:] == ["--qos=normal", "--x=1"]
    assert "--time=30" in sgx
    assert "--time=2:00:00" in by["small_cnn-synthetic-gramine-sgx+mtls-r1"]
    # the study's own resources are not changed by a rule
    assert spec.constraint is None and spec.options == ["--qos=normal"]


def test_batch_scripts_are_valid_bash_and_name_every_cell(tmp_path: Path) -> None:
    study = _study()
    cells, _ = expand(study)
    opts = sbatch_options(resources_for(study.executor.slurm, cells[0]))
    array = write_script(
        tmp_path / "a.sbatch",
        study=study,
        out=tmp_path,
        cells=cells,
        options=opts,
        parallel=1,
        data_dir=None,
    )
    text = array.read_text()
    assert f"#SBATCH --array=0-{len(cells) - 1}%1" in text
    assert all(c.name in text for c in cells)
    assert "bench-cell" in text and "--status-file" in text
    single = write_script(
        tmp_path / "b.sbatch",
        study=study,
        out=tmp_path,
        cells=cells[:1],
        options=opts,
        parallel=None,
        data_dir=tmp_path / "data",
    )
    assert "--array" not in single.read_text() and "--data-dir" in single.read_text()
    for script in (array, single):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_study_executor_options_are_validated() -> None:
    with pytest.raises(TeeflError, match="network mode netns"):
        study_from_dict({"base": BASE, "network": {"mode": "netns"}, "executor": {"kind": "slurm"}})
    with pytest.raises(TeeflError, match="--array is set by teefl"):
        _study(slurm={"options": ["--array=0-3"]})
    with pytest.raises(TeeflError, match=r"executor\.slurm\.time"):
        _study(slurm={"time": "an hour"})
    with pytest.raises(TeeflError, match=r"executor\.slurm\.cells\.0\.match\.colour: unknown key"):
        _study(slurm={"cells": [{"match": {"colour": "red"}}]})
    # where the cells run is not part of what a study measures: not in OUT/study.yaml
    assert "executor" not in _study(slurm={"partition": "p"}).normalized()


def test_slurm_options_need_the_slurm_executor(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from teefl.cli import app

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"base": BASE}))
    r = CliRunner().invoke(app, ["bench", str(study), "--partition", "p", "--dry-run"])
    assert isinstance(r.exception, TeeflError)
    assert "--partition apply(ies) to Slurm: add --executor slurm" in str(r.exception)
    r = CliRunner().invoke(app, ["bench", str(study), "--detach", "--dry-run"])
    assert "--detach" in str(r.exception)


def test_tasks_per_node_is_read_as_slurm_writes_it() -> None:
    assert tasks_per_node("4") == [4]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(TeeflError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node("2(x)")


def test_parties_are_placed_as_slurm_laid_out_the_tasks() -> None:
    names = ["alice", "bob", "carol"]
    # one node, more tasks than CPUs (--overcommit): everything there
    assert set(place(names, ["n1"], [4]).values()) == {"n1"}
    # a node per party: the aggregator on task 0's node, collaborator i on task i's
    assert place(names, ["n1", "n2", "n3", "n4"], [1, 1, 1, 1]) == {
        "aggregator": "n1",
        "collaborator-alice": "n2",
        "collaborator-bob": "n3",
        "collaborator-carol": "n4",
    }
    # two nodes of two tasks: the aggregator shares its node with the first collaborator
    assert place(names, ["n1", "n2"], [2, 2]) == {
        "aggregator": "n1",
        "collaborator-alice": "n1",
        "collaborator-bob": "n2",
        "collaborator-carol": "n2",
    }
    # the aggregator pinned to a node (the plan's network.host): it takes a task slot there
    pinned = place(names, ["n1", "n2", "n3", "n4"], [1, 1, 1, 1], "n3")
    assert pinned["aggregator"] == "n3"
    assert sorted(v for k, v in pinned.items() if k != "aggregator") == ["n1", "n2", "n4"]
    with pytest.raises(TeeflError, match="not in the job's nodes"):
        place(names, ["n1"], [4], "n9")


def test_federation_job_options_are_checked() -> None:
    assert aggregator_host("{node}-ib", "n7") == "n7-ib"
    with pytest.raises(TeeflError, match="only \\{node\\}"):
        aggregator_host("{host}", "n7")
    with pytest.raises(TeeflError, match="--ntasks is set by teefl"):
        check_spec(JobSpec(sbatch_options=["--ntasks=9"]))
    with pytest.raises(TeeflError, match="not an option"):
        check_spec(JobSpec(srun_options=["exclusive"]))
    spec = JobSpec(cpus_per_task=2, nodes=4, partition="p", aggregator_node="n1", overcommit=True)
    assert spec.sbatch(4) == [
        "--ntasks=4",
        "--cpus-per-task=2",
        "--nodes=4",
        "--partition=p",
        "--nodelist=n1",
        "--overcommit",
    ]


def test_a_cell_held_by_another_job_is_not_run_twice(tmp_path: Path) -> None:
    import sys

    from teefl.bench.slurm_job import _cell_lock

    path = tmp_path / "slurm" / "locks" / "c1.lock"
    path.parent.mkdir(parents=True)
    path.write_text("job 7_1 on n1, pid 1\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        busy = r"c1 is being run by another job \(job 7_1 on n1"
        with pytest.raises(TeeflError, match=busy), _cell_lock(tmp_path, "c1"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with _cell_lock(tmp_path, "c1"):  # free again
        assert "pid" in path.read_text()
