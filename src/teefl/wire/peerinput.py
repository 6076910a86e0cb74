"""What a peer sent, made safe to parse, to log and to record before anything is known about it.

Why one place: a data-plane HELLO, a gRPC request's collaborator name and an ERROR frame come
from a party that may be hostile and, before authentication, from anyone who can reach the port:
unbounded parsing ends in a traceback, verbatim logging lets a peer forge log lines. Here:

- `shown` turns anything a peer sent into one printable line of bounded length (a truncated
  ``repr``: newlines, escapes and control characters appear escaped, never raw);
- `load_json_object` refuses a body over its size limit before parsing it and a nesting deeper
  than its bound before the parser recurses, and turns every parser failure into `Malformed`;
- `RefusalLog` logs and records refusals at a bounded rate, so a peer that is refused a million
  times cannot fill the disk with log lines or events.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from teefl.plan import NAME_RE

#: the longest rendering of a peer-supplied value in a log line or an event
SHOWN = 80


class Malformed(ValueError):
    """A peer's message that cannot be parsed or breaks a bound; the text names the fault."""


def shown(value: object, limit: int = SHOWN) -> str:
    """A peer-supplied value for a log line or an event: its ``repr``, cut to ``limit``
    characters (a ``...`` marks the cut). Only a prefix is rendered, so a 1 MB value costs
    nothing."""
    if isinstance(value, str | bytes | bytearray):
        value = value[: limit + 1]
    elif isinstance(value, memoryview):
        value = bytes(value[: limit + 1])
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def valid_name(name: object) -> bool:
    """A collaborator name as the plan allows it (`teefl.plan.NAME_RE`): safe to log as is."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def name_for_log(name: object) -> str:
    """The name as is when it is a valid collaborator name, else its truncated repr."""
    return name if valid_name(name) else shown(name)  # type: ignore[return-value]


def _depth_within(body: bytes, bound: int) -> bool:
    """Whether no array or object in the JSON text ``body`` nests deeper than ``bound``
    (strings skipped). Linear and without recursion; meant for small bodies (a HELLO)."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > bound:
                return False
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return True


def load_json_object(body: bytes, what: str, limit: int, max_depth: int = 2) -> dict[str, Any]:
    """Parse a peer's small JSON object (a HELLO, an ERROR frame), or raise `Malformed`.

    Bounded before the parser runs: ``limit`` bytes, ``max_depth`` levels of nesting (a flat
    object is depth 1). The parser's own recursion limit stays a second line of defence.
    """
    if len(body) > limit:
        raise Malformed(f"{what} of {len(body)} bytes exceeds the limit of {limit}")
    if not _depth_within(body, max_depth):
        raise Malformed(f"malformed {what}: nested deeper than {max_depth} levels")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Malformed(f"malformed {what}: not JSON") from None
    if not isinstance(obj, dict):
        raise Malformed(f"malformed {what}: not a JSON object")
    return obj


class RefusalLog:
    """Logs and records (event ``refused``) what is refused to peers, at a bounded rate.

    At most ``burst`` refusals per ``window`` seconds are written one by one; beyond that they
    are counted, and the count is written as one line and one event (``refused_suppressed``)
    once the window is over. Every value that came from the peer must already be `shown`.
    """

    def __init__(
        self, log: logging.Logger, rec: Any = None, burst: int = 50, window: float = 10.0
    ) -> None:
        self.log, self.rec, self.burst, self.window = log, rec, burst, window
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._written = self._suppressed = 0

    def refused(self, what: str, peer: str, reason: str, **fields: Any) -> None:
        """One refusal: ``what`` names the refused thing ("data connection", "Join", ...)."""
        with self._lock:
            ended = self._roll(time.monotonic())
            write = self._written < self.burst
            if write:
                self._written += 1
            else:
                self._suppressed += 1
        if ended:
            self._report_suppressed(ended)
        if write:
            who = fields.get("collaborator")
            self.log.warning(
                "refused %s%s from %s: %s", what, f" {who}" if who else "", peer, reason
            )
            if self.rec is not None:
                self.rec.info("refused", peer=peer, reason=reason, refused=what, **fields)

    def flush(self) -> None:
        """Write the count of refusals suppressed so far (the window's end, or shutdown)."""
        with self._lock:
            count, self._suppressed = self._suppressed, 0
        if count:
            self._report_suppressed(count)

    def _roll(self, now: float) -> int:
        """Start a new window when the current one is over; returns the count to report."""
        if now - self._start < self.window:
            return 0
        count = self._suppressed
        self._start, self._written, self._suppressed = now, 0, 0
        return count

    def _report_suppressed(self, count: int) -> None:
        self.log.warning(
            "%d further refusal(s) not logged one by one (more than %d in %g s)",
            count,
            self.burst,
            self.window,
        )
        if self.rec is not None:
            self.rec.info("refused_suppressed", count=count, window_s=self.window)
