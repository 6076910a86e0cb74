"""Verify one SEV-SNP report against its key certificate and AMD chain, at one instant.

Order of checks (each failure raises AttestationError naming it):

1. the report parses (1184 bytes, version >= 2, SIGNATURE_ALGO 1 = ECDSA P-384/SHA-384);
2. the ARK is self-signed and one of the trusted AMD roots (by SHA-256 of its DER);
3. ARK -> ASK (or ASVK) -> VCEK (or VLEK), each RSA-PSS/SHA-384, each inside its validity window
   at ``now``; with a CRL of that ARK: the CRL's signature and freshness, ASK and key not revoked;
4. the key certificate fits the report: VCEK vs VLEK as the report's SIGNING_KEY says, the same
   product as the chain, hwID = CHIP_ID (Turin: 8 bytes, the rest zero), and its TCB SPLs =
   REPORTED_TCB (the TCB the key was derived for; CURRENT_TCB may be newer);
5. the ECDSA P-384 signature (r, s little-endian at 0x2A0/0x2E8) over bytes 0x000-0x29F.

Nothing here is policy (debug, measurements, minimum TCB): that is ``snp.policy``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from teefl.security.tee.errors import AttestationError
from teefl.security.tee.snp.certs import (
    AMD_ARKS,
    check_crl,
    check_not_revoked,
    check_signed_by,
    check_validity,
    common_name,
    fingerprint,
    key_cert_info,
)
from teefl.security.tee.snp.report import SnpReport, TcbVersion, parse_report


@dataclass(frozen=True)
class SnpChain:
    """The certificates one report is checked with."""

    key_cert: x509.Certificate  # VCEK or VLEK
    ask: x509.Certificate  # ASK or ASVK
    ark: x509.Certificate
    crls: tuple[x509.CertificateRevocationList, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SnpVerified:
    """A report whose signature and chain verified, with what the chain said."""

    report: SnpReport
    product: str
    signer: str  # "vcek" | "vlek"
    reported_tcb: TcbVersion
    key_cert_sha256: str
    ark_sha256: str
    crl_checked: bool
    csp_id: str | None = None


def _ark_product(ark: x509.Certificate) -> str:
    return common_name(ark.subject).removeprefix("ARK-")


def check_report_signature(report: SnpReport, key_cert: x509.Certificate) -> None:
    key = key_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationError("report signature: the key certificate does not hold a P-384 key")
    r = int.from_bytes(report.signature_r, "little")
    s = int.from_bytes(report.signature_s, "little")
    if r == 0 or s == 0:
        raise AttestationError("report signature invalid: r or s is zero (unsigned report)")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            "report signature invalid: bytes 0x000-0x29F are not signed by the "
            f"{common_name(key_cert.subject)} key given (tampered report, or another chip's key)"
        ) from None


def verify_report(
    report_bytes: bytes,
    chain: SnpChain,
    now: datetime,
    *,
    trusted_arks: Mapping[str, str] | None = None,
    require_crl: bool = False,
) -> SnpVerified:
    """Run checks 1-5 above; return what verified or raise AttestationError."""
    report = parse_report(report_bytes)
    if report.signature_algo != 1:
        raise AttestationError(
            f"SNP report SIGNATURE_ALGO {report.signature_algo} is not 1 (ECDSA P-384 SHA-384)"
        )
    trusted = dict(AMD_ARKS if trusted_arks is None else trusted_arks)

    # 2. the root
    ark = chain.ark
    ark_fp = fingerprint(ark)
    if ark_fp not in trusted:
        raise AttestationError(
            f"ARK {common_name(ark.subject)} (sha256 {ark_fp[:16]}…) is not a trusted AMD root"
        )
    check_signed_by(ark, ark, "ARK")  # self-signed
    check_validity(ark, "ARK", now)
    product = _ark_product(ark)

    # 3. ASK/ASVK and the key certificate
    check_signed_by(chain.ask, ark, "ASK")
    check_validity(chain.ask, "ASK", now)
    info = key_cert_info(chain.key_cert)
    what = info.kind.upper()
    check_signed_by(chain.key_cert, chain.ask, what)
    check_validity(chain.key_cert, what, now)
    crls = [c for c in chain.crls if c.issuer == ark.subject]
    for crl in crls:
        check_crl(crl, ark, now)
        check_not_revoked(chain.ask, crl, "ASK")
        check_not_revoked(chain.key_cert, crl, what)
    if require_crl and not crls:
        raise AttestationError(
            f"no CRL of {common_name(ark.subject)} given, and the policy requires one"
        )

    # 4. the key certificate fits the report
    asvk = common_name(chain.ask.subject).startswith("SEV-VLEK-")
    if report.signing_key == 0 and (info.kind != "vcek" or asvk):
        raise AttestationError("the report is signed by a VCEK but the key certificate is a VLEK")
    if report.signing_key == 1 and (info.kind != "vlek" or not asvk):
        raise AttestationError(
            "the report is signed by a VLEK but the key certificate is a VCEK or chains to an ASK"
        )
    if report.signing_key not in (0, 1):
        raise AttestationError(f"SNP report SIGNING_KEY {report.signing_key}: not VCEK or VLEK")
    if info.product is not None and info.product != product:
        raise AttestationError(
            f"{what} is for {info.product_name}, but the chain is {common_name(ark.subject)}"
        )
    if report.product is not None and report.product != product:
        raise AttestationError(
            f"the report's CPUID says {report.product}, but the chain is {common_name(ark.subject)}"
        )
    if info.kind == "vcek":
        if report.mask_chip_key:
            raise AttestationError("MASK_CHIP_KEY is set: the report cannot be VCEK-signed")
        hwid = info.hwid or b""
        expected = hwid + bytes(64 - len(hwid)) if len(hwid) < 64 else hwid
        if expected != report.chip_id:
            raise AttestationError(
                f"VCEK hwID {hwid.hex()[:16]}… is not the report's CHIP_ID "
                f"{report.chip_id.hex()[:16]}… (the certificate of another chip)"
            )
    reported = report.tcb("reported", product)
    want = reported.to_dict()
    mismatched = [
        f"{name} {info.spl.get(name)} vs {want.get(name)}"
        for name in ("bootloader", "tee", "snp", "microcode", "fmc")
        if name in info.spl or (name == "fmc" and product == "Turin")
        if info.spl.get(name) != want.get(name)
    ]
    if mismatched:
        raise AttestationError(
            f"REPORTED_TCB ({reported}) is not the TCB the {what} was issued for: "
            + ", ".join(f"{m} (certificate vs report)" for m in mismatched)
        )

    # 5. the report's own signature
    check_report_signature(report, chain.key_cert)
    return SnpVerified(
        report=report,
        product=product,
        signer=info.kind,
        reported_tcb=reported,
        key_cert_sha256=fingerprint(chain.key_cert),
        ark_sha256=ark_fp,
        crl_checked=bool(crls),
        csp_id=info.csp_id,
    )


def find_issuer(
    cert: x509.Certificate, pool: Iterable[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in pool:
        if candidate.subject == cert.issuer:
            return candidate
    return None


__all__ = ["SnpChain", "SnpVerified", "check_report_signature", "find_issuer", "verify_report"]
