"""Evidence verification: Intel DCAP quotes (via dcap-qvl), AMD SEV-SNP reports (``snp``), the
simulated stand-in; and, re-exported from ``policy``, the attestation policy.

Why three layers:

1. ``verify_quote`` answers "is this a genuine quote from an Intel platform, and what is that
   platform's TCB status at time ``now``?" -- signatures, certificate chain to Intel's root, CRLs
   and TCB info, all done by ``dcap_qvl`` against collateral from a file or a PCCS.
2. ``quote.parse_quote_fields`` reads the measured identity (MRTD/RTMRs or MRENCLAVE/MRSIGNER)
   and the 64-byte REPORTDATA from the quote body ourselves, with offsets from Intel's quote
   format specification, so the policy never depends on a library's JSON shape.
3. ``check_policy`` (``policy.py``) answers "do *we* accept it?": TCB status, measurements, debug
   attributes, and the binding of REPORTDATA to the TLS key of this very connection. Without the
   binding a genuine quote could be replayed by any machine-in-the-middle; with it, the quote
   vouches for the TLS endpoint.

Binding: ``report_data_for(spki_der, nonce, binding) = SHA-512(DER SubjectPublicKeyInfo || nonce
|| binding)``; the nonce (32 bytes, chosen by the verifier) makes each quote fresh, the binding
(32 bytes: the SHA-256 of the party's plan and CA) ties it to the configuration it runs with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teefl.errors import TeeflError
from teefl.security.tee.errors import AttestationError
from teefl.security.tee.evidence import Evidence
from teefl.security.tee.policy import (
    AttestationPolicies,
    Policy,
    check_policy,
    enforce_policy,
    policy_block,
    require_pinned,
)
from teefl.security.tee.quote import parse_quote_fields
from teefl.security.tee.simulated import (
    parse_simulated_quote,
    verify_simulated_signature,
    warn_simulated,
)
from teefl.security.tee.verdict import QuoteVerdict

if TYPE_CHECKING:
    from teefl.security.tee.snp import SnpCollateral

log = logging.getLogger("teefl.tee")

NONCE_SIZE = 32


# --------------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------------


#: bytes of the configuration binding (a SHA-256, see `teefl.security.attest.config_binding`)
BINDING_SIZE = 32


def report_data_for(spki_der: bytes, nonce: bytes, binding: bytes) -> bytes:
    """SHA-512(DER SubjectPublicKeyInfo || nonce || binding): the 64 bytes a quote must carry.

    Hashing the whole SPKI (algorithm + key) rather than the certificate means a re-issued
    certificate for the same key still verifies, while any other key cannot. ``binding`` is the
    SHA-256 of what the party runs with (its plan and CA, `attest.config_binding`): a verifier
    computes its own and so refuses a peer whose host edited the plan or swapped the CA, even
    though the measured code is the same.
    """
    if len(nonce) != NONCE_SIZE:
        raise AttestationError(f"attestation nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if not spki_der:
        raise AttestationError("empty SubjectPublicKeyInfo")
    if len(binding) != BINDING_SIZE:
        raise AttestationError(
            f"configuration binding must be {BINDING_SIZE} bytes, got {len(binding)}"
        )
    return hashlib.sha512(bytes(spki_der) + bytes(nonce) + bytes(binding)).digest()


def spki_der_of(cert_or_key: x509.Certificate | bytes | Any) -> bytes:
    """DER SubjectPublicKeyInfo of a certificate (object, PEM or DER) or a public/private key."""
    if isinstance(cert_or_key, bytes | bytearray):
        data = bytes(cert_or_key)
        cert_or_key = (
            x509.load_pem_x509_certificate(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_certificate(data)
        )
    if isinstance(cert_or_key, x509.Certificate):
        key = cert_or_key.public_key()
    elif hasattr(cert_or_key, "public_bytes"):
        key = cert_or_key
    elif hasattr(cert_or_key, "public_key"):
        key = cert_or_key.public_key()
    else:
        raise TypeError(f"cannot take a public key from {type(cert_or_key).__name__}")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _as_utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise AttestationError("verification time must be timezone-aware (use UTC)")
    return now.astimezone(UTC)


def _classify(message: str) -> str:
    """Map dcap-qvl's error text to one of our named failures."""
    message = message.removeprefix("Verification failed: ")
    low = message.lower()
    if "expired" in low or "not yet valid" in low or "nextupdate" in low.replace("_", ""):
        return f"collateral expired: {message}"
    if "signature" in low:
        return f"quote signature invalid: {message}"
    if "revoked" in low:
        return f"certificate revoked: {message}"
    return f"quote verification failed: {message}"


