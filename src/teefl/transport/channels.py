"""gRPC plumbing shared by both roles: options, server ports and client channels.

Why one place: the aggregator and collaborators must agree on message limits and keepalive
settings (a client pinging more often than the server allows gets its connection closed with
``too_many_pings``), and the TLS/mTLS choice must be applied identically on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from teefl.errors import TeeflError
from teefl.plan import Plan

#: keepalive pings so a collaborator training for an hour is never mistaken for a dead peer
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def message_options(chunk_size: int) -> list[tuple[str, int]]:
    limit = chunk_size + (1 << 20)  # a chunk plus its header and metrics
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def server_options(plan: Plan) -> list[tuple[str, int]]:
    return [
        *message_options(plan.network.chunk_size),
        *_KEEPALIVE,
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # without this, a second server on the same port would bind silently (SO_REUSEPORT)
        ("grpc.so_reuseport", 0),
    ]


def channel_options(plan: Plan) -> list[tuple[str, int | str]]:
    return [*message_options(plan.network.chunk_size), *_KEEPALIVE]


def payload_check(plan: Plan) -> str:
    """What received payloads are checked against (``network.payload_check``, see plan.py):
    one of `teefl.wire.codec.CHECKS`."""
    check = plan.network.payload_check
    if check != "auto":
        return check
    return "crc32c" if (plan.security.transport or "none") == "none" else "none"


@dataclass(frozen=True)
class ClientCerts:
    ca: Path
    cert: Path | None
    key: Path | None


def client_certs(plan: Plan, name: str) -> ClientCerts | None:
    """The certificate files a collaborator uses under the plan's transport (None for none)."""
    transport = plan.security.transport or "none"
    if transport == "none":
        return None
    tls = plan.security.tls
    assert tls.ca is not None  # guaranteed by plan validation
    if transport == "tls":
        return ClientCerts(tls.ca, None, None)
    if tls.client_dir is None:
        raise TeeflError("transport mtls needs security.tls.client_dir (collaborator certificates)")
    return ClientCerts(tls.ca, tls.client_dir / f"{name}.crt", tls.client_dir / f"{name}.key")


def bind(
    server: grpc.Server,
    plan: Plan,
    listen: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Add the listening port with the plan's transport; returns the bound port.

    ``credentials``: the server's own (an in-memory key, more client roots); None builds them
    from the plan's certificate files."""
    transport = plan.security.transport or "none"
    target = f"{listen}:{port}"
    try:
        if transport == "none":
            bound = server.add_insecure_port(target)
        elif credentials is not None:
            bound = server.add_secure_port(target, credentials)
        else:
            from teefl.security.tls import server_credentials

            tls = plan.security.tls
            if tls.server_cert is None or tls.server_key is None:
                raise TeeflError(
                    f"transport {transport} needs security.tls.server_cert and server_key"
                )
            creds = server_credentials(
                tls.ca, tls.server_cert, tls.server_key, require_client_cert=transport == "mtls"
            )
            bound = server.add_secure_port(target, creds)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise TeeflError(
            f"cannot listen on {target}: the port is already in use or the address is not local"
        )
    return bound


def open_channel(
    plan: Plan,
    name: str,
    address: str,
    timeout: float = 30.0,
    *,
    pin: bytes | None = None,
    client: tuple[bytes, bytes] | None = None,
) -> grpc.Channel:
    """Open a collaborator's channel to the aggregator, waiting until it is up.

    The TLS handshake happens here, so the caller's ``connect`` span includes it. ``pin``: the
    aggregator's own certificate (PEM) as the only root -- the channel then reaches exactly the
    attested key and nothing else (gRPC checks the name against the certificate's first SAN).
    ``client``: (certificate PEM, key PEM) held in memory -- a session certificate -- instead of
    the collaborator's provisioned files.
    """
    certs = client_certs(plan, name)
    options = channel_options(plan)
    if certs is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        from teefl.security.tls import channel_credentials

        if pin is None and client is None:
            creds = channel_credentials(certs.ca, certs.cert, certs.key)
        else:
            root = pin if pin is not None else Path(certs.ca).read_bytes()
            if pin is not None:
                from teefl.security.attest import first_san

                options = [*options, ("grpc.ssl_target_name_override", first_san(pin))]
            if client is not None:
                chain, key = client
            elif certs.cert is not None and certs.key is not None:
                chain, key = certs.cert.read_bytes(), certs.key.read_bytes()
                # the same local checks as `channel_credentials` (readable errors)
                from teefl.security import certificates

                certificates.check_certificate(
                    certs.cert, ca_path=certs.ca, key_path=certs.key, purpose="client"
                )
            else:
                chain = key = None
            creds = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=key, certificate_chain=chain
            )
        channel = grpc.secure_channel(address, creds, options=options)
    from teefl.security.tls_diagnosis import wait_for_channel

    try:
        wait_for_channel(
            channel,
            target=address,
            transport=plan.security.transport or "none",
            ca=certs.ca if certs and pin is None else None,
            cert=certs.cert if certs and client is None else None,
            key=certs.key if certs and client is None else None,
            timeout=timeout,
        )
    except BaseException:
        channel.close()
        raise
    return channel
