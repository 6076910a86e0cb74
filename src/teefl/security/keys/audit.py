"""The key service's audit log: one JSON object a line for every challenge, release and refusal.

Why a file of its own (beside the service's log output): it is the owner's record of who got
which secret, when, on what evidence -- kept as data (the verdict, the TEE key and client
certificate fingerprints, the configuration binding) so it can be searched and compared later.
It never holds a secret: only the sealing key's id (`teefl.security.sealed.key_id`, an HMAC
output that identifies the key without revealing it), as sealed files carry it in the clear.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

from teefl.errors import TeeflError


class AuditLog:
    """Appends records to ``path`` (created 0600; an existing file is narrowed to 0600), each
    written and fsynced before the caller answers the requester."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TeeflError(f"cannot open the audit log {self.path}: {exc.strerror}") from None
        os.fchmod(fd, 0o600)
        self._fd = fd
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": dt.datetime.now(dt.UTC).isoformat(), "event": event, **fields}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self._lock:
            os.write(self._fd, line.encode("utf-8"))
            os.fsync(self._fd)
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit log, oldest first."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


__all__ = ["AuditLog", "read_audit"]
