"""Private key files must be the owner's alone: the check every loader of one makes.

Why refuse rather than warn: a TLS key, the sealing key or a simulated attestation key that group
or others can read is as good as published to every local account (and to a backup job running
as another user); a warning scrolls past while the run goes on with a key that may already be
copied. OpenSSH refuses such files for the same reason. The check runs on the file the key was
read from (symlinks followed: the mode that matters is the target's).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from teefl.errors import TeeflError


def check_private_file(path: Path | str, what: str = "private key") -> None:
    """Raise `TeeflError` (with the chmod to run) if group or others may access ``path``."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise TeeflError(f"cannot check {what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise TeeflError(
            f"{what} {path} is accessible by group or others (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )
