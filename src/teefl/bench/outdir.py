"""A study's output directory (OUT): one study per OUT, one runner at a time.

A rerun must match the study stored in OUT (``OUT/study.yaml``), or say ``--force``; the lock
(``OUT/.bench.lock``) keeps a second ``teefl bench`` from running the same cells into the same
directories. The layout of OUT is `teefl.bench.runner`'s docstring.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

from teefl.bench.study import Study, differing_keys
from teefl.errors import TeeflError


def check_study_copy(study: Study, out: Path, *, force: bool) -> list[str]:
    """Refuse to mix two different studies in one OUT (unless ``force``), then store the study.

    Why refuse: the cells already there were run with the old settings; silently adding cells of
    a different base plan would put both into one table. ``--force`` is for deliberate changes
    (adding a dataset to the axes); the report still splits runs whose plans differ. Returns
    the keys that changed (empty for the same study or a new OUT).
    """
    path = out / "study.yaml"
    new = study.normalized()
    keys: list[str] = []
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TeeflError(f"cannot read {path}: {exc}") from None
        keys = differing_keys(old, new)
        if keys and not force:
            shown = ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")
            raise TeeflError(
                f"{out} holds results of a different study (differs in: {shown}); use another "
                "--out, or --force to continue it with the new study (finished cells with the "
                "same name are kept)"
            )
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".study.yaml.tmp")
    tmp.write_text(
        "# written by teefl bench: the study these results belong to\n"
        + yaml.safe_dump(new, sort_keys=False),
        encoding="utf-8",
    )
    os.replace(tmp, path)
    return keys


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """One runner per OUT: two would run the same cells into the same directories."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / ".bench.lock"
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole study
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise TeeflError(
                f"another teefl bench (pid {holder}) is running on {out}; wait for it or use "
                "another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()
