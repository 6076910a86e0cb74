"""Output directories proven writable before any work starts.

Why a probe file instead of ``os.access``: only creating a file answers for every reason a write
can fail -- permissions, a read-only mount, an ACL, a full quota, root without
CAP_DAC_OVERRIDE in a container -- and doing it first turns a traceback from deep inside a run,
a report or a fit (after minutes of work) into one line naming the directory and the option
that chose it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from teefl.errors import TeeflError


def writable_dir(path: Path | str, what: str, option: str | None = None) -> Path:
    """Create ``path`` (and its parents) and check that files can be created in it.

    ``what`` names the directory for the user ("runs directory"); ``option`` is the command-line
    option that chooses another one (said in the message). Raises `TeeflError`.
    """
    path = Path(path)
    fix = f"choose another with {option} or " if option else ""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # this directory or a parent that had to be made
        at = f" ({exc.filename})" if exc.filename and Path(exc.filename) != path else ""
        raise TeeflError(
            f"cannot create the {what} {path}: {exc.strerror or exc}{at}; {fix}make it writable"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".teefl-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TeeflError(
            f"cannot write to the {what} {path}: {exc.strerror or exc}; {fix}make it writable"
        ) from None
    return path
