"""Transport-neutral types between the server's handlers (`teefl.server.service`) and the
adapters that carry them (gRPC: `server.grpc_adapter`, the data plane: `server.socket_adapter`).

Why: the handlers decide (who may call, which round is open, what an update must satisfy); a
transport only moves bytes and maps these errors to its own status codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: status names (gRPC's, which the socket data plane's ERROR frames use too)
OK = "OK"
#: how the refusal of a model call whose attestation is due begins (FAILED_PRECONDITION): the
#: collaborator's transport maps it to `teefl.transport.client.Reattest`
REATTEST_DUE = "re-attestation due"


class Refused(Exception):
    """A request the server refuses: ``status`` (a gRPC status name) and a one-line reason."""

    status = "PERMISSION_DENIED"

    def __init__(self, reason: str, status: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class Unauthenticated(Refused):
    status = "UNAUTHENTICATED"


class Invalid(Refused):
    status = "INVALID_ARGUMENT"


class Precondition(Refused):
    status = "FAILED_PRECONDITION"


class Stale(Precondition):
    """Too late or too early for the open round (an update, a download)."""


class Cancelled(Refused):
    """A newer transfer of the same member took this one's slot."""

    status = "CANCELLED"


class Aborted(Refused):
    status = "ABORTED"


class Lost(Exception):
    """The peer went away mid-transfer: nothing it sent is counted."""


@dataclass
class Peer:
    """Who is calling, as the transport saw it; nothing here is trusted until `Identity.check`.

    ``name``: the claimed collaborator name; ``address``: for logs (``ipv4:1.2.3.4:5``);
    ``tls_version``: the negotiated protocol or None (plaintext); ``cn``/``cert``: the verified
    client certificate's CN and its parsed `peer_identity.ClientCert` (mtls), else None;
    ``token``: the session token presented; ``handle``: what a newer Join cancels (an RPC context
    or a data connection), with ``on_end(fn)`` to run ``fn`` when the call ends (False: already
    ended); ``kind``: how refusals are logged ("call" or "data connection").
    """

    name: str
    address: str = ""
    tls_version: str | None = None
    cn: str | None = None
    cert: Any = None
    token: bytes | None = None
    handle: Any = None
    on_end: Callable[[Callable[[], None]], bool] | None = None
    kind: str = "call"
    connection: bool = False  # a data connection (kept by its session until it closes)


@dataclass
class Receipt:
    """One incoming update as the transport announces it, before any payload byte moves."""

    header: Any  # teefl_pb2.Header
    peer: Peer
    t0: float
    token: bytes | None = None


@dataclass
class ModelOffer:
    """One download: the header to send first, then ``payload`` (bytes-like) or, for gRPC, the
    pre-serialized ``chunks``; ``sent()`` once every byte went, ``done()`` in every case."""

    header: Any
    payload: Any
    chunks: list[bytes] | None
    progress: Callable[[], None]
    moving: Callable[[], Any]
    sent: Callable[[], None]
    done: Callable[[], None]
    extra: dict[str, Any] = field(default_factory=dict)
