"""Helpers for tests that run real federations (separate processes on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

FASHION = Path("/usr/share/datasets/fashion-mnist")

#: a quick, learnable synthetic workload: a federation of it takes seconds
SYNTHETIC = {
    "dataset": {
        "name": "synthetic",
        "synthetic": {"shape": [1, 12, 12], "classes": 4, "train_size": 600, "test_size": 200},
    },
    "model": {"name": "small_cnn"},
    "training": {"batch_size": 32, "lr": 0.003, "threads": 1},
    "federation": {"rounds": 2},
    "collaborators": 3,
    "security": {"transport": "none"},
}


def write_plan(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def with_transport(plan: Path, data: dict[str, Any], transport: str, pki_dir: Path):
    """Rewrite ``plan`` (written from ``data``) for ``transport``: with tls/mtls, certificates
    issued by teefl's PKI for its parties into ``pki_dir``. Returns them (None for none)."""
    if transport == "none":
        return None
    from teefl.plan import load_plan
    from teefl.security import plan_pki

    issued = plan_pki.issue_for_plan(load_plan(plan), pki_dir)
    data["security"] = {
        "transport": transport,
        "tls": {
            "ca": str(issued.ca),
            "server_cert": str(issued.server_cert),
            "server_key": str(issued.server_key),
            "client_dir": str(issued.client_dir),
        },
    }
    write_plan(plan, data)
    return issued


