"""Evidence verification: Intel DCAP quotes (via dcap-qvl), AMD SEV-SNP reports (``snp``), the
simulated stand-in; and, re-exported from ``policy``, the attestation policy.

Why three layers:

1. ``verify_quote`` answers "is this a genuine quote from an Intel platform, and what is that
   platform's TCB status at time ``now``?" -- signatures, certificate chain to Intel's root, CRLs
   and TCB info, all done by ``dcap_qvl`` against collateral from a file or a PCCS.
2. ``parse_quote_fields`` reads the measured identity (MRTD/RTMRs or MRENCLAVE/MRSIGNER) and the
   64-byte REPORTDATA from the quote body ourselves, with offsets from Intel's quote format
   specification, so the policy never depends on a library's JSON shape.
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
import struct
from collections.abc import Sequence
from dataclasses import dataclass
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

# Quote layout (Intel SGX/TDX DCAP Quote Library, "Quote Format"): a 48-byte header, then the
# report body. v3 = SGX (384-byte enclave report), v4 = SGX or TDX (tee_type 0x81, 584-byte TD
# report 1.0), v5 = a 2-byte body type and 4-byte body size before the body.
HEADER_SIZE = 48
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081

# Offsets inside an SGX enclave report body (add the body start).
_SGX_FIELDS = {
    "cpu_svn": (0, 16),
    "attributes": (48, 16),
    "mrenclave": (64, 32),
    "mrsigner": (128, 32),
    "isv_prod_id": (256, 2),
    "isv_svn": (258, 2),
    "report_data": (320, 64),
}
_SGX_BODY_SIZE = 384

# Offsets inside a TDX TD report 1.0 body; 1.5 appends tee_tcb_svn2 (16) and mrservicetd (48).
_TDX_FIELDS = {
    "tee_tcb_svn": (0, 16),
    "mr_seam": (16, 48),
    "td_attributes": (120, 8),
    "xfam": (128, 8),
    "mrtd": (136, 48),
    "mr_config_id": (184, 48),
    "mr_owner": (232, 48),
    "mr_owner_config": (280, 48),
    "rtmr0": (328, 48),
    "rtmr1": (376, 48),
    "rtmr2": (424, 48),
    "rtmr3": (472, 48),
    "report_data": (520, 64),
}
_TDX10_BODY_SIZE = 584
_TDX15_BODY_SIZE = 648


# --------------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------------


#: bytes of the configuration binding (a SHA-256, see `teefl.federation.attest.config_binding`)
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
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteFields:
    """Identity fields read from a quote body (hex strings for byte fields)."""

    version: int
    tee_type: str  # "tdx" | "sgx"
    attestation_key_type: int
    report_data: bytes
    measurements: dict[str, str]
    isv_prod_id: int | None = None
    isv_svn: int | None = None


def parse_quote_fields(quote: bytes) -> QuoteFields:
    """Parse header and report body of an SGX (v3/v4) or TDX (v4/v5) DCAP quote.

    This does not check any signature: use it only on a quote that ``verify_quote`` accepted, or
    to display what a quote *claims*.
    """
    if len(quote) < HEADER_SIZE:
        raise AttestationError(f"quote truncated: {len(quote)} bytes, header needs {HEADER_SIZE}")
    version, key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    if version in (3, 4):
        body_start = HEADER_SIZE
        if tee_type == TEE_TYPE_SGX:
            kind, body_size = "sgx", _SGX_BODY_SIZE
        elif tee_type == TEE_TYPE_TDX and version == 4:
            kind, body_size = "tdx", _TDX10_BODY_SIZE
        else:
            raise AttestationError(f"unsupported quote: version {version}, tee_type {tee_type:#x}")
    elif version == 5:
        if len(quote) < HEADER_SIZE + 6:
            raise AttestationError("quote truncated: v5 body descriptor missing")
        body_type, body_size = struct.unpack_from("<HI", quote, HEADER_SIZE)
        body_start = HEADER_SIZE + 6
        kinds = {1: "sgx", 2: "tdx", 3: "tdx"}
        if body_type not in kinds:
            raise AttestationError(f"unsupported v5 quote body type {body_type}")
        kind = kinds[body_type]
    else:
        raise AttestationError(f"unsupported quote version {version}")
    if len(quote) < body_start + body_size:
        raise AttestationError(
            f"quote truncated: {len(quote)} bytes, report body ends at {body_start + body_size}"
        )
    table = _SGX_FIELDS if kind == "sgx" else _TDX_FIELDS

    def take(name: str) -> bytes:
        off, size = table[name]
        return quote[body_start + off : body_start + off + size]

    measurements = {name: take(name).hex() for name in table if name != "report_data"}
    isv_prod_id = isv_svn = None
    if kind == "sgx":
        isv_prod_id = int.from_bytes(take("isv_prod_id"), "little")
        isv_svn = int.from_bytes(take("isv_svn"), "little")
        measurements.pop("isv_prod_id")
        measurements.pop("isv_svn")
    return QuoteFields(
        version=version,
        tee_type=kind,
        attestation_key_type=key_type,
        report_data=take("report_data"),
        measurements=measurements,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
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
    "QuoteFields",
    "QuoteVerdict",
    "SimulatedVerifier",
    "check_policy",
    "enforce_policy",
    "parse_quote_fields",
    "policy_block",
    "report_data_for",
    "require_pinned",
    "spki_der_of",
    "verify_any",
    "verify_evidence",
    "verify_quote",
    "verify_snp",
]
