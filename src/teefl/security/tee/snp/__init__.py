"""AMD SEV-SNP: the attestation report, AMD's certificate chain and the SNP policy.

- ``report``: parse the 1184-byte ATTESTATION_REPORT (AMD ABI spec 56860 offsets);
- ``certs``: AMD's RSA-PSS certificates, their extensions, the pinned ARK roots, CRLs;
- ``verify``: one report against one chain at one instant;
- ``collateral``: where the chain comes from (guest certificate table, plan files, AMD KDS);
- ``policy``: debug, minimum TCB, measurements, host data, key digests, VMPL, SMT.

``verify_snp_evidence`` ties them together for ``teefl.security.tee.verify.verify_evidence``.
"""

from __future__ import annotations

import importlib
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teefl.security.tee.snp.collateral import SnpCollateral
    from teefl.security.tee.snp.verify import SnpVerified

_EXPORTS = {
    "KdsClient": "collateral",
    "SnpCollateral": "collateral",
    "build_cert_table": "collateral",
    "parse_cert_table": "collateral",
    "SnpPolicy": "policy",
    "SnpTcb": "policy",
    "check_snp": "policy",
    "REPORT_SIZE": "report",
    "SIGNED_SIZE": "report",
    "SnpReport": "report",
    "TcbVersion": "report",
    "looks_like_snp_report": "report",
    "parse_report": "report",
    "SnpChain": "verify",
    "SnpVerified": "verify",
    "verify_report": "verify",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def verify_snp_evidence(
    report_bytes: bytes, guest_table: bytes | None, collateral: SnpCollateral, now: datetime
) -> tuple[SnpVerified, dict[str, Any]]:
    """Resolve the chain for a report (guest table, files, KDS), verify it, and return it with
    the JSON-safe fields the policy reads (``snp`` in the verdict's details)."""
    from teefl.security.tee.snp.report import parse_report
    from teefl.security.tee.snp.verify import SnpChain, verify_report

    report = parse_report(report_bytes)
    key_cert, ask, ark, crls = collateral.resolve(report, guest_table, now)
    verified = verify_report(
        report_bytes,
        SnpChain(key_cert, ask, ark, tuple(crls)),
        now,
        trusted_arks=collateral.trusted_arks,
        require_crl=collateral.require_crl,
    )
    fields = report.to_dict(verified.product)
    fields.update(
        signer=verified.signer,
        key_cert_sha256=verified.key_cert_sha256,
        ark_sha256=verified.ark_sha256,
        crl_checked=verified.crl_checked,
    )
    if verified.csp_id:
        fields["csp_id"] = verified.csp_id
    return verified, fields


__all__ = [
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "KdsClient",
    "SnpChain",
    "SnpCollateral",
    "SnpPolicy",
    "SnpReport",
    "SnpTcb",
    "SnpVerified",
    "TcbVersion",
    "build_cert_table",
    "check_snp",
    "looks_like_snp_report",
    "parse_cert_table",
    "parse_report",
    "verify_report",
    "verify_snp_evidence",
]
