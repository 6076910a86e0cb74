"""Attested join: evidence bound to the TLS key, checked before any model byte flows.

The report data of every quote is SHA-512(DER SubjectPublicKeyInfo of the sender's TLS
certificate || a 32-byte nonce chosen by the verifier). A verified quote therefore proves that the
private key of *this* TLS connection lives in a TEE with the measured code, and the fresh nonce
proves the quote is not a replay. The aggregator remembers, per collaborator, the public key that
was attested and refuses every later call that does not come over a connection with that key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from teefl.errors import TeeflError
from teefl.federation import teefl_pb2
from teefl.plan import AttestationSpec
from teefl.security.tee.evidence import (
    ConfigfsTsmProvider,
    Evidence,
    EvidenceProvider,
    GramineProvider,
    SimulatedProvider,
    default_provider,
)
from teefl.security.tee.policy import ROLE_KEYS, ROLES, require_pinned
from teefl.security.tee.verify import (
    AttestationError,
    QuoteVerdict,
    SimulatedVerifier,
    enforce_policy,
    report_data_for,
    spki_der_of,
    verify_evidence,
)

log = logging.getLogger("teefl.attest")

NONCE_SIZE = 32
#: a Challenge nonce must be used within this many seconds
NONCE_TTL_S = 120.0


def make_provider(spec: AttestationSpec) -> EvidenceProvider:
    """This host's evidence source, as the plan asks."""
    if spec.provider == "simulated":
        return SimulatedProvider(allow_simulated=spec.allow_simulated, key_file=spec.simulated_key)
    if spec.provider == "configfs-tsm":
        return ConfigfsTsmProvider()
    if spec.provider == "gramine":
        return GramineProvider(Path("/"))
    return default_provider(allow_simulated=spec.allow_simulated, simulated_key=spec.simulated_key)


def to_proto(ev: Evidence) -> teefl_pb2.Evidence:
    extra = ev.to_dict()["extra"]
    return teefl_pb2.Evidence(
        kind=ev.kind, provider=ev.provider, quote=ev.quote, extra_json=json.dumps(extra)
    )


def from_proto(msg: teefl_pb2.Evidence) -> Evidence:
    try:
        extra = json.loads(msg.extra_json) if msg.extra_json else {}
        if not isinstance(extra, dict):
            raise ValueError("extra is not an object")
        return Evidence.from_dict(
            {
                "kind": msg.kind,
                "provider": msg.provider,
                "extra": extra,
                "quote_b64": base64.b64encode(msg.quote).decode(),
            }
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise AttestationError(f"malformed evidence: {exc}") from None


def spki_of_pem(pem: bytes | str) -> bytes:
    """DER SubjectPublicKeyInfo of a PEM certificate (what report data binds)."""
    data = pem.encode() if isinstance(pem, str) else pem
    return spki_der_of(x509.load_pem_x509_certificate(data))


def fingerprint(spki: bytes) -> str:
    return hashlib.sha256(spki).hexdigest()


class Verifier:
    """Checks the evidence of a party of one role against that role's policy and collateral.

    ``role`` is the role of the party WHOSE evidence is verified ("aggregator": a collaborator
    checks the aggregator; "collaborator": the aggregator checks a collaborator). Construction
    is the start-time check: a policy that pins no TEE identity (see
    ``teefl.security.tee.policy.require_pinned``) stops the party with one line, and a stated
    TDX subset or ``allow_debug`` is warned about at every start.
    """

    def __init__(self, spec: AttestationSpec, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.role = role
        where = f"security.attestation.policies.{ROLE_KEYS[role]}"
        policy = spec.policies.for_role(role)
        for warning in require_pinned(policy, where):
            log.warning("ATTESTATION POLICY WARNING: %s", warning)
        assert policy is not None  # require_pinned refuses None
        if policy.allow_simulated and not spec.allow_simulated:  # the plan validator says so too
            raise AttestationError(f"{where}.allow_simulated needs allow_simulated: true")
        self.policy = policy
        try:
            self.collateral = spec.collateral.read_text() if spec.collateral else None
        except OSError as exc:
            raise TeeflError(
                f"cannot read security.attestation.collateral {spec.collateral}: {exc.strerror}"
            ) from None
        self.pccs_url = spec.pccs_url
        self.simulated = SimulatedVerifier(allow_simulated=True) if policy.allow_simulated else None
        self.snp = snp_collateral(spec) if "sev-snp" in policy.pinned_kinds() else None

    def verify(self, evidence: Evidence, spki: bytes, nonce: bytes) -> QuoteVerdict:
        verdict = verify_evidence(
            evidence,
            collateral_json=self.collateral,
            pccs_url=self.pccs_url,
            simulated_verifier=self.simulated,
            snp_collateral=self.snp,
        )
        enforce_policy(verdict, self.policy, report_data_for(spki, nonce), require_pinned=True)
        return verdict


def snp_collateral(spec: AttestationSpec) -> Any:
    """The plan's SEV-SNP collateral (files, and AMD KDS with a disk cache when allowed)."""
    from teefl.security.tee.snp.collateral import SnpCollateral, default_kds_cache

    snp = spec.snp
    cache = (snp.kds_cache or default_kds_cache()) if snp.kds else None
    return SnpCollateral.from_files(
        snp.certs, snp.crls, kds_cache=cache, require_crl=snp.require_crl
    )


def check_policies(spec: AttestationSpec) -> None:
    """Refuse, before anything starts, a required role whose policy pins no identity (what each
    verifying party would refuse at its own start; ``teefl run`` calls this for both roles)."""
    for role, key in (("collaborator", "collaborators"), ("aggregator", "aggregator")):
        if getattr(spec, key) == "required":
            Verifier(spec, role)


@dataclass
class _Pending:
    nonce: bytes
    expires: float


class NonceBook:
    """Single-use nonces per collaborator: a quote bound to an old nonce is a replay."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def issue(self, name: str) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        self._pending[name] = _Pending(nonce, time.monotonic() + NONCE_TTL_S)
        return nonce

    def take(self, name: str, nonce: bytes) -> bytes:
        pending = self._pending.pop(name, None)
        if pending is None or pending.nonce != nonce:
            raise AttestationError(
                "attestation refused: stale or unknown nonce (evidence must be bound to the "
                "nonce of the latest Challenge)"
            )
        if time.monotonic() > pending.expires:
            raise AttestationError("attestation refused: nonce expired")
        return pending.nonce


def write_verdict(run_dir: Path, party: str, record: dict[str, Any]) -> None:
    """Keep every verdict (accepted or refused) in the run: ``attestation/<party>.json``."""
    from teefl.runfiles import private_dir, write_private

    out = private_dir(Path(run_dir) / "attestation")
    path = out / f"{party}.json"
    history = []
    if path.exists():
        try:
            history = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            history = []
    history.append(record)
    write_private(path, json.dumps(history, indent=2, default=str) + "\n")


def server_spki(address: str, ca: Path, timeout: float = 10.0) -> bytes:
    """The aggregator's TLS public key, fetched over a CA- and host-verified TLS connection.

    gRPC's Python client does not expose the peer certificate of a channel, so the collaborator
    looks at the certificate the same address presents to a verified TLS handshake of its own.
    """
    from teefl.security.tls import split_target

    host, port = split_target(address)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise TeeflError(
            f"cannot fetch the aggregator's certificate from {address}: {exc}"
        ) from None
    return spki_der_of(x509.load_der_x509_certificate(der))
