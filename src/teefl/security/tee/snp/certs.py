"""AMD's certificates for SEV-SNP: the ARK -> ASK -> VCEK (or ARK -> ASVK -> VLEK) chain.

Every AMD certificate is signed with RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48; we verify that
signature explicitly (not through a generic path validator, which does not know AMD's
extensions). The trust anchor is an ARK whose SHA-256 (over its DER) is one of AMD's published
roots below, or one a caller adds; an ARK that merely claims the name "ARK-Milan" is refused.

The VCEK/VLEK carry AMD extensions (AMD spec 57230, "Versioned Chip Endorsement Key (VCEK)
Certificate and KDS Interface Specification"): the TCB security patch levels (SPL) the key was
derived for, the chip's hwID (VCEK) or the cloud provider's cspID (VLEK), and the product name.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from teefl.security.tee.errors import AttestationError

#: SHA-256 of the DER encoding of AMD's root keys (ARK), product by product. The same
#: certificates are served by AMD's KDS (``/vcek/v1/<product>/cert_chain``) and copied
#: byte-identically in go-sev-guest, virtee/sev, Trustee, openpcc and Project Oak.
AMD_ARKS: dict[str, str] = {
    "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd": "Milan",
    "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1": "Genoa",
    "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a": "Turin",
}

RSASSA_PSS_OID = "1.2.840.113549.1.1.10"
_AMD = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = x509.ObjectIdentifier(f"{_AMD}.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_AMD}.2")
OID_BL_SPL = x509.ObjectIdentifier(f"{_AMD}.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(f"{_AMD}.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(f"{_AMD}.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(f"{_AMD}.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(f"{_AMD}.3.9")
OID_HWID = x509.ObjectIdentifier(f"{_AMD}.4")
OID_CSP_ID = x509.ObjectIdentifier(f"{_AMD}.5")

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle or one DER certificate.

    AMD's VCEKs and VLEKs all have serial number 0, which cryptography >= 42 loads with a
    CryptographyDeprecationWarning ("will cause an exception in a future release"); the warning
    is silenced here only, so a run with ``-W error`` can still verify genuine AMD keys.
    """
    data = bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                return list(x509.load_pem_x509_certificates(data))
            return [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            raise AttestationError(f"SNP collateral: not a certificate ({exc})") from None


def load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    data = bytes(data)
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            out = []
            for block in data.split(b"-----END X509 CRL-----")[:-1]:
                out.append(x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n"))
            return out
        return [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise AttestationError(f"SNP collateral: not a CRL ({exc})") from None


# --------------------------------------------------------------------------------------------
# AMD extensions
# --------------------------------------------------------------------------------------------


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    return bytes(getattr(value, "value", b""))


def _der_int(raw: bytes, what: str) -> int:
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2 or raw[1] > 8:
        raise AttestationError(f"key certificate: {what} is not a DER INTEGER")
    return int.from_bytes(raw[2:], "big", signed=True)


def _der_string(raw: bytes) -> str:
    if len(raw) >= 2 and raw[0] in (0x0C, 0x13, 0x16) and raw[1] == len(raw) - 2:
        return raw[2:].decode("ascii", "replace")
    return raw.decode("ascii", "replace")


@dataclass(frozen=True)
class KeyCertInfo:
    """What a VCEK or VLEK certificate says about itself."""

    kind: str  # "vcek" | "vlek"
    product_name: str | None  # e.g. "Milan-B0", "Genoa", "Turin"
    hwid: bytes | None
    csp_id: str | None
    spl: dict[str, int]  # bootloader, tee, snp, microcode (+ fmc on Turin)

    @property
    def product(self) -> str | None:
        """The product line ("Milan-B0" -> "Milan")."""
        return self.product_name.split("-")[0] if self.product_name else None


def key_cert_info(cert: x509.Certificate) -> KeyCertInfo:
    """Read AMD's extensions from a VCEK/VLEK; a certificate without SPLs is not one."""
    spl: dict[str, int] = {}
    for name, oid in (
        ("bootloader", OID_BL_SPL),
        ("tee", OID_TEE_SPL),
        ("snp", OID_SNP_SPL),
        ("microcode", OID_UCODE_SPL),
        ("fmc", OID_FMC_SPL),
    ):
        raw = _ext(cert, oid)
        if raw is not None:
            spl[name] = _der_int(raw, name)
    if not {"bootloader", "tee", "snp", "microcode"} <= set(spl):
        raise AttestationError(
            f"certificate {common_name(cert.subject)} is not a VCEK/VLEK (no TCB SPL extensions)"
        )
    hwid = _ext(cert, OID_HWID)
    if hwid is not None and len(hwid) in (10, 66) and hwid[0] == 0x04 and hwid[1] == len(hwid) - 2:
        hwid = hwid[2:]  # hwID wrapped in an OCTET STRING (seen in newer-format look-alikes)
    csp = _ext(cert, OID_CSP_ID)
    product = _ext(cert, OID_PRODUCT_NAME)
    return KeyCertInfo(
        kind="vlek" if csp is not None or hwid is None else "vcek",
        product_name=_der_string(product) if product is not None else None,
        hwid=hwid,
        csp_id=_der_string(csp) if csp is not None else None,
        spl=spl,
    )


def is_key_cert(cert: x509.Certificate) -> bool:
    return _ext(cert, OID_BL_SPL) is not None


def is_ark(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and common_name(cert.subject).startswith("ARK-")


def is_ask(cert: x509.Certificate) -> bool:
    """ASK (SEV-<product>) or ASVK (SEV-VLEK-<product>): issued by an ARK."""
    return common_name(cert.subject).startswith("SEV-") and common_name(cert.issuer).startswith(
        "ARK-"
    )


# --------------------------------------------------------------------------------------------
# Signatures, validity, revocation
# --------------------------------------------------------------------------------------------


def check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """``cert`` names ``issuer`` and carries its RSA-PSS/SHA-384 signature, or AttestationError."""
    name, issuer_name = common_name(cert.subject), common_name(issuer.subject)
    if cert.issuer != issuer.subject:
        raise AttestationError(
            f"{what} {name} is issued by {common_name(cert.issuer)}, not by {issuer_name}"
        )
    if cert.signature_algorithm_oid.dotted_string != RSASSA_PSS_OID:
        raise AttestationError(f"{what} {name} is not signed with RSASSA-PSS")
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(f"{issuer_name} does not hold an RSA key")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise AttestationError(
            f"{what} {name} signature invalid: not signed by {issuer_name}"
        ) from None


def check_validity(cert: x509.Certificate, what: str, now: datetime) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise AttestationError(
            f"{what} {common_name(cert.subject)} not yet valid at {now.isoformat()} "
            f"(valid from {start.isoformat()})"
        )
    if now > end:
        raise AttestationError(
            f"{what} {common_name(cert.subject)} expired at {end.isoformat()} "
            f"(verification time {now.isoformat()})"
        )


def check_crl(crl: x509.CertificateRevocationList, ark: x509.Certificate, now: datetime) -> None:
    """The CRL is the ARK's (name and RSA-PSS signature) and fresh at ``now``."""
    if crl.issuer != ark.subject:
        raise AttestationError(
            f"CRL issued by {common_name(crl.issuer)}, not by {common_name(ark.subject)}"
        )
    if crl.signature_algorithm_oid.dotted_string != RSASSA_PSS_OID:
        raise AttestationError("CRL is not signed with RSASSA-PSS")
    key = ark.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(f"{common_name(ark.subject)} does not hold an RSA key")
    try:
        key.verify(crl.signature, crl.tbs_certlist_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise AttestationError(
            f"CRL signature invalid: not signed by {common_name(ark.subject)}"
        ) from None
    if now < crl.last_update_utc:
        raise AttestationError(f"CRL not yet valid at {now.isoformat()}")
    if crl.next_update_utc is None or now > crl.next_update_utc:
        nxt = crl.next_update_utc.isoformat() if crl.next_update_utc else "never"
        raise AttestationError(
            f"CRL of {common_name(ark.subject)} is stale (nextUpdate {nxt}, verification time "
            f"{now.isoformat()}): fetch a fresh one"
        )


def serial_number(cert: x509.Certificate) -> int:
    """The serial, read without the deprecation warning AMD's serial-0 VCEKs trigger."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return cert.serial_number


def check_not_revoked(
    cert: x509.Certificate, crl: x509.CertificateRevocationList, what: str
) -> None:
    serial = serial_number(cert)
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    if entry is not None:
        raise AttestationError(
            f"{what} {common_name(cert.subject)} (serial {serial:#x}) is revoked "
            f"by the CRL of {common_name(crl.issuer)} since {entry.revocation_date_utc.isoformat()}"
        )


__all__ = [
    "AMD_ARKS",
    "KeyCertInfo",
    "check_crl",
    "check_not_revoked",
    "check_signed_by",
    "check_validity",
    "common_name",
    "fingerprint",
    "is_ark",
    "is_ask",
    "is_key_cert",
    "key_cert_info",
    "load_certificates",
    "load_crls",
    "serial_number",
]
