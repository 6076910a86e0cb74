"""The environment a process ran in, written to ``<run>/env/<process>.json``.

Why record it per process: the overhead model compares runs from different hosts (a plain VM and a
TDX VM); a number without the CPU, thread count and TEE it came from cannot be trusted or compared.
The TEE label comes only from detection on the host or from the user's explicit statement, which
is recorded as stated.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

import teefl


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tee_record(stated_label: str | None = None) -> dict[str, Any]:
    """The TEE detection record (see `teefl.security.tee.detect`)."""
    from teefl.security.tee.detect import detect_tee

    return detect_tee(stated_label=stated_label).to_dict()


def environment(role: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fingerprint of this process's host and runtime."""
    import torch

    env: dict[str, Any] = {
        "role": role,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "teefl": teefl.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if extra:
        env.update(extra)
    return env


def write_environment(run_dir: Path, process: str, env: dict[str, Any]) -> Path:
    from teefl.rundir import RunDir
    from teefl.runfiles import private_dir, write_private

    rd = RunDir(run_dir)
    private_dir(rd.env_dir)
    out = rd.env(process)
    write_private(out, json.dumps(env, indent=2, default=str) + "\n")
    return out


def tune_malloc() -> bool:
    """Make glibc give large freed buffers back to the OS (aggregator memory stays flat).

    glibc raises its mmap threshold after the first large free, after which 1 MiB chunks and
    model-sized buffers come from arenas that fragment and never shrink; with ~100 gRPC threads
    it also opens one arena per thread. Fixing the threshold at 128 KiB and capping arenas at 2
    cut the aggregator's peak RSS growth from 4 to 32 collaborators by a third here
    (benchmarks/scale.py). Returns False where glibc's mallopt is not available.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold, m_arena_max = -3, -8
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(
            libc.mallopt(m_arena_max, 2)
        )
    except (OSError, AttributeError):
        return False
