"""The collaborator's transport seam: one method, ``handle(request) -> response``.

Why a seam: the collaborator's loop and session say *what* they need from the aggregator (a
challenge, a join, the round's model, an update sent) with the small requests below, never
*how* it moves; the gRPC control plane with either data plane (`grpc_client.GrpcClient`) is one
implementation, `mock.MockTransport` (a function from request to response, as httpx's) another,
for unit tests without sockets, and `memory.MemoryTransport` (a server `Service` in the same
process) a third, for whole federations in one process. Failures come back as four neutral
errors -- `Lost`, `Stale`, `Reattest`, `Refused` -- whatever the transport's own codes are.

Responses are the proto's reply messages (`teefl.wire.teefl_pb2`), the vocabulary both sides
already share, except `Model` (where the downloaded model went) and ``None`` for requests that
only act.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from teefl.errors import TeeflError
from teefl.transport.base import REATTEST_DUE

if TYPE_CHECKING:
    import torch

    from teefl.client.resident import ResidentModel
    from teefl.wire import teefl_pb2


# -- errors ------------------------------------------------------------------------------------
class Lost(Exception):
    """Contact with the aggregator was lost (restart, network): rejoin after a backoff."""


class Stale(Exception):
    """The round (or the session) moved on before the request arrived: carry on with the next."""


class Reattest(Exception):
    """The collaborator's attestation (or its check of the aggregator's) no longer covers the
    round it is about to take part in (``security.attestation.reattest_every``): Challenge and
    Join again now, with fresh evidence for a fresh nonce -- no backoff, nothing was lost.
    ``round``: the round it re-attests for (0: not known)."""

    def __init__(self, why: str, round: int = 0) -> None:
        super().__init__(why)
        self.why, self.round = why, round


class Refused(TeeflError):
    """The aggregator refused this collaborator for good; ``reason`` is its word for why."""

    def __init__(self, who: str, reason: str) -> None:
        super().__init__(f"aggregator refused {who}: {reason}")
        self.reason = reason


#: the status codes of the control plane (gRPC's names; the data plane sends the same names)
_CODES = frozenset(
    [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ]
)


def status_error(code: str, details: str, who: str) -> Exception:
    """The neutral error for a refusal with status ``code`` (a gRPC status name): lost contact
    -> rejoin; a closed round -> next round; an attestation due -> attest again (`Reattest`);
    anything else ends the run (`Refused`)."""
    if code not in _CODES:
        code = "UNKNOWN"
    if code in ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN"):
        return Lost(f"{code}: {details}")
    if code == "PERMISSION_DENIED" and "has not passed attestation" in details:
        return Lost("the aggregator no longer knows our attestation (restarted?)")
    if code == "UNAUTHENTICATED" and "Join first" in details:
        return Lost(f"our session ended ({details})")  # restarted aggregator, or a newer Join
    if code == "RESOURCE_EXHAUSTED" and "rate limit" in details:
        return Lost(details)
    if code == "FAILED_PRECONDITION" and details.startswith(REATTEST_DUE):
        return Reattest(details)
    if code == "FAILED_PRECONDITION" and ("not open" in details or "stale" in details):
        return Stale(details)
    return Refused(who, details)


# -- requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Connect:
    """Reach the aggregator's enrolment endpoint (nothing to do when it is reached already).

    ``patience``: at the first contact, how long to keep trying before it is an error; None
    on a rejoin: one try, and a failure that waiting may cure is `Lost`. Response: the
    aggregator's certificate (PEM) every connection is pinned to, or None when none is."""

    patience: float | None = None


@dataclass(frozen=True)
class Challenge:
    """Ask for the aggregator's evidence (``want_evidence``) bound to ``nonce``, and for its
    nonce for ours. Response: ``teefl_pb2.ChallengeReply``."""

    nonce: bytes
    want_evidence: bool


@dataclass(frozen=True)
class Join:
    """Join the run with this plan's fingerprint (and, when this collaborator must attest, its
    evidence bound to the aggregator's ``nonce`` and its in-memory ``session_key``).
    Response: ``teefl_pb2.JoinReply``; the session it grants is opened by `Open`."""

    plan_sections: Mapping[str, str]
    evidence: Any = None  # teefl_pb2.Evidence
    nonce: bytes = b""
    session_key: bytes = b""
    #: the digest of this party's workload code (`teefl.workload.digest`)
    workload_digest: str = ""


@dataclass(frozen=True)
class Open:
    """Open what the accepted ``reply`` grants for model traffic: the session channel and the
    data plane. ``aggregator_key``: the key the aggregator's evidence was verified for (DER
    SubjectPublicKeyInfo); model data goes to nothing else. Response: None."""

    reply: teefl_pb2.JoinReply
    aggregator_key: bytes | None = None


@dataclass(frozen=True)
class Disconnect:
    """After a loss: drop the session's connections (and the enrolment channel when it is
    pinned: a restarted aggregator has a new key). Response: None."""


@dataclass(frozen=True)
class WaitRound:
    """Wait for a round after ``after_round``. Response: ``teefl_pb2.WaitReply``."""

    after_round: int


@dataclass(frozen=True)
class GetModel:
    """Download round ``round``'s model -- straight into ``resident``'s memory where the
    payload is byte-for-byte its layout. Response: `Model`."""

    round: int
    resident: ResidentModel | None = None


@dataclass(frozen=True)
class Model:
    """A downloaded model: ``state`` to load, or None when it landed in the resident model;
    ``size``: the bytes that travelled."""

    state: dict[str, torch.Tensor] | None
    size: int


@dataclass(frozen=True)
class PutUpdate:
    """Send round ``round``'s update (``header`` first, then ``payload`` as it is: no copy) and
    wait for its acknowledgement. Response: ``teefl_pb2.UpdateAck``."""

    round: int
    header: teefl_pb2.Header
    payload: Any = field(repr=False)


@dataclass(frozen=True)
class Report:
    """Send the evaluation pass's report (a header without payload). Response: None."""

    header: teefl_pb2.Header


Request = Connect | Challenge | Join | Open | Disconnect | WaitRound | GetModel | PutUpdate | Report


class ClientTransport(Protocol):
    """What the collaborator talks to the aggregator through."""

    def handle(self, request: Request) -> Any:
        """Carry out ``request``; raises `Lost`, `Stale` or `Refused` (or a `TeeflError`)."""
        ...

    def close(self) -> None:
        """Close every connection (the end of the run)."""
        ...
