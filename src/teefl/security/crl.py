"""Revoking certificates of a federation's CA: ``<dir>/ca.crl``, signed by the CA, and the check
every verifier of a peer's certificate makes against it (current, signed by the plan's CA)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teefl.errors import TeeflError
from teefl.security.certificates import (
    CLOCK_SKEW,
    SIGNATURE_HASH,
    ca_paths,
    check_signed_by,
    format_time,
    load_ca,
    load_certificate,
    now_utc,
    read_file,
    write_file,
)

CA_CRL = "ca.crl"


def crl_path(directory: Path) -> Path:
    """Where `revoke` keeps the CA's certificate revocation list: ``<dir>/ca.crl``."""
    return Path(directory) / CA_CRL


def _read_crl(path: Path) -> x509.CertificateRevocationList:
    data = read_file(path, "certificate revocation list")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise TeeflError(f"{path} is not a certificate revocation list (PEM or DER)") from None


def load_crl(path: Path, ca_path: Path, now: dt.datetime | None = None) -> frozenset[int]:
    """The serial numbers a CRL revokes, after checking that the plan's CA signed it and that it
    is current. A CRL past its next update is refused: an out-of-date list may be missing the
    latest revocations, and failing closed is the safe side (refresh it with
    ``teefl pki revoke DIR``)."""
    crl = _read_crl(Path(path))
    ca = load_certificate(ca_path)
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise TeeflError(f"certificate revocation list {path} is not signed by CA {ca_path}")
    now = now or now_utc()
    nxt = crl.next_update_utc
    if nxt is not None and now > nxt:
        raise TeeflError(
            f"certificate revocation list {path} expired on {format_time(nxt)}; refresh it with: "
            "teefl pki revoke DIR"
        )
    return frozenset(entry.serial_number for entry in crl)


def revoke(
    directory: Path,
    *,
    certificates: list[Path] | None = None,
    serials: list[int] | None = None,
    days: int = 365,
) -> tuple[Path, list[int]]:
    """Add certificates (by file or serial) to ``<dir>/ca.crl``, signed by the CA, and return
    (its path, the serials added). With nothing to add, the list is re-signed with a new next
    update (refreshed). Earlier entries are kept; the file is replaced atomically."""
    directory = Path(directory)
    ca_cert, ca_key = load_ca(directory)
    path = crl_path(directory)
    entries: dict[int, x509.RevokedCertificate] = {}
    if path.exists():
        old = _read_crl(path)
        if old.issuer != ca_cert.subject or not old.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            raise TeeflError(f"{path} is not signed by the CA of {directory}; move it away first")
        entries = {e.serial_number: e for e in old}
    added: list[int] = []
    now = now_utc()
    wanted = list(serials or [])
    for cert_path in certificates or []:
        cert = load_certificate(cert_path)
        check_signed_by(cert, cert_path, ca_cert, ca_paths(directory)[0])
        wanted.append(cert.serial_number)
    for serial in wanted:
        if serial in entries:
            continue
        entries[serial] = (
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
        added.append(serial)
    if days <= 0:
        raise TeeflError(f"--days must be positive, got {days}")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
    )
    for entry in entries.values():
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, SIGNATURE_HASH)
    write_file(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path, added
