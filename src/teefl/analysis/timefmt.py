"""Durations as people write them: seconds, ``HH:MM`` (the paper's tables) or ``HH:MM:SS``.

Why a module of its own: the paper publishes wall-clock times rounded to minutes (``01:05`` is one
hour and five minutes, not one minute five seconds), while our runs measure seconds. Every place
that accepts a time from a user (CSV input to ``teefl fit``, ``teefl predict --baseline``) must
read both the same way and reject anything ambiguous with one clear line, so a typo such as
``1:75`` never silently becomes a number in a regression.
"""

from __future__ import annotations

import math
import re

from teefl.errors import TeeflError

_SECONDS_RE = re.compile(r"^\d+(?:\.\d*)?(?:[eE][+]?\d+)?\s*s?$|^\.\d+\s*s?$")
_CLOCK_RE = re.compile(r"^(\d+):(\d{1,2})(?::(\d{1,2}(?:\.\d*)?))?$")


def parse_duration(value: str | float | int, *, what: str = "time") -> float:
    """Return seconds for ``value``: a number of seconds, ``HH:MM`` or ``HH:MM:SS[.fff]``.

    ``HH:MM`` means hours and minutes, as in the paper's Table II (``01:05`` = 3900 s). Minutes
    and seconds must be below 60; negative, empty, NaN and infinite values are rejected with a
    `TeeflError` naming ``what`` so the user knows which field to fix.
    """
    if isinstance(value, bool):
        raise TeeflError(f"invalid {what} {value!r}: expected seconds, HH:MM or HH:MM:SS")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise TeeflError(f"invalid {what} {value!r}: must be a finite number of seconds >= 0")
        return seconds
    if not isinstance(value, str):
        raise TeeflError(f"invalid {what} {value!r}: expected seconds, HH:MM or HH:MM:SS")
    text = value.strip()
    if _SECONDS_RE.match(text):
        return float(text.rstrip("s").strip())
    m = _CLOCK_RE.match(text)
    if m is None:
        raise TeeflError(
            f"invalid {what} {value!r}: expected seconds (e.g. 3900), HH:MM (e.g. 01:05) "
            "or HH:MM:SS (e.g. 01:05:00)"
        )
    hours, minutes, secs = int(m.group(1)), int(m.group(2)), m.group(3)
    if minutes >= 60:
        raise TeeflError(f"invalid {what} {value!r}: minutes must be 00-59")
    seconds = float(secs) if secs is not None else 0.0
    if seconds >= 60:
        raise TeeflError(f"invalid {what} {value!r}: seconds must be below 60")
    return hours * 3600.0 + minutes * 60.0 + seconds


def format_hms(seconds: float | None) -> str:
    """``HH:MM:SS`` rounded to the second (hours may exceed 99); ``-`` for a missing value.

    Why round rather than truncate: a table of means must not be biased downwards by half a
    second on average.
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    total = round(seconds)
    sign = "-" if total < 0 else ""
    total = abs(total)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{sign}{h:02d}:{m:02d}:{s:02d}"


def format_hm(seconds: float | None) -> str:
    """``HH:MM`` rounded to the minute, the resolution of the paper's Table II."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    total = round(seconds / 60.0)
    sign = "-" if total < 0 else ""
    h, m = divmod(abs(total), 60)
    return f"{sign}{h:02d}:{m:02d}"


def format_both(seconds: float | None) -> str:
    """``HH:MM:SS (N s)``: the paper's format plus seconds, with decimals for short runs.

    Why both: HH:MM:SS alone hides the differences between short test runs (12 s vs 13 s look
    alike as 00:00:12/00:00:13 and a 0.4 s effect vanishes), seconds alone are hard to read for
    runs of hours.
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    secs = f"{seconds:.0f}" if abs(seconds) >= 100 else f"{seconds:.2f}"
    return f"{format_hms(seconds)} ({secs} s)"
