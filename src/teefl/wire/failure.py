"""The failure report (``Header.failure``): a party's own code raised in a round.

Why a report at all: without one, a collaborator whose workload raised just dies, and the
aggregator learns nothing until the round's timeout (an hour by default) -- then names it only
as "missing". With it, the aggregator counts the party out of the round at once and the round
goes on under the quorum rules (`teefl.server.rounds`), or the run stops with the party's line.

Both sides share this module: the collaborator builds the report with `failure_header`, the
aggregator checks it with `checked_failure` before it records anything. The report is a header
like an update's (the same session and identity checks, the same RPC) but carries no payload,
no samples and no metrics, so it can never touch the model. Its text comes from the other
party: on the aggregator it is untrusted input, refused unless it is one printable line within
`SUMMARY_LIMIT`, and it never says who failed -- the aggregator names the authenticated party.
"""

from __future__ import annotations

import re

from google.protobuf.unknown_fields import UnknownFieldSet

from teefl.wire import teefl_pb2
from teefl.wire.checks import UpdateRejected

#: longest failure summary on the wire (characters): one line, enough for the exception's
#: type and message; the traceback stays in the party's own log
SUMMARY_LIMIT = 400
#: a phase is a workload method's name (train, evaluate, ...): short, lower case
PHASE_RE = re.compile(r"[a-z][a-z_]{0,31}")


def printable_line(text: str, limit: int = SUMMARY_LIMIT) -> str:
    """``text`` as one printable line of at most ``limit`` characters: whitespace runs become
    one space, other unprintable characters (escape sequences, NUL, ...) their ``\\x..`` form,
    and an overlong line is cut with ``...``."""
    text = " ".join(text.split())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_header(
    name: str, round: int, phase: str, summary: str, evaluate_only: bool = False
) -> teefl_pb2.Header:
    """The report of ``name``'s failed ``round``: ``phase`` (a workload method; anything else
    is sent as "workload") and ``summary``, made one printable line within the limit. The
    summary should not start with the party's name: the aggregator puts it in front."""
    return teefl_pb2.Header(
        collaborator=name,
        round=round,
        evaluate_only=evaluate_only,
        failure=teefl_pb2.RoundFailure(
            phase=phase if PHASE_RE.fullmatch(phase) else "workload",
            summary=printable_line(summary) or "(no message)",
        ),
    )


def is_failure(h: teefl_pb2.Header) -> bool:
    return h.HasField("failure")


def checked_failure(h: teefl_pb2.Header) -> tuple[str, str]:
    """(phase, summary) of a failure report, or `UpdateRejected` naming what breaks the form:
    anything of an update (payload size, digests, samples, metrics, format, encoding), a
    phase that is not a short lower-case name, a summary that is empty, longer than
    `SUMMARY_LIMIT` or not one printable line. The caller checks the round and the session."""
    if (
        h.total_size
        or h.raw_size
        or h.sha256
        or h.HasField("crc32c")
        or h.num_samples
        or h.metrics
        or h.format
        or h.encoding
    ):
        raise UpdateRejected("a failure report carries no payload, samples or metrics")
    f = h.failure
    if len(UnknownFieldSet(f)) > 0:
        raise UpdateRejected("failure report carries unknown fields")
    if not PHASE_RE.fullmatch(f.phase):
        raise UpdateRejected("failure report: phase must be a short lower-case name")
    if not f.summary:
        raise UpdateRejected("failure report: empty summary")
    if len(f.summary) > SUMMARY_LIMIT:
        raise UpdateRejected(
            f"failure report: summary of {len(f.summary)} characters exceeds {SUMMARY_LIMIT}"
        )
    if not f.summary.isprintable():
        raise UpdateRejected("failure report: summary is not one printable line")
    return f.phase, f.summary
