"""gRPC transport security for the federation: the credentials, from checked files.

gRPC reports an expired certificate, a key that belongs to another certificate or a certificate of
another CA only as a failed handshake -- and usually on the *other* machine. `server_credentials` /
`channel_credentials` first run the checks a peer would run
(`teefl.security.certificates.check_certificate`) and name the file that is wrong.

Who a verified peer is: `teefl.security.peer_identity`; why a channel does not come up:
`teefl.security.tls_diagnosis`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from teefl.errors import TeeflError
from teefl.security import certificates

if TYPE_CHECKING:
    from teefl.plan import SecuritySpec


# -- credentials -------------------------------------------------------------------------------
def server_credentials(
    ca: Path,
    cert: Path,
    key: Path,
    require_client_cert: bool,
    extra_roots: bytes | None = None,
) -> grpc.ServerCredentials:
    """Credentials for the aggregator's port: TLS with ``cert``/``key``; with
    ``require_client_cert`` (mtls) every client must present a certificate issued by ``ca``
    (or by one of ``extra_roots``, PEM: the aggregator's in-memory session CA).

    In tls mode the CA is not given to gRPC at all, so no client certificate is even requested --
    identity then rests on the claimed name only (see `authorize`).
    """
    certificates.check_certificate(
        Path(cert), ca_path=Path(ca), key_path=Path(key), purpose="server"
    )
    ca_pem = Path(ca).read_bytes()
    if extra_roots:
        ca_pem = ca_pem.rstrip(b"\n") + b"\n" + extra_roots
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=ca_pem if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def channel_credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a collaborator's channel: trust only ``ca`` (not the system store, so a
    publicly-issued certificate cannot stand in for the aggregator); present ``cert``/``key`` for
    mtls. Both or neither of ``cert``/``key``."""
    ca = Path(ca)
    if (cert is None) != (key is None):
        missing = "key" if key is None else "certificate"
        raise TeeflError(f"client {missing} missing: mtls needs both a certificate and its key")
    ca_cert = certificates.load_certificate(ca)
    if not certificates.is_ca(ca_cert):
        raise TeeflError(f"{ca} is not a CA certificate (basicConstraints CA is not true)")
    certificates.check_validity(ca_cert, ca)
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    certificates.check_certificate(Path(cert), ca_path=ca, key_path=Path(key), purpose="client")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )


def effective_transport(security: SecuritySpec) -> str:
    """The plan's transport, resolving ``None`` as documented in `teefl.plan.SecuritySpec`:
    mtls when certificates are configured, otherwise the user must choose (never silently none)."""
    if security.transport is not None:
        return security.transport
    if security.tls.ca is not None:
        return "mtls"
    raise TeeflError(
        "security.transport is not set: choose none, tls or mtls in the plan "
        "(certificates for tls/mtls: teefl pki plan PLAN)"
    )


def _need(value: Path | None, key: str, transport: str) -> Path:
    if value is None:
        raise TeeflError(
            f"security.transport is {transport} but security.tls.{key} is not set "
            "(teefl pki plan PLAN prints the block to paste)"
        )
    return value


def server_credentials_for(security: SecuritySpec) -> grpc.ServerCredentials | None:
    """The aggregator's credentials for a plan's security section; None for transport none."""
    transport = effective_transport(security)
    if transport == "none":
        return None
    t = security.tls
    return server_credentials(
        _need(t.ca, "ca", transport),
        _need(t.server_cert, "server_cert", transport),
        _need(t.server_key, "server_key", transport),
        require_client_cert=transport == "mtls",
    )


def client_paths_for(security: SecuritySpec, name: str) -> tuple[Path, Path] | None:
    """(certificate, key) collaborator ``name`` presents: ``<client_dir>/<name>.crt|.key`` in
    mtls mode, None otherwise."""
    transport = effective_transport(security)
    if transport != "mtls":
        return None
    client_dir = _need(security.tls.client_dir, "client_dir", transport)
    return client_dir / f"{name}.crt", client_dir / f"{name}.key"


def channel_credentials_for(security: SecuritySpec, name: str) -> grpc.ChannelCredentials | None:
    """Collaborator ``name``'s channel credentials for a plan; None for transport none."""
    transport = effective_transport(security)
    if transport == "none":
        return None
    ca = _need(security.tls.ca, "ca", transport)
    paths = client_paths_for(security, name)
    if paths is None:
        return channel_credentials(ca)
    return channel_credentials(ca, *paths)