def _run_coroutine(coro: Any) -> Any:
    """Run a coroutine from sync code, also when the caller is inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _load_collateral(
    quote: bytes, collateral_json: str | None, pccs_url: str | None
) -> Any:  # dcap_qvl.QuoteCollateralV3
    import dcap_qvl

    if collateral_json is not None:
        try:
            return dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
        except (ValueError, TypeError) as exc:
            raise AttestationError(f"collateral invalid: {exc}") from exc
    if pccs_url:
        try:
            return _run_coroutine(dcap_qvl.get_collateral(pccs_url, quote))
        except (ValueError, RuntimeError, OSError) as exc:
            raise AttestationError(f"collateral fetch from {pccs_url} failed: {exc}") from exc
    raise AttestationError(
        "no collateral: give a collateral JSON file or a PCCS URL (e.g. https://pccs.example:8081)"
    )


def _report_json_report_data(report_json: str) -> bytes | None:
    """REPORTDATA as dcap-qvl saw it, to cross-check our own parser."""
    match = re.search(r'"report_data"\s*:\s*"([0-9a-fA-F]{128})"', report_json)
    return bytes.fromhex(match.group(1)) if match else None


def verify_quote(
    quote: bytes,
    collateral_json: str | None,
    pccs_url: str | None,
    now: datetime,
) -> QuoteVerdict:
    """Verify a DCAP quote at time ``now`` and return its verdict, or raise AttestationError.

    ``collateral_json`` (dcap-qvl's QuoteCollateralV3 JSON) wins over ``pccs_url``; fetching from
    a PCCS needs network access and uses ``dcap_qvl.get_collateral``. Passing ``now`` explicitly
    keeps verification reproducible (tests pin it inside the collateral's validity window).
    """
    import dcap_qvl

    quote = bytes(quote)
    fields = parse_quote_fields(quote)  # refuse malformed input before any crypto
    when = _as_utc(now)
    collateral = _load_collateral(quote, collateral_json, pccs_url)
    try:
        report = dcap_qvl.verify(quote, collateral, int(when.timestamp()))
    except ValueError as exc:
        raise AttestationError(_classify(str(exc))) from exc
    details: dict[str, Any] = {}
    try:
        report_json = report.to_json()
        parsed = json.loads(report_json)
        for key in ("qe_status", "platform_status"):
            if key in parsed:
                details[key] = parsed[key]
        theirs = _report_json_report_data(report_json)
        if theirs is not None and theirs != fields.report_data:
            raise AttestationError(
                "quote parse mismatch: REPORTDATA differs from the verifier's view"
            )
    except (ValueError, AttributeError):  # pragma: no cover - details are optional
        pass
    return QuoteVerdict(
        tee_type=fields.tee_type,
        quote_version=fields.version,
        status=str(report.status),
        advisory_ids=tuple(report.advisory_ids),
        report_data=fields.report_data,
        measurements=fields.measurements,
        isv_prod_id=fields.isv_prod_id,
        isv_svn=fields.isv_svn,
        verified_at=when,
        details=details,
    )


class SimulatedVerifier:
    """Checks simulated evidence. Refused unless ``allow_simulated=True``; warns on every use.

    ``trusted_keys`` restricts the signing keys here already; the federation instead pins them in
    the policy (``simulated_keys``: SHA-256 of each key's SubjectPublicKeyInfo), which the verdict
    carries as ``details["signing_key_sha256"]`` -- a policy cannot accept simulated evidence
    without naming its keys.
    """

    def __init__(
        self,
        *,
        allow_simulated: bool = False,
        trusted_keys: Sequence[ec.EllipticCurvePublicKey] | None = None,
    ) -> None:
        if not allow_simulated:
            raise AttestationError(
                "simulated attestation is disabled: it proves nothing about the platform. Set "
                "allow_simulated: true in the plan only for tests and demos"
            )
        self.trusted_keys = list(trusted_keys) if trusted_keys is not None else None
        warn_simulated("SimulatedVerifier created")

    def verify(self, quote: bytes, now: datetime | None = None) -> QuoteVerdict:
        warn_simulated("simulated evidence accepted for verification")
        try:
            parsed = parse_simulated_quote(bytes(quote))
            verify_simulated_signature(parsed, self.trusted_keys)
        except AttestationError:
            raise
        except TeeflError as exc:
            raise AttestationError(f"quote signature invalid: {exc}") from exc
        return QuoteVerdict(
            tee_type="simulated",
            quote_version=1,
            status="Simulated",
            advisory_ids=(),
            report_data=parsed.report_data,
            measurements={k: v.hex() for k, v in parsed.measurements.items()},
            verified_at=_as_utc(now) if now else datetime.now(UTC),
            details={"signing_key_sha256": hashlib.sha256(parsed.public_key_der).hexdigest()},
        )


def verify_evidence(
    evidence: Evidence,
    *,
    collateral_json: str | None = None,
    pccs_url: str | None = None,
    now: datetime | None = None,
    simulated_verifier: SimulatedVerifier | None = None,
    snp_collateral: SnpCollateral | None = None,
) -> QuoteVerdict:
    """Dispatch on ``evidence.kind``: DCAP for "tdx"/"sgx", AMD's chain for "sev-snp" (with the
    guest's certificate table from ``extra["auxblob"]`` when it sent one), the simulated
    verifier for tests."""
    when = _as_utc(now) if now else datetime.now(UTC)
    if evidence.kind == "simulated":
        if simulated_verifier is None:
            raise AttestationError(
                "peer sent simulated evidence but simulated attestation is not allowed"
            )
        return simulated_verifier.verify(evidence.quote, when)
    if evidence.kind in ("tdx", "sgx"):
        return verify_quote(evidence.quote, collateral_json, pccs_url, when)
    if evidence.kind == "sev-snp":
        table = evidence.extra.get("auxblob")
        if table is not None and not isinstance(table, bytes):
            raise AttestationError("malformed evidence: SNP certificate table is not bytes")
        return verify_snp(evidence.quote, snp_collateral, when, guest_table=table)
    raise AttestationError(
        f"no verifier for {evidence.kind!r} evidence (from {evidence.provider}); "
        "Intel TDX/SGX DCAP quotes and AMD SEV-SNP reports are verified"
    )


def verify_snp(
    report: bytes,
    collateral: SnpCollateral | None,
    now: datetime,
    *,
    guest_table: bytes | None = None,
) -> QuoteVerdict:
    """Verify an SEV-SNP report (see ``teefl.security.tee.snp``) and return its verdict."""
    from teefl.security.tee.snp import SnpCollateral, verify_snp_evidence

    verified, fields = verify_snp_evidence(
        report, guest_table, collateral or SnpCollateral(), _as_utc(now)
    )
    rep = verified.report
    return QuoteVerdict(
        tee_type="sev-snp",
        quote_version=rep.version,
        status="n/a",
        advisory_ids=(),
        report_data=rep.report_data,
        measurements={
            "measurement": rep.measurement.hex(),
            "host_data": rep.host_data.hex(),
            "id_key_digest": rep.id_key_digest.hex(),
            "author_key_digest": rep.author_key_digest.hex(),
            "family_id": rep.family_id.hex(),
            "image_id": rep.image_id.hex(),
        },
        verified_at=_as_utc(now),
        details={"snp": fields},
    )


def verify_any(
    data: bytes,
    *,
    collateral_json: str | None = None,
    pccs_url: str | None = None,
    snp_collateral: SnpCollateral | None = None,
    now: datetime,
    allow_simulated: bool = False,
) -> QuoteVerdict:
    """Verify a quote or report file whose format is detected: SEV-SNP report (1184 bytes,
    version 2-5), simulated quote (magic), else an Intel DCAP quote (`teefl tee verify`)."""
    from teefl.security.tee.simulated import SIMULATED_MAGIC
    from teefl.security.tee.snp import looks_like_snp_report

    if looks_like_snp_report(data):
        return verify_snp(data, snp_collateral, now)
    if data.startswith(SIMULATED_MAGIC):
        if not allow_simulated:
            raise AttestationError("simulated quote: pass --allow-simulated (tests only)")
        return SimulatedVerifier(allow_simulated=True).verify(data, now)
    return verify_quote(data, collateral_json, pccs_url, now)


__all__ = [
    "BINDING_SIZE",
    "NONCE_SIZE",
    "AttestationError",
    "AttestationPolicies",
    "Policy",
    "QuoteVerdict",
    "SimulatedVerifier",
    "check_policy",
    "enforce_policy",
    "policy_block",
    "report_data_for",
    "require_pinned",
    "spki_der_of",
    "verify_any",
    "verify_evidence",
    "verify_quote",
    "verify_snp",
]
