"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's packages.

Everything the cluster writes (configuration, munge key and socket, state, spool, logs, pid files)
lives in one temporary folder, on ports nobody else uses, so two test runs (or a system Slurm)
never meet. `SlurmCluster.stop` cancels every job, waits for them to leave the queue, and stops
the three daemons by their pid files -- also after a failed test -- so nothing is left running.

Why root: slurmd starts every job as the user who submitted it (setuid), and SlurmUser=root keeps
the test cluster free of a service account. Where Slurm cannot be installed or started, the tests
that need it are skipped with the reason (`cluster_or_skip`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
PARTITION = "debug"
#: daemons live in sbin, which a non-login root shell may not have on PATH
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_SEARCH)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def why_not() -> str | None:
    """Why this machine cannot run the test cluster (None: it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the Slurm test cluster needs root (slurmd starts jobs as their users)"
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing); ./scripts/test installs "
            "slurm-wlm and munge with apt when run as root"
        )
    return None


class SlurmCluster:
    """munged + slurmctld + slurmd for this one node, all in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.pids = {
            "munged": root / "munge" / "munged.pid",
            "slurmctld": root / "slurmctld.pid",
            "slurmd": root / "slurmd.pid",
        }

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to talk to this cluster (sbatch & co. read SLURM_CONF)."""
        return {"SLURM_CONF": str(self.conf)}

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        ctld_port, d_port = _free_ports(2)
        cpus = os.cpu_count() or 1
        mem = max(256, int(_mem_mb() * 0.9))
        self.conf.write_text(
            f"""# a one-node Slurm cluster for teefl's tests (tests/slurmutil.py)
ClusterName=teefltest
SlurmctldHost={self.node}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=300
KillWait=5
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={self.pids["slurmctld"]}
SlurmdPidFile={self.pids["slurmd"]}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
NodeName={self.node} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""",
            encoding="utf-8",
        )

    def _start(self, argv: list[str], what: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self._env(), timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} did not start: {(proc.stderr or proc.stdout).strip()}")

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        m = self.root / "munge"
        self._start(
            [
                str(_which("munged")),
                "--force",  # as root: the test's own daemon, with its own key and socket
                f"--socket={self.munge_socket}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={self.pids['munged']}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
            "munged",
        )
        self._start([str(_which("slurmctld")), "-f", str(self.conf)], "slurmctld")
        self._start([str(_which("slurmd")), "-f", str(self.conf)], "slurmd")
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self._env()
            )
            state = proc.stdout.strip() or proc.stderr.strip()
            if proc.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not become idle in {timeout:.0f} s (state: {state})")

    def squeue(self) -> list[str]:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, env=self._env()
        )
        return [ln for ln in proc.stdout.splitlines() if ln.strip()]

    def cancel_all(self, timeout: float = 60.0) -> None:
        """Cancel every job of this cluster and wait until none is left (their processes end)."""
        subprocess.run(
            ["scancel", f"--partition={PARTITION}"],
            capture_output=True,
            env=self._env(),
            timeout=60,
        )
        deadline = time.monotonic() + timeout
        while self.squeue() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _pid(self, name: str) -> int | None:
        try:
            pid = int(self.pids[name].read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if name.encode() in cmd else None  # never a recycled pid of someone else

    def stop(self) -> None:
        """Stop everything this cluster started; safe to call twice and after a failed start."""
        with contextlib.suppress(Exception):
            if self._pid("slurmctld") and self._pid("slurmd"):
                self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while self._pid(name) == pid and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._pid(name) == pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def running(self) -> list[str]:
        """Names of this cluster's daemons still running (empty after `stop`)."""
        return [name for name in self.pids if self._pid(name) is not None]

    def log_tail(self, lines: int = 5) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"{f.name}: " + " | ".join(tail))
        return "; ".join(out)


@contextlib.contextmanager
def cluster_or_skip(root: Path) -> Iterator[SlurmCluster]:
    """A started cluster in ``root`` for the duration of the block; pytest.skip when impossible."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(root)
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"the Slurm test cluster did not start: {exc}; {cluster.log_tail()}")
        yield cluster
    finally:
        cluster.stop()
