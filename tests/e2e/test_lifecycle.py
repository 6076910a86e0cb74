"""The life of `teefl run` and its processes: signals stop every one of them, one process per run
directory, and user mistakes (a missing dataset.root, a read-only output directory) are one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gramine_standin import install_stand_ins
from paths import REPO

from fedutil import SYNTHETIC, read_jsonl, teefl, write_plan

TEEFL = [sys.executable, "-m", "teefl"]
#: long enough that no run below ends by itself while a test works on it
LONG = {**SYNTHETIC, "federation": {"rounds": 10_000}}


def _procs_of(run_dir: Path) -> dict[int, int]:
    """Live processes whose command line names ``run_dir`` (every party does): pid -> pgid."""
    needle = str(run_dir).encode()
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "cmdline").read_bytes():
                continue
            found[int(entry.name)] = os.getpgid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has stopped; only its exit status is left


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and _alive(int(entry.name)):
                    return True
            except (OSError, ProcessLookupError):
                continue
    return False


def _start_run(
    tmp_path: Path, data: dict = LONG, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    plan = write_plan(tmp_path / "plan.yaml", data)
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen(
        [*TEEFL, "run", str(plan), "--runs-dir", "runs", "--run-id", "life", "--no-progress"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        # the run as a terminal would start it: a test runner started under nohup passes SIGHUP
        # on ignored, and `teefl run` rightly keeps a signal it was started with ignored
        preexec_fn=_default_stop_signals,
    )
    log.close()
    return p, (tmp_path / "runs" / "life").resolve()


def _default_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _wait_rounds(p: subprocess.Popen, run_dir: Path, log: Path, parties: int) -> dict[int, int]:
    """Wait (bounded) until a round has closed and every party runs; returns them (pid -> pgid).
    The bound is generous: on a loaded shared host starting four torch processes takes minutes."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert p.poll() is None, log.read_text()[-3000:]
        events = run_dir / "events" / "aggregator.jsonl"
        closed = events.exists() and any(
            e.get("what") == "round_closed" for e in read_jsonl(events) if "what" in e
        )
        procs = _procs_of(run_dir)
        if closed and len(procs) == parties:
            return procs
        time.sleep(0.2)
    raise AssertionError("the run did not get going:\n" + log.read_text()[-3000:])


def _kill_leftovers(p: subprocess.Popen, run_dir: Path) -> None:
    """Whatever a failing test left running is killed (never leak processes on a shared host)."""
    if p.poll() is None:
        p.kill()
        p.wait(10)
    for pgid in set(_procs_of(run_dir).values()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "launcher"),
    [
        (signal.SIGTERM, "native"),
        (signal.SIGHUP, "native"),
        (signal.SIGTERM, "gramine-direct"),
    ],
)
def test_a_signal_to_teefl_run_stops_every_process(tmp_path: Path, sig: int, launcher: str) -> None:
    env, data = None, LONG
    if launcher != "native":
        bin_dir = install_stand_ins(tmp_path / "bin", tmp_path / "gramine-logs")
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        data = {**LONG, "runtime": {"launcher": launcher}}
    p, run_dir = _start_run(tmp_path, data, env)
    try:
        procs = _wait_rounds(p, run_dir, tmp_path / "run.log", parties=4)
        if launcher != "native":  # every party really runs through the stand-in launcher
            assert len((tmp_path / "gramine-logs" / "direct.log").read_text().split()) == 4
        p.send_signal(sig)
        assert p.wait(timeout=120) == 130, (tmp_path / "run.log").read_text()[-3000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in procs):
            time.sleep(0.1)
        assert not [pid for pid in procs if _alive(pid)], "processes left running"
        assert not [g for g in set(procs.values()) if _group_alive(g)], "process groups left"
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "interrupted"
        assert isinstance(info["rounds_completed"], int) and 1 <= info["rounds_completed"] < 10_000
        assert "stopping all processes" in (tmp_path / "run.log").read_text()
    finally:
        _kill_leftovers(p, run_dir)


