"""What a verifier concluded about one piece of evidence (kept light: no crypto imports, so the
plan can name policy types without loading the verifiers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class QuoteVerdict:
    """Evidence that passed cryptographic verification, with what it says about the platform.

    ``tee_type``: "tdx" | "sgx" | "sev-snp" | "simulated". ``status`` is Intel's TCB status for
    TDX/SGX, "n/a" for SEV-SNP (whose TCB the policy's ``snp.min_tcb`` judges), "Simulated" for
    simulated evidence. ``details`` carries the SNP fields (``snp``) and the simulated signing
    key (``signing_key_sha256``) that the policy reads.
    """

    tee_type: str
    quote_version: int
    status: str
    advisory_ids: tuple[str, ...]
    report_data: bytes
    measurements: dict[str, str]
    isv_prod_id: int | None = None
    isv_svn: int | None = None
    verified_at: datetime | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def simulated(self) -> bool:
        return self.tee_type == "simulated"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tee_type": self.tee_type,
            "quote_version": self.quote_version,
            "status": self.status,
            "advisory_ids": list(self.advisory_ids),
            "report_data": self.report_data.hex(),
            "measurements": dict(self.measurements),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "verified_at": self.verified_at.isoformat() if self.verified_at else None,
            "details": self.details,
        }


__all__ = ["QuoteVerdict"]
