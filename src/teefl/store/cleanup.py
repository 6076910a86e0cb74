"""What a dead aggregator left in its run directory, cleared by the next one on start-up.

Temporary files, round directories whose checkpoint is durable, and ``metrics.jsonl`` lines of
rounds it will close again: after this, a restart counts nothing twice.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from teefl.store.atomic import TEMP_NAME, write_atomic
from teefl.store.updates import UpdateStore, listdir


def clean_up(updates: UpdateStore, model_dir: Path, completed: int, final: bool = False) -> None:
    """On start-up, before anything is written: remove what a dead aggregator left.

    - temporary files (`write_atomic`, `UpdateFile`): every one in ``model/`` and
      ``updates/`` (only the aggregator writes there), and those of dead processes at the
      top of the run directory (where the launcher writes run.json too);
    - the updates of rounds up to ``completed``, whose checkpoint is durable (a crash
      between the checkpoint and `drop_updates`), and after the final round
      (``final``) the spare files, which no round will reuse;
    - ``metrics.jsonl`` lines of rounds after ``completed``: those rounds are closed again
      (from their stored updates) and write their line again, once.
    """
    for directory in (model_dir, *updates.update_dirs()):
        for entry in listdir(directory):
            if TEMP_NAME.match(entry):
                _unlink(directory / entry)
    run_dir = updates.rd.path
    for entry in listdir(run_dir):
        m = TEMP_NAME.match(entry)
        if m and _pid_gone(int(m.group(1))):
            _unlink(run_dir / entry)
    if not updates.keep:
        for rnd in updates.stored_rounds():
            if rnd <= completed:
                updates.drop_updates(rnd, last=final)
        if final:
            updates.drop_updates(completed, last=True)
    truncate_metrics(updates.rd.metrics, completed)


def truncate_metrics(path: Path, completed: int) -> None:
    """Keep one ``metrics.jsonl`` line per round up to ``completed`` (the first of each; a
    torn line goes too): the lines a restart will write again are removed, atomically."""
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        return
    kept, seen = [], set()
    for line in old.splitlines():
        try:
            rnd = json.loads(line).get("round")
        except (ValueError, AttributeError):
            continue
        if type(rnd) is int and rnd <= completed and rnd not in seen:
            seen.add(rnd)
            kept.append(line + b"\n")
    new = b"".join(kept)
    if new != old:
        write_atomic(path, new)


def _pid_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive (another user's), or we cannot tell: leave its files alone
        return False
    return False


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        path.unlink()
