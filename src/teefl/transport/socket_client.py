"""A collaborator's data connection: TCP or TLS, then HELLO with its name and session token."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

from teefl.errors import TeeflError
from teefl.transport.framing import (
    HANDSHAKE_TIMEOUT_S,
    HELLO,
    OK,
    Closed,
    expect,
    keepalive,
    send_frame,
)


def connect(
    host: str,
    port: int,
    name: str,
    token: bytes,
    tls: ssl.SSLContext | None,
    expected_spki: bytes | None = None,
    timeout: float = HANDSHAKE_TIMEOUT_S,
) -> Any:
    """Open and authorise a collaborator's data connection; returns the socket.

    ``expected_spki``: the aggregator's attested public key (DER SubjectPublicKeyInfo); the
    connection is refused unless the server's certificate carries exactly that key.
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise Closed(f"cannot reach the data plane at {host}:{port}: {exc}") from None
    try:
        keepalive(raw)
        sock: Any = raw
        if tls is not None:
            try:
                sock = tls.wrap_socket(raw, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                raise TeeflError(f"data plane at {host}:{port}: {exc.verify_message}") from None
            except (OSError, ssl.SSLError) as exc:
                raise Closed(f"TLS handshake with the data plane failed: {exc}") from None
            if expected_spki is not None:
                from cryptography import x509

                from teefl.security.attest import spki_der_of

                der = sock.getpeercert(binary_form=True)
                if spki_der_of(x509.load_der_x509_certificate(der)) != expected_spki:
                    raise TeeflError(
                        "the data plane's TLS key is not the key the aggregator's attestation "
                        "was bound to: refusing to send or receive model data"
                    )
        send_frame(sock, HELLO, json.dumps({"collaborator": name, "token": token.hex()}).encode())
        expect(sock, OK)
        sock.settimeout(None)
        return sock
    except BaseException:
        raw.close()
        raise