def teefl(*args: str, cwd: Path, timeout: float = 240, env: dict[str, str] | None = None):
    """Run the teefl CLI as a user would; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "teefl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "160", **(env or {})},
    )


def run_plan(d: Path, data: dict[str, Any], transport: str):
    """``teefl run`` of the plan ``data`` in a new folder ``d`` under ``transport``; it must
    succeed. Returns (its run directory, the CompletedProcess)."""
    d.mkdir(parents=True, exist_ok=True)
    plan = write_plan(d / "plan.yaml", data)
    res = teefl(
        "run", str(plan), "--transport", transport, "--runs-dir", "runs", "--no-progress", cwd=d
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return run_dir_of(d / "runs"), res


def run_dir_of(runs: Path) -> Path:
    dirs = [d for d in runs.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_accuracy(run_dir: Path) -> float:
    final = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["round"] == "final"]
    assert final, "no final evaluation in metrics.jsonl"
    return final[-1]["weighted"]["final.accuracy"]


def phases(run_dir: Path) -> set[str]:
    out: set[str] = set()
    for f in (run_dir / "events").glob("*.jsonl"):
        out |= {e["phase"] for e in read_jsonl(f) if e["type"] == "span"}
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Parties:
    """Aggregator and collaborators started one by one (for crash and hostile-peer tests)."""

    def __init__(self, plan: Path, run_dir: Path, log: Path) -> None:
        self.plan, self.run_dir, self.log = plan, run_dir, log
        self.procs: dict[str, subprocess.Popen] = {}
        self._fh = open(log, "a")  # noqa: SIM115 - closed in stop()

    def _start(self, key: str, argv: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-m", "teefl", *argv],
            stdout=self._fh,
            stderr=self._fh,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.procs[key] = p
        return p

    def aggregator(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self._start(
            "aggregator",
            [
                "aggregator",
                "--plan",
                str(self.plan),
                "--run-dir",
                str(self.run_dir),
                "--run-id",
                "rel",
            ],
            env,
        )

    def collaborator(
        self, name: str, env: dict[str, str] | None = None, plan: Path | None = None
    ) -> subprocess.Popen:
        """``plan``: this party's own copy of the plan (host-local fields may differ)."""
        return self._start(
            name,
            [
                "collaborator",
                "--plan",
                str(plan or self.plan),
                "--name",
                name,
                "--run-dir",
                str(self.run_dir),
            ],
            env,
        )

    def wait_running(self, timeout: float = 60) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if json.loads((self.run_dir / "run.json").read_text()).get("status") == "running":
                    return
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        raise AssertionError("aggregator did not start:\n" + self.log.read_text()[-3000:])

    def wait_event(self, pred, timeout: float = 120) -> dict[str, Any]:
        import time

        deadline = time.monotonic() + timeout
        path = self.run_dir / "events" / "aggregator.jsonl"
        while time.monotonic() < deadline:
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        ev = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if pred(ev):
                        return ev
            time.sleep(0.02)
        raise AssertionError("event not seen:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self._fh.close()


def replay_matches_checkpoints(run_dir: Path, rounds: int) -> None:
    """Every round's checkpoint equals the FedAvg of that round's accepted updates alone."""
    import torch

    from teefl.store.rounds import RoundStore
    from teefl.strategy.running import RunningFedAvg
    from teefl.wire import codec

    store = RoundStore(run_dir, keep=True)
    for r in range(1, rounds + 1):
        saved = store.load_updates(r)
        assert saved, f"no kept updates for round {r}"
        ckpt = codec.decode_state((run_dir / "model" / f"round-{r:04d}.safetensors").read_bytes())
        agg = RunningFedAvg(ckpt)
        for u in saved:
            agg.add(codec.decode_state(u.payload), int(u.meta["samples"]))
        replay = agg.result()
        for k, t in ckpt.items():
            assert torch.equal(replay[k], t), f"round {r}: {k} differs from the replay"


def workload_digest_of(plan) -> str:
    """The digest of ``plan``'s workload code, as a collaborator running it sends at Join."""
    from teefl.workload.digest import workload_digest

    return workload_digest(plan.workload.name, plan.workload.base)


def join_request(plan, name: str):
    """A JoinRequest as a collaborator with ``plan`` sends it (its plan fingerprint and its
    workload digest included)."""
    from teefl.security import attest
    from teefl.wire import teefl_pb2

    return teefl_pb2.JoinRequest(
        collaborator=name,
        plan_sections=attest.config_sections(plan),
        workload_digest=workload_digest_of(plan),
    )


def session_metadata(reply) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a Join reply's session token."""
    return (("teefl-session", bytes(reply.session_token).hex()),)


class FakeContext:
    """A gRPC servicer context for calling handlers directly: records callbacks and initial
    metadata; `ended` mimics an RPC already over; `abort` raises; ``md``: the call's metadata
    (e.g. `session_metadata`)."""

    def __init__(self, ended: bool = False, md: tuple = ()) -> None:
        self.ended, self.callbacks, self.metadata = ended, [], []
        self.cancelled = False
        self.md = tuple(md)

    def invocation_metadata(self) -> tuple:
        return self.md

    def add_callback(self, fn) -> bool:
        if self.ended:
            return False
        self.callbacks.append(fn)
        return True

    def send_initial_metadata(self, md) -> None:
        self.metadata.append(tuple(md))

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def auth_context(self) -> dict:
        return {}

    def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")

    def cancel(self) -> None:
        self.cancelled = True


# -- chaos: a federation whose parties are killed and restarted ----------------------------------
CHAOS_ROUNDS = 3
CHAOS_NAMES = ("col1", "col2", "col3")
SHM = Path("/dev/shm")


def chaos_plan(
    tmp: Path, transport: str, staging: Path, federation: dict[str, Any] | None = None
) -> Path:
    """The chaos tests' plan: `SYNTHETIC`, `CHAOS_ROUNDS` rounds, ``federation`` keys added."""
    data: dict[str, Any] = {
        **SYNTHETIC,
        "network": {"host": "127.0.0.1", "port": free_port(), "chunk_size": 16384},
        "federation": {
            "rounds": CHAOS_ROUNDS,
            "round_timeout": 300,
            "staging_dir": str(staging),
            **(federation or {}),
        },
    }
    plan = write_plan(tmp / "plan.yaml", data)
    with_transport(plan, data, transport, tmp / "pki")
    return plan


class ChaosFederation:
    """One federation of `teefl aggregator` and three `teefl collaborator` processes, started
    through the CLI, whose parties a test kills (SIGKILL) and restarts at will."""

    def __init__(self, tmp: Path, transport: str, federation: dict[str, Any] | None = None) -> None:
        self.staging = SHM / f"teefl-chaos-{uuid.uuid4().hex[:12]}"
        self.plan = chaos_plan(tmp, transport, self.staging, federation)
        self.run = tmp / "run"
        self.parties = Parties(self.plan, self.run, tmp / "procs.log")
        self.aggregator_pids: list[int] = []

    # -- processes --------------------------------------------------------------------------
    def start_aggregator(self, fault: str | None = None) -> None:
        env = {"TEEFL_FAULT_INJECT": fault} if fault else None
        self.aggregator_pids.append(self.parties.aggregator(env=env).pid)

    def start(self) -> None:
        self.start_aggregator()
        for name in CHAOS_NAMES:
            self.parties.collaborator(name)

    def kill(self, key: str) -> None:
        p = self.parties.procs[key]
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL, f"{key} had already ended"

    def finish(self) -> None:
        for key in ("aggregator", *CHAOS_NAMES):
            p = self.parties.procs[key]
            try:
                rc = p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGUSR1)  # every thread's stack into the log (`teefl.cli`)
                time.sleep(2)
                raise AssertionError(
                    f"{key} still running after 300 s:\n{self.log()[-12000:]}"
                ) from None
            assert rc == 0, f"{key} exited {rc}:\n" + self.log()[-5000:]

    def stop(self) -> None:
        self.parties.stop()
        shutil.rmtree(self.staging, ignore_errors=True)

    def log(self) -> str:
        return self.parties.log.read_text(errors="replace")

    # -- the live events --------------------------------------------------------------------
    def events(self, process: str = "aggregator") -> list[dict[str, Any]]:
        path = self.run / "events" / f"{process}.jsonl"
        from teefl.measure.events import read_events

        return read_events(path) if path.exists() else []

    def accepted(self, rnd: int, since: int = 0) -> set[str]:
        """Collaborators whose update of ``rnd`` the aggregator counted (acknowledged, or
        replayed from the run directory at a restart) in its events from index ``since``."""
        return {
            e["collaborator"]
            for e in self.events()[since:]
            if e.get("what") in ("update_accepted", "update_replayed") and e.get("round") == rnd
        }

    def wait(self, what: str, cond, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen within {timeout} s: {what}\n" + self.log()[-4000:])
            agg = self.parties.procs["aggregator"]
            if agg.poll() is not None:
                raise AssertionError(f"aggregator exited {agg.returncode} before {what}")
            time.sleep(0.02)

    def completed_rounds(self) -> int:
        """The round a restart resumes after: the resume pointer's, written once the round's
        checkpoint is durable -- not run.json's ``rounds_completed``, which follows it, so a
        kill between the two leaves run.json one round behind what a restart resumes from."""
        from teefl.rundir import RunDir

        try:
            state = json.loads(RunDir(self.run).state.read_text())
        except (OSError, json.JSONDecodeError):
            return 0
        return int(state.get("completed_round", 0))


def model_files(d: Path) -> dict[str, bytes]:
    """Every ``*.safetensors`` file of ``d`` by name (checkpoints, final model, strategy
    states), for a bit-for-bit comparison of two runs."""
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}