@pytest.mark.slow
def test_a_second_run_or_aggregator_on_the_same_run_directory_is_refused(tmp_path: Path) -> None:
    p, run_dir = _start_run(tmp_path)
    try:
        procs = _wait_rounds(p, run_dir, tmp_path / "run.log", parties=4)
        plan_before = (run_dir / "plan.yaml").read_text()
        other = write_plan(tmp_path / "other.yaml", {**SYNTHETIC, "federation": {"rounds": 1}})
        res = teefl(
            "run",
            str(other),
            "--runs-dir",
            "runs",
            "--run-id",
            "life",
            "--no-progress",
            cwd=tmp_path,
            timeout=180,
        )
        assert res.returncode == 2, res.stdout + res.stderr
        assert "Traceback" not in res.stderr
        assert res.stderr.strip() == (
            f"error: run directory {run_dir} is in use by pid {p.pid}, teefl run (lock "
            f"{run_dir / 'run.lock'}); wait for it to end or stop it, or use another run "
            "directory / --run-id"
        )
        agg = [pid for pid in procs if b"aggregator" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(agg) == 1
        # SIGUSR1: every thread's stack into the party's log, and the party goes on (`teefl.cli`)
        agg_log = run_dir / "logs" / "aggregator.log"
        os.kill(agg[0], signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while "most recent call first" not in agg_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, agg_log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        assert "Thread 0x" in agg_log.read_text(errors="replace")
        res = teefl(
            "aggregator", "--plan", str(other), "--run-dir", str(run_dir), cwd=tmp_path, timeout=180
        )
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"is in use by pid {agg[0]}, teefl aggregator (lock" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        # neither attempt touched the run
        assert (run_dir / "plan.yaml").read_text() == plan_before
        assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
        assert p.poll() is None
        p.terminate()
        assert p.wait(timeout=120) == 130
    finally:
        _kill_leftovers(p, run_dir)
    # the locks went with their holders: the run directory can be taken again
    from teefl import rundir

    for name in (rundir.RUN_LOCK, rundir.AGGREGATOR_LOCK):
        rundir.release(rundir.acquire(run_dir, name, "test"))


def test_a_missing_dataset_root_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    # fashion-mnist may well be installed system-wide: the run must not train on that copy
    missing = tmp_path / "no-such-dir"
    data = {**SYNTHETIC, "dataset": {"name": "fashion-mnist", "root": str(missing)}}
    plan = str(write_plan(tmp_path / "plan.yaml", data))
    run_dir = (tmp_path / "runs" / "root").resolve()
    try:
        res = teefl(
            "run", plan, "--runs-dir", "runs", "--run-id", "root", "--no-progress", cwd=tmp_path
        )
    finally:
        for pgid in set(_procs_of(run_dir).values()):  # whatever a broken build started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: dataset.root {missing} does not exist: fix dataset.root")
    assert not (tmp_path / "runs").exists()


# -- read-only output directories ---------------------------------------------------------------
def _without_dac_override() -> list[str]:
    """A prefix that runs a command without root's power to write anywhere (as a user would)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    drop = ["--inh-caps=-dac_override,-dac_read_search"]
    drop += ["--bounding-set=-dac_override,-dac_read_search"]
    if setpriv is None or subprocess.run([setpriv, *drop, "true"]).returncode != 0:
        pytest.skip("running as root without a way to drop CAP_DAC_OVERRIDE")
    return [setpriv, *drop]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_without_dac_override(), sys.executable, "-m", "teefl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture()
def ro(tmp_path: Path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def _one_line(res: subprocess.CompletedProcess, what: str, path: Path, option: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: cannot ") and f"the {what} {path}:" in lines[0]
    assert option in lines[0]


def test_read_only_runs_directory(tmp_path: Path, ro: Path) -> None:
    plan = str(write_plan(tmp_path / "plan.yaml", SYNTHETIC))
    for runs in (ro, ro / "runs"):  # not writable; cannot be created
        res = _cli(["run", plan, "--runs-dir", str(runs), "--no-progress"], tmp_path)
        _one_line(res, "runs directory", runs, "--runs-dir")
    res = _cli(["aggregator", "--plan", plan, "--run-dir", str(ro / "r")], tmp_path)
    _one_line(res, "run directory", (ro / "r").resolve(), "--run-dir")
    collaborator = ["collaborator", "--plan", plan, "--name", "col1", "--address", "127.0.0.1:9"]
    res = _cli([*collaborator, "--run-dir", str(ro / "c")], tmp_path)
    _one_line(res, "run directory", (ro / "c").resolve(), "--run-dir")


def test_read_only_fit_and_report_outputs(tmp_path: Path, ro: Path) -> None:
    csv = REPO / "examples" / "paper_table2_tdx.csv"
    res = _cli(["fit", str(csv), "--resamples", "20", "--out", str(ro / "fit.json")], tmp_path)
    _one_line(res, "directory of --out", ro, "--out")
    res = _cli(["fit", str(csv), "--resamples", "20", "--plot-dir", str(ro / "p")], tmp_path)
    _one_line(res, "plot directory", ro / "p", "--plot-dir")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "teefl_test_fabricate", REPO / "tests/unit/analysis/test_analysis_fabricate.py"
    )
    assert spec is not None and spec.loader is not None
    fab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fab)
    fab.fabricate_run(tmp_path / "runs", "one")
    res = _cli(["report", str(tmp_path / "runs"), "--out", str(ro)], tmp_path)
    _one_line(res, "report directory", ro, "--out")


def test_read_only_study_output(tmp_path: Path, ro: Path) -> None:
    res = _cli(["bench", "--out", str(ro / "study"), "--no-progress"], tmp_path)
    _one_line(res, "study output directory", ro / "study", "--out")
