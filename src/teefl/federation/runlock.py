"""One process at a time per run directory, kept for existing importers: the lock lives in
`teefl.rundir` (`RunDir.acquire`, `RunDir.hold`), which says why and how."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from teefl.rundir import AGGREGATOR_LOCK, RUN_LOCK, acquire, release

__all__ = ["AGGREGATOR_LOCK", "RUN_LOCK", "acquire", "hold", "release"]


@contextlib.contextmanager
def hold(run_dir: Path, name: str, who: str) -> Iterator[Path | None]:
    """`acquire` for the duration of a ``with`` block."""
    path = acquire(run_dir, name, who)
    try:
        yield path
    finally:
        release(path)
