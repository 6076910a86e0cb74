"""teefl on a real Slurm: a one-node cluster (munged, slurmctld, slurmd) started by the fixture.

Studies with ``--executor slurm`` against the same study run here, a killed driver resumed, a
cell's job cancelled; ``teefl slurm federation`` against ``teefl run``, also under a Gramine
stand-in; bad input. The studies are small (tiny synthetic data, small_cnn, 1 round) so that
the module stays at a few minutes on 2 cores; the full default study was compared by hand
(docs/hpc.md). Without root or Slurm the cluster tests skip with the reason.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedutil import SYNTHETIC, final_accuracy, run_dir_of, teefl, write_plan
from slurmutil import SlurmCluster, cluster_or_skip
from teefl.bench.runner import cell_finished

pytestmark = pytest.mark.slurm

CELLS = ["small_cnn-synthetic-baseline-r1", "small_cnn-synthetic-tls-r1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with cluster_or_skip(tmp_path_factory.mktemp("slurm")) as c:
        yield c
    assert c.running() == [], "Slurm daemons left running"


@pytest.fixture()
def idle(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster with no job left behind by the test (also when it fails)."""
    yield cluster
    cluster.cancel_all()


def _study(path: Path, transports: list[str], name: str = "s") -> Path:
    base = copy.deepcopy(SYNTHETIC)
    base["federation"] = {"rounds": 1}
    data = {
        "name": name,
        "base": base,
        "axes": {"transport": transports, "repeats": 1},
        "report": {"resamples": 50},
        "executor": {"slurm": {"poll": 0.3}},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _bench(study: Path, out: Path, *args: str, env: dict[str, str], timeout: float = 400):
    return teefl(
        "bench", str(study), "--out", str(out), "--no-progress", *args,
        cwd=study.parent, timeout=timeout, env=env,
    )  # fmt: skip


def _csv(path: Path, keys: tuple[str, ...]) -> list[tuple[str, ...]]:
    with open(path, newline="") as fh:
        return sorted(tuple(row[k] for k in keys) for row in csv.DictReader(fh))


def _jobs(out: Path) -> list[dict]:
    path = out / "slurm" / "jobs.json"
    return json.loads(path.read_text())["submissions"] if path.is_file() else []


# -- the fixture's own promise --------------------------------------------------------------------


def test_the_test_cluster_runs_a_job_and_leaves_nothing_running(tmp_path: Path) -> None:
    with cluster_or_skip(tmp_path / "c") as c:
        res = subprocess.run(
            ["srun", "hostname"], capture_output=True, text=True, env={**os.environ, **c.env},
            timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == c.node
        sleeper = subprocess.run(
            ["sbatch", "--parsable", "--wrap", "sleep 300"],
            capture_output=True, text=True, env={**os.environ, **c.env}, timeout=60,
        )  # fmt: skip
        assert sleeper.returncode == 0, sleeper.stderr
    # stop() cancelled the sleeping job and stopped the daemons by their pid files
    assert c.running() == []


# -- studies --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_on_slurm_resumes_after_a_killed_driver_and_matches_the_local_run(
    tmp_path: Path, idle: SlurmCluster
) -> None:
    env = idle.env
    study = _study(tmp_path / "study.yaml", ["none", "tls"])
    out = tmp_path / "slurm"
    driver = subprocess.Popen(
        [sys.executable, "-m", "teefl", "bench", str(study), "--out", str(out),
         "--executor", "slurm", "--no-progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "160", **env},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not cell_finished(out / CELLS[0]):
            assert driver.poll() is None, driver.communicate()[0]
            assert time.monotonic() < deadline, "the first cell did not finish in 300 s"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)  # the driver dies; its jobs go on in Slurm
        first_out = driver.communicate(timeout=30)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert "submitted 2 cell(s) to Slurm as job array" in first_out, first_out
    script = out / "slurm" / "cells-1.sbatch"
    assert script.is_file() and "#SBATCH --array=0-1%1" in script.read_text()
    run_id = json.loads((out / CELLS[0] / "run.json").read_text())["run_id"]
    assert not cell_finished(out / CELLS[1])
    job = _jobs(out)[0]["job"]
    assert any(line.startswith(f"{job}_1|") for line in idle.squeue()), idle.squeue()

    # --detach: a look, no wait; then the driver again, to the end
    res = _bench(study, out, "--executor", "slurm", "--detach", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "following 1 cell(s) still queued or running in Slurm" in res.stdout
    assert "Run the same command again to follow them" in res.stdout
    res = _bench(study, out, "--executor", "slurm", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "kept 1 finished cell(s) from an earlier run; 1 to run" in res.stdout
    assert "to Slurm as job" not in res.stdout  # nothing was submitted twice
    assert len(_jobs(out)) == 1
    assert json.loads((out / CELLS[0] / "run.json").read_text())["run_id"] == run_id
    assert not (out / "attic").exists()  # no cell was moved aside to be rerun
    rec = json.loads((out / CELLS[1] / "bench.json").read_text())
    assert rec["executor"] == {"kind": "slurm", "job": f"{job}_1", "node": idle.node}
    assert "Table II" in res.stdout and "C[tls]" in res.stdout

    local = tmp_path / "local"
    res_local = _bench(study, local, env=env)
    assert res_local.returncode == 0, res_local.stdout + res_local.stderr
    # same cells, same accuracies, same tables and the same fitted terms
    for c in CELLS:
        assert final_accuracy(out / c) == final_accuracy(local / c), c
    for table, keys in (
        ("runs.csv", ("model", "dataset", "config", "rounds", "accuracy")),
        ("table2_wallclock.csv", ("model", "dataset", "config", "n")),
        ("table3_communication.csv", ("model", "dataset", "config", "runs", "n")),
        ("coefficients.csv", ("model", "term", "identifiable")),
    ):
        assert _csv(out / "report" / table, keys) == _csv(local / "report" / table, keys), table
    fit_s, fit_l = (json.loads((d / "fit.json").read_text()) for d in (out, local))
    assert set(fit_s["models"]["small_cnn"]["coefficients"]) == {"tls"}
    assert set(fit_s["models"]) == set(fit_l["models"])


@pytest.mark.slow
def test_a_cancelled_cell_job_is_that_cell_failed_and_the_others_complete(
    tmp_path: Path, idle: SlurmCluster
) -> None:
    """Cells with other resources are one job each, chained in run order (afterany): cancelling
    the running one fails that cell only, and the next one starts."""
    study = _study(tmp_path / "study.yaml", ["none", "tls"], name="cancel")
    data = yaml.safe_load(study.read_text())
    data["executor"]["slurm"]["cells"] = [{"match": {"transport": "tls"}, "time": "30"}]
    study.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "teefl", "bench", str(study), "--out", str(out),
         "--executor", "slurm", "--no-progress", "--no-report"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "160", **idle.env},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # generous: a loaded machine starts Python slowly
        jobs: list[dict] = []
        while len(jobs) < 2 or f"{jobs[0]['job']}|RUNNING" not in idle.squeue():
            assert driver.poll() is None, driver.communicate()[0]
            assert time.monotonic() < deadline, "the first cell's job did not start in 300 s"
            jobs = _jobs(out)
            time.sleep(0.2)
        first, second = jobs
        assert not first["array"] and second["dependency"] == f"afterany:{first['job']}"
        deadline = time.monotonic() + 300
        while not (out / first["cells"][0] / "run.json").is_file():  # its federation started
            assert driver.poll() is None, driver.communicate()[0]
            assert time.monotonic() < deadline, "the first cell did not start its federation"
            time.sleep(0.2)
        subprocess.run(["scancel", first["job"]], env={**os.environ, **idle.env}, check=True)
        output, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 1, output
    assert "as 2 jobs" in output and "their resources differ" in output, output
    assert f"failed: Slurm job {first['job']} CANCELLED" in output, output
    assert "1 cell(s) run" in output and "1 failed" in output, output
    assert not cell_finished(out / first["cells"][0])
    assert cell_finished(out / second["cells"][0])
    assert (out / "slurm" / "cells-1-002.sbatch").is_file()


# -- federations ----------------------------------------------------------------------------------


def _mtls_plan(d: Path, node: str) -> Path:
    """A plan whose aggregator runs on ``node``, with certificates from `teefl pki plan`."""
    d.mkdir(parents=True, exist_ok=True)
    data = copy.deepcopy(SYNTHETIC)
    data.update(
        name="fed",
        collaborators=["alice", "bob", "carol"],
        federation={"rounds": 1},
        network={"host": node},
    )
    del data["security"]
    plan = write_plan(d / "plan.yaml", data)
    res = teefl("pki", "plan", str(plan), cwd=d)
    assert res.returncode == 0, res.stdout + res.stderr
    block = yaml.safe_load(res.stdout[res.stdout.index("security:") :].split("\n\n")[0])
    data.update(block)
    return write_plan(plan, data)


def _files(run_dir: Path) -> set[str]:
    return {
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and p.relative_to(run_dir).parts[0] not in ("slurm", "gramine")
    }


@pytest.mark.slow
def test_federation_as_slurm_tasks_matches_a_local_run(tmp_path: Path, idle: SlurmCluster) -> None:
    plan = _mtls_plan(tmp_path, idle.node)
    res = teefl("run", str(plan), "--runs-dir", "local", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    local = run_dir_of(tmp_path / "local")

    res = teefl(
        "slurm", "federation", str(plan), "--runs-dir", "slurm", "--overcommit", "--poll", "0.3",
        cwd=tmp_path, env=idle.env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "as Slurm job" in res.stdout and "round 1/1 closed" in res.stdout
    on_slurm = run_dir_of(tmp_path / "slurm")
    assert (on_slurm / "slurm" / "federation.sbatch").is_file()
    assert "#SBATCH --ntasks=4" in (on_slurm / "slurm" / "federation.sbatch").read_text()
    job_out = next((on_slurm / "slurm").glob("job-*.out")).read_text()
    assert f"placement: aggregator on {idle.node} (collaborators dial {idle.node})" in job_out
    # the same run directory, the same training
    assert _files(on_slurm) == _files(local)
    run = json.loads((on_slurm / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["transport"] == "mtls"
    assert final_accuracy(on_slurm) == final_accuracy(local)
    m_s, m_l = ((d / "metrics.jsonl").read_text().splitlines() for d in (on_slurm, local))
    assert [json.loads(x)["round"] for x in m_s] == [json.loads(x)["round"] for x in m_l]
    for p in ("alice", "bob", "carol"):  # every party ran as a Slurm job step
        env = json.loads((on_slurm / "env" / f"collaborator-{p}.json").read_text())
        assert env["pid"] > 0
    assert "aggregator listening on 0.0.0.0" in (on_slurm / "logs" / "aggregator.log").read_text()


@pytest.mark.slow
def test_federation_under_gramine_sgx_on_slurm(tmp_path: Path, idle: SlurmCluster) -> None:
    from gramine_standin import install_stand_ins

    bin_dir = install_stand_ins(tmp_path / "bin", tmp_path / "gramine-logs")
    plan = _mtls_plan(tmp_path, idle.node)
    env = {**idle.env, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = teefl(
        "slurm", "federation", str(plan), "--launcher", "gramine-sgx",
        "--runs-dir", "runs", "--overcommit", "--poll", "0.3",
        cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = run_dir_of(tmp_path / "runs")
    assert json.loads((run_dir / "run.json").read_text())["config"]["launcher"] == "gramine-sgx"
    # every party went through gramine-sgx (the stand-in logs each start), each its own manifest
    calls = (tmp_path / "gramine-logs" / "sgx.log").read_text().split()
    assert sorted(Path(c).name for c in calls) == [
        "aggregator",
        "collaborator-alice",
        "collaborator-bob",
        "collaborator-carol",
    ]
    assert len(list((run_dir / "gramine").glob("*.manifest"))) == 4
    assert final_accuracy(run_dir) > 0


# -- bad input: one clear line each ---------------------------------------------------------------


def _one_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _cli_error(*args: str, env: dict[str, str]) -> str:
    """The command run in this process (no second torch import): its one-line TeeflError."""
    from typer.testing import CliRunner

    from teefl.cli import app
    from teefl.errors import TeeflError

    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **env})
    assert isinstance(r.exception, TeeflError), (r.exception, r.output)
    msg = str(r.exception)
    assert "\n" not in msg
    return msg


def test_no_slurm_on_path_is_one_line(tmp_path: Path) -> None:
    study = _study(tmp_path / "study.yaml", ["none"])
    plan = write_plan(tmp_path / "plan.yaml", SYNTHETIC)
    env = {"PATH": str(tmp_path / "empty")}
    line = _one_error(_bench(study, tmp_path / "out", "--executor", "slurm", env=env))
    assert "sbatch" in line and "not found on PATH" in line
    assert not (tmp_path / "out").exists()  # nothing written before the check
    msg = _cli_error("slurm", "federation", str(plan), "--runs-dir", str(tmp_path), env=env)
    assert "not found on PATH" in msg
    assert sorted(tmp_path.iterdir()) == sorted([study, plan])


def test_a_missing_partition_and_a_refused_job_are_one_line(
    tmp_path: Path, idle: SlurmCluster
) -> None:
    env = idle.env
    study = str(_study(tmp_path / "study.yaml", ["none"]))
    plan = str(write_plan(tmp_path / "plan.yaml", SYNTHETIC))
    runs = str(tmp_path / "runs")
    slurm = ("--executor", "slurm", "--no-progress")
    msg = _cli_error(
        "bench", study, "-o", str(tmp_path / "a"), *slurm, "--partition", "nosuch", env=env
    )
    assert "partition 'nosuch' does not exist" in msg and "debug" in msg
    msg = _cli_error(
        "slurm", "federation", plan, "--partition", "nosuch", "--runs-dir", runs, env=env
    )
    assert "partition 'nosuch' does not exist" in msg

    # a GPU on a node without one: sbatch refuses the job, teefl says why and where the script is
    msg = _cli_error("bench", study, "-o", str(tmp_path / "b"), *slurm, "--gres", "gpu:1", env=env)
    assert "sbatch refused the job" in msg and "gres" in msg and "cells-1.sbatch" in msg
    assert _jobs(tmp_path / "b") == []
    msg = _cli_error("slurm", "federation", plan, "--gres", "gpu:1", "--runs-dir", runs, env=env)
    assert "sbatch refused the job" in msg and "federation.sbatch" in msg
    msg = _cli_error(
        "bench", study, "-o", str(tmp_path / "c"), *slurm, "--time", "ten min", env=env
    )
    assert "executor.slurm.time" in msg
    assert idle.squeue() == []
