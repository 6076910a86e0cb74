"""A user workload that raises: a traceback for the party's log, one line for everyone else.

Why a distinct error: user code fails in ways teefl cannot foresee (a shape bug in round 7, an
out-of-memory, a missing column in one hospital's file). The party that ran it needs the whole
traceback to debug it; the aggregator and ``teefl run`` need one line saying who failed where,
so the round can go on under the quorum rules or the run can stop with that line -- never a
silent hang, never a traceback as a user-facing error.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from teefl.errors import TeeflError
from teefl.wire.failure import SUMMARY_LIMIT  # the longest summary the aggregator accepts
from teefl.workload.api import check_metrics

R = TypeVar("R")


class WorkloadFailure(TeeflError):
    """User code raised (or returned something unusable) in ``phase`` (load, train, evaluate...).

    ``summary`` is one line: ``PARTY: workload REF failed in PHASE (round R): Type: message``;
    ``traceback`` is the formatted traceback for the party's own log (empty when the failure
    is a bad return value rather than an exception). ``str()`` is the summary.
    """

    def __init__(
        self,
        summary: str,
        traceback_text: str = "",
        *,
        phase: str = "",
        party: str = "",
        round: int | None = None,
    ) -> None:
        super().__init__(summary)
        self.summary = summary
        self.traceback = traceback_text
        self.phase, self.party, self.round = phase, party, round


def _one_line(text: str, limit: int = SUMMARY_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(ref: str, phase: str, party: str, round: int | None, problem: str) -> str:
    who = f"{party}: " if party else ""
    when = f" (round {round})" if round is not None else ""
    return _one_line(f"{who}workload {ref} failed in {phase}{when}: {problem}")


def run_user(
    fn: Callable[..., R],
    *args: Any,
    ref: str,
    phase: str,
    party: str = "",
    round: int | None = None,
) -> R:
    """``fn(*args)``; any exception it raises becomes a `WorkloadFailure` carrying the traceback.

    KeyboardInterrupt and SystemExit pass through: stopping the process is not a round failure.
    """
    try:
        return fn(*args)
    except Exception as exc:
        text = "".join(traceback.format_exception(exc))
        msg = " ".join(str(exc).split())
        problem = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        if isinstance(exc, TeeflError) and msg:  # already a sentence for the user
            problem = msg
        raise WorkloadFailure(
            _summary(ref, phase, party, round, problem),
            text,
            phase=phase,
            party=party,
            round=round,
        ) from exc


def run_metrics(
    fn: Callable[..., Any],
    *args: Any,
    ref: str,
    phase: str,
    party: str = "",
    round: int | None = None,
) -> dict[str, float | int]:
    """`run_user` for ``train``/``evaluate``: the result checked by `check_metrics` too, so a
    missing ``samples`` is the same kind of failure as an exception."""
    result = run_user(fn, *args, ref=ref, phase=phase, party=party, round=round)
    try:
        return check_metrics(result, phase)
    except TeeflError as exc:
        raise WorkloadFailure(
            _summary(ref, phase, party, round, str(exc)), phase=phase, party=party, round=round
        ) from None
