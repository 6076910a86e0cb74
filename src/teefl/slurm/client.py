"""Slurm through its own commands: sbatch, squeue, scontrol, scancel.

Why the commands (not slurmrestd or pyslurm): they are what every login node has, in the version
that matches its controller, and they speak for the user with the user's own credentials.

Why squeue and scontrol, not sacct: sacct needs slurmdbd (and a database), which small clusters and
our test cluster do not run. A job is followed with squeue while it is queued or running; once it
has left the queue, ``scontrol show job`` still knows its final state for MinJobAge (300 s by
default), and the batch scripts teefl writes leave an exit-status file that outlives both.

Every failure becomes one `TeeflError` line that names the command and what Slurm said.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from teefl.errors import TeeflError

#: seconds one Slurm command may take (a busy controller answers within a few)
COMMAND_TIMEOUT = 60.0

#: job states after which nothing more happens to a job (squeue / scontrol spelling)
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)


class SlurmUnavailable(TeeflError):
    """The controller did not answer (a passing state: callers that follow jobs retry)."""


def require(*tools: str) -> None:
    """Fail with one line when a Slurm command is not on PATH."""
    missing = [t for t in tools or ("sbatch", "squeue", "scontrol") if shutil.which(t) is None]
    if missing:
        raise TeeflError(
            f"Slurm's {', '.join(missing)} not found on PATH: run this on a login node of a "
            "Slurm cluster (on some clusters after `module load slurm`)"
        )


def _message(proc: subprocess.CompletedProcess) -> str:
    """Slurm's own words: the most telling line of its stderr, without the command's prefix."""
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    if not lines:
        return f"exit code {proc.returncode}"
    failed = [ln for ln in lines if "submission failed" in ln.lower()]
    line = (failed or lines)[-1]
    line = re.sub(r"^(sbatch|squeue|scontrol|scancel|srun|slurm_load_jobs)(: error)?:\s*", "", line)
    return re.sub(r"^error:\s*", "", line)


def run(
    argv: Sequence[str], what: str, *, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run a Slurm command; a missing command or a hang becomes a `TeeflError`."""
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        require(argv[0])
        raise
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(
            f"{what}: `{argv[0]}` did not answer within {timeout:.0f} s (is slurmctld up?)"
        ) from None


def _unreachable(msg: str) -> bool:
    low = msg.lower()
    return any(
        s in low
        for s in (
            "unable to contact slurm controller",
            "connection refused",
            "socket timed out",
            "connection timed out",
            "communication connection failure",
        )
    )


# -- partitions and nodes -----------------------------------------------------------------------


def partitions() -> list[str]:
    proc = run(["sinfo", "-h", "-o", "%R"], "listing partitions")
    return sorted({ln.strip() for ln in proc.stdout.splitlines() if ln.strip()})


def check_partitions(names: Iterable[str | None]) -> None:
    """Every named partition (``a,b`` names two) exists; else one line naming those that do."""
    for name in dict.fromkeys(n for n in names if n):
        for part in name.split(","):
            proc = run(["scontrol", "show", "partition", part], "checking the partition")
            if proc.returncode == 0:
                continue
            msg = _message(proc)
            if _unreachable(msg):
                raise SlurmUnavailable(f"cannot check partition {part!r}: {msg}")
            try:
                known = ", ".join(partitions()) or "none"
            except TeeflError:
                known = "?"
            raise TeeflError(
                f"Slurm partition {part!r} does not exist on this cluster (partitions: {known}); "
                "pass one of them with --partition"
            )


def hostnames(nodelist: str) -> list[str]:
    """``node[01-03],gpu7`` -> [node01, node02, node03, gpu7] (scontrol's expansion)."""
    proc = run(["scontrol", "show", "hostnames", nodelist], "expanding the node list")
    if proc.returncode != 0:
        raise TeeflError(f"cannot expand the node list {nodelist!r}: {_message(proc)}")
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]


def node_exists(name: str) -> bool:
    """True when ``name`` is a node of this cluster."""
    proc = run(["scontrol", "-o", "show", "node", name], "looking up a node")
    return proc.returncode == 0 and f"NodeName={name} " in proc.stdout + " "


def tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) -> [2, 2, 2, 1], one entry per node in order."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise TeeflError(f"cannot read SLURM_TASKS_PER_NODE={spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


# -- jobs ---------------------------------------------------------------------------------------


def submit(script: Path, extra: Sequence[str] = (), *, cwd: Path | None = None) -> str:
    """``sbatch --parsable [extra] script`` -> the job id; a refusal is one line with the reason."""
    proc = run(["sbatch", "--parsable", *extra, str(script)], "submitting the job")
    if proc.returncode != 0:
        msg = _message(proc)
        cls = SlurmUnavailable if _unreachable(msg) else TeeflError
        raise cls(f"sbatch refused the job: {msg} (script: {script})")
    job = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else ""
    if not job.isdigit():
        raise TeeflError(f"sbatch gave no job id for {script} (it printed {proc.stdout!r})")
    return job


@dataclass(frozen=True)
class QueueEntry:
    """One line of squeue: a job, or one task of an array (``12_3``)."""

    key: str
    state: str
    reason: str
    nodes: str


def queue(job_ids: Iterable[str]) -> dict[str, QueueEntry]:
    """What squeue says about these jobs (arrays expanded to their tasks); gone jobs are absent.

    Raises `SlurmUnavailable` when the controller does not answer: a caller following jobs
    retries rather than taking silence for "finished".
    """
    ids = sorted(set(job_ids), key=lambda s: (len(s), s))
    if not ids:
        return {}
    proc = run(
        ["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r|%N"], "reading the queue"
    )
    if proc.returncode != 0:
        msg = _message(proc)
        if "invalid job id" in msg.lower():
            return {}  # every one of them has left the queue
        raise SlurmUnavailable(f"squeue failed: {msg}")
    out: dict[str, QueueEntry] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            key, state, reason, nodes = parts
            out[key] = QueueEntry(key, state, reason, nodes)
    return out


def job_info(key: str) -> dict[str, str] | None:
    """``scontrol show job KEY`` as a mapping; None when the controller no longer knows it."""
    proc = run(["scontrol", "-o", "show", "job", key], "looking up the job")
    if proc.returncode != 0:
        msg = _message(proc)
        if _unreachable(msg):
            raise SlurmUnavailable(f"scontrol failed: {msg}")
        return None
    first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    info: dict[str, str] = {}
    for token in first.split(" "):
        k, sep, v = token.partition("=")
        if sep:
            info[k] = v
    return info or None


def cancel(keys: Iterable[str]) -> None:
    """scancel; jobs that are already gone are not an error."""
    keys = list(keys)
    if keys:
        run(["scancel", *keys], "cancelling jobs")


def slurm_env() -> dict[str, str]:
    """The Slurm variables of the current allocation (empty outside a job)."""
    return {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
