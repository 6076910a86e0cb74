"""The Intel DCAP quote format: the measured identity and REPORTDATA read from an SGX or TDX
quote's header and report body, with offsets from Intel's quote format specification -- so the
policy never depends on a library's JSON shape. Nothing here checks a signature
(`teefl.security.tee.verify.verify_quote` does).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from teefl.security.tee.errors import AttestationError

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


__all__ = ["HEADER_SIZE", "TEE_TYPE_SGX", "TEE_TYPE_TDX", "QuoteFields", "parse_quote_fields"]
