"""Helpers for identity and attestation tests: plans with a PKI, a live in-process aggregator,
and the client side of an attacker (or of a collaborator's TEE, played by the test).

Plan construction for these tests lives in `secure_plan` only, so a change to what `required`
attestation needs (pinned measurements, pinned simulated keys) is made in one place.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedutil import SYNTHETIC, free_port, write_plan
from teefl.security import certificates, plan_pki
from teefl.security.tee.simulated import (
    default_simulated_measurements,
    load_or_create_simulated_key,
    simulated_key_fingerprint,
)


def sim_key(tmp: Path) -> Path:
    """The simulated provider's signing key of a test (the stand-in for a platform's
    attestation key: every party's "TEE" signs with it, and the policies pin it)."""
    return Path(tmp) / "sim.pem"


def attestation_spec(tmp: Path, roles: str = "both") -> dict[str, Any]:
    """security.attestation with simulated evidence, pinned as a plan must pin it: the
    simulated signing key (`sim_key`) by fingerprint and the simulated measurements, in both
    roles' policies. Evidence with another measurement or key is refused. ``roles``: "both",
    "collaborators" or "aggregator" -- who must attest."""
    key_file = sim_key(tmp)
    policy = {
        "allow_simulated": True,
        "simulated_keys": [simulated_key_fingerprint(load_or_create_simulated_key(key_file))],
        **{k: [v.hex()] for k, v in default_simulated_measurements().items()},
    }
    return {
        "collaborators": "required" if roles in ("both", "collaborators") else "off",
        "aggregator": "required" if roles in ("both", "aggregator") else "off",
        "provider": "simulated",
        "allow_simulated": True,
        "simulated_key": str(key_file),
        "policies": {"aggregator": policy, "collaborators": policy},
    }


def attested_plan_data(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A plan for `teefl run` (throwaway PKI) with both roles attested."""
    security = {"transport": "mtls", "attestation": attestation_spec(tmp)}
    return {**SYNTHETIC, "security": security, **sections}


def secure_plan(
    tmp: Path,
    *,
    transport: str = "mtls",
    attested: bool | str = False,
    collaborators: int | list[str] = 2,
    port: int | None = None,
    path: Path | None = None,
    pki_dir: Path | None = None,
    **sections: Any,
) -> tuple[Path, dict[str, Any], plan_pki.PlanPki]:
    """A synthetic plan on loopback with a PKI issued for it (kept in ``pki_dir``, default
    ``tmp/pki``, and reused when it exists). ``sections`` replace top-level plan sections
    (``federation={...}``); ``attested``: True (both roles) or the roles of `attestation_spec`.
    Returns (plan path, plan data, the PKI)."""
    data: dict[str, Any] = {
        **SYNTHETIC,
        "collaborators": collaborators,
        "network": {"host": "127.0.0.1", "port": port or free_port()},
        "security": {"transport": "none"},
        **sections,
    }
    path = path or tmp / "plan.yaml"
    write_plan(path, data)
    from teefl.plan import load_plan

    issued = plan_pki.issue_for_plan(load_plan(path), pki_dir or tmp / "pki")
    security: dict[str, Any] = {"transport": transport}
    if transport != "none":
        tls = {
            "ca": str(issued.ca),
            "server_cert": str(issued.server_cert),
            "server_key": str(issued.server_key),
            "client_dir": str(issued.client_dir),
        }
        if getattr(issued, "crl", None) is not None:
            tls["crl"] = str(issued.crl)
        security["tls"] = tls
    if attested:
        security["attestation"] = attestation_spec(tmp, "both" if attested is True else attested)
    data["security"] = security
    write_plan(path, data)
    return path, data, issued


@contextlib.contextmanager
def live_aggregator(plan_path: Path, run_dir: Path) -> Iterator[tuple[Any, int]]:
    """The aggregator of ``plan_path`` serving gRPC and its data plane in this process (its
    round loop does not run: rounds stay where they are). Yields (aggregator, gRPC port)."""
    from teefl.measure.events import EventRecorder
    from teefl.plan import load_plan, require_transport
    from teefl.server.aggregator import Aggregator
    from teefl.server.grpc_adapter import add_to_server, server_credentials
    from teefl.transport.channels import bind, server_options

    plan = load_plan(plan_path)
    require_transport(plan)
    agg = Aggregator(plan, run_dir, "id", EventRecorder(run_dir, "id", "aggregator", "aggregator"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=server_options(plan))
    add_to_server(agg, server)
    creds = server_credentials(agg.service, plan)
    port = bind(server, plan, "127.0.0.1", 0, *([creds] if creds is not None else []))
    data = agg.data_server("127.0.0.1")
    server.start()
    try:
        yield agg, port
    finally:
        if data is not None:
            data.stop()
        server.stop(0).wait(5)


# -- the client side -------------------------------------------------------------------------
def fetch_pin(port: int) -> bytes:
    """The certificate (PEM) the aggregator presents, without verifying it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def channel(port: int, ca: Path, cert_pem: bytes | None, key_pem: bytes | None) -> grpc.Channel:
    """A TLS channel to the aggregator that trusts its current certificate (pinned: whatever
    key it serves with) or the plan's CA, presenting ``cert_pem``/``key_pem`` (None: none)."""
    roots = fetch_pin(port) + Path(ca).read_bytes()
    creds = grpc.ssl_channel_credentials(roots, key_pem, cert_pem)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def msg(cls: Any, **fields: Any) -> Any:
    """A protobuf message with those of ``fields`` that its type has (so an attack written
    against today's protocol also runs against an older one)."""
    known = cls.DESCRIPTOR.fields_by_name
    return cls(**{k: v for k, v in fields.items() if k in known})


def token_metadata(token: bytes) -> tuple[tuple[str, str], ...]:
    return (("teefl-session", token.hex()),)


def model_bytes(stub: Any, name: str, md: tuple = ()) -> tuple[int, str]:
    """Try to download round 1's model over gRPC: (bytes received, refusal or "")."""
    from teefl.wire import teefl_pb2

    got = 0
    try:
        for chunk in stub.GetModel(
            teefl_pb2.ModelRequest(collaborator=name, round=1), timeout=10, metadata=md
        ):
            got += len(chunk.data)
    except grpc.RpcError as exc:
        return got, exc.details() or ""
    return got, ""


def client_ssl(ca: Path, port: int, cert: Path, key: Path) -> ssl.SSLContext:
    """A data-plane TLS context that trusts the aggregator's current certificate or the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=(fetch_pin(port) + Path(ca).read_bytes()).decode())
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def odd_client_cert(
    directory: Path, cn: str, *, ca: bool = False, eku: Any = "client"
) -> tuple[Path, Path]:
    """A certificate with CN=``cn`` signed by the PKI's own CA, but not a proper client
    certificate: ``ca`` sets basicConstraints CA:true; ``eku`` None leaves the extended key
    usage out, "server" makes it serverAuth. Returns (certificate, key) paths."""
    ca_cert, ca_key = certificates.load_ca(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca_cert.not_valid_before_utc)
        .not_valid_after(ca_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku is not None:
        oid = (
            ExtendedKeyUsageOID.CLIENT_AUTH if eku == "client" else ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([oid]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    tag = f"{cn}-{'ca' if ca else 'leaf'}-{eku}"
    cert_path, key_path = Path(directory) / f"{tag}.crt", Path(directory) / f"{tag}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
