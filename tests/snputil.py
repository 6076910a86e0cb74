"""A stand-in AMD for SEV-SNP tests: our own ARK -> ASK -> VCEK, and reports signed by that VCEK.

Genuine AMD material (../shared/testdata/attestation/snp) covers everything AMD signed; what it
cannot cover needs a signer we hold the keys of: a CRL that revokes the ASK, a report with the
migration agent allowed, a report bound to our own report data. This chain is trusted only where
a test passes its ARK in ``trusted_arks`` explicitly -- by default it is refused as an unknown
root, which is itself tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from teefl.security.tee.snp.certs import fingerprint
from teefl.security.tee.snp.report import SIG_COMPONENT, SIG_R, SIG_S, SIGNED_SIZE

SNP = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "attestation" / "snp"
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
AMD = "1.3.6.1.4.1.3704.1"
START = datetime(2024, 1, 1, tzinfo=UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Not Advanced Micro Devices (tests)"),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _ia5(text: str) -> bytes:
    return bytes([0x16, len(text)]) + text.encode()


def _ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


@dataclass
class FakeAmd:
    """One product's chain. RSA 2048 (AMD uses 4096) keeps key generation fast."""

    product: str = "Milan"
    ark_key: rsa.RSAPrivateKey = field(init=False)
    ask_key: rsa.RSAPrivateKey = field(init=False)
    ark: x509.Certificate = field(init=False)
    ask: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.ark_key = rsa.generate_private_key(65537, 2048)
        self.ask_key = rsa.generate_private_key(65537, 2048)
        ark_name = _name(f"ARK-{self.product}")
        self.ark = self._sign(
            x509.CertificateBuilder()
            .subject_name(ark_name)
            .issuer_name(ark_name)
            .public_key(self.ark_key.public_key())
            .serial_number(0x10000),
            self.ark_key,
        )
        self.ask = self._sign(
            x509.CertificateBuilder()
            .subject_name(_name(f"SEV-{self.product}"))
            .issuer_name(ark_name)
            .public_key(self.ask_key.public_key())
            .serial_number(0x10001),
            self.ark_key,
        )

    @property
    def trusted(self) -> dict[str, str]:
        return {fingerprint(self.ark): self.product}

    @staticmethod
    def _sign(
        builder: x509.CertificateBuilder,
        key: rsa.RSAPrivateKey,
        start: datetime = START,
        days: int = 3650,
    ) -> x509.Certificate:
        return (
            builder.not_valid_before(start)
            .not_valid_after(start + timedelta(days=days))
            .sign(key, hashes.SHA384(), rsa_padding=PSS)
        )

    def vcek(
        self,
        chip_id: bytes,
        tcb: dict[str, int],
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        days: int = 2555,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A VCEK for ``chip_id`` at ``tcb`` (bootloader/tee/snp/microcode), and its key."""
        key = key or ec.generate_private_key(ec.SECP384R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK"))
            .issuer_name(self.ask.subject)
            .public_key(key.public_key())
            .serial_number(1)
            .add_extension(_ext(f"{AMD}.1", _der_int(0)), critical=False)
            .add_extension(_ext(f"{AMD}.2", _ia5(f"{self.product}-B0")), critical=False)
            .add_extension(_ext(f"{AMD}.3.1", _der_int(tcb["bootloader"])), critical=False)
            .add_extension(_ext(f"{AMD}.3.2", _der_int(tcb["tee"])), critical=False)
            .add_extension(_ext(f"{AMD}.3.3", _der_int(tcb["snp"])), critical=False)
            .add_extension(_ext(f"{AMD}.3.8", _der_int(tcb["microcode"])), critical=False)
            .add_extension(_ext(f"{AMD}.4", chip_id), critical=False)
        )
        return self._sign(builder, self.ask_key, days=days), key

    def crl(self, revoked_serials: list[int], *, days: int = 365) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark.subject)
            .last_update(START)
            .next_update(START + timedelta(days=days))
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(START + timedelta(days=1))
                .build()
            )
        return builder.sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS)


def synthetic_report(policy: int = 0x30000, vmpl: int = 0, report_data: bytes = bytes(64)) -> bytes:
    """A version-2 Milan report with the fields a test sets (signed later by ``sign_report``)."""
    out = bytearray(0x4A0)
    out[0:4] = (2).to_bytes(4, "little")
    out[0x08:0x10] = policy.to_bytes(8, "little")
    out[0x30:0x34] = vmpl.to_bytes(4, "little")
    out[0x34:0x38] = (1).to_bytes(4, "little")  # ECDSA P-384 with SHA-384
    out[0x50:0x90] = report_data
    out[0x90:0xC0] = bytes.fromhex("ab" * 48)
    tcb = bytes([3, 0, 0, 0, 0, 0, 8, 115])
    out[0x38:0x40] = out[0x180:0x188] = out[0x1E0:0x1E8] = out[0x1F0:0x1F8] = tcb
    out[0x1A0:0x1E0] = bytes(range(64))
    return bytes(out)


def milan_fields(report: bytes) -> tuple[bytes, dict[str, int]]:
    """CHIP_ID and REPORTED_TCB (Milan layout) of a report, to issue a VCEK that fits it."""
    raw = report[0x180:0x188]
    tcb = {"bootloader": raw[0], "tee": raw[1], "snp": raw[6], "microcode": raw[7]}
    return report[0x1A0:0x1E0], tcb


def sign_report(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign bytes 0x000-0x29F like the AMD-SP: ECDSA P-384/SHA-384, r and s little-endian."""
    r, s = decode_dss_signature(key.sign(report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384())))
    out = bytearray(report)
    out[SIG_R : SIG_R + SIG_COMPONENT] = r.to_bytes(SIG_COMPONENT, "little")
    out[SIG_S : SIG_S + SIG_COMPONENT] = s.to_bytes(SIG_COMPONENT, "little")
    return bytes(out)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
