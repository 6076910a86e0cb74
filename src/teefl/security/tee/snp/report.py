"""The SEV-SNP ATTESTATION_REPORT: 1184 bytes, parsed with the offsets of AMD's ABI spec.

Why our own parser: the policy must never depend on a library's idea of which fields exist, and
the signed region (bytes 0x000-0x29F) is checked over the very bytes we parse. Offsets follow
"SEV Secure Nested Paging Firmware ABI Specification" (AMD 56860), table ATTESTATION_REPORT;
TCB_VERSION's layout depends on the product (Milan/Genoa vs Turin), so decoding it needs the
product, which comes from the report's CPUID fields (version 3 and later) or from the VCEK.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from teefl.security.tee.errors import AttestationError

REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0  # bytes 0x000..0x29F are signed; 0x330..0x49F are reserved and NOT signed
SIG_R = 0x2A0
SIG_S = 0x2E8
SIG_COMPONENT = 72  # little-endian, the top 24 bytes zero for P-384

#: guest POLICY bits (ABI spec table "Guest Policy Structure")
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
#: PLATFORM_INFO bits
PLATFORM_SMT_EN = 1 << 0
PLATFORM_TSME_EN = 1 << 1

PRODUCTS = ("Milan", "Genoa", "Turin")
TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode")


def product_from_cpuid(family: int, model: int) -> str | None:
    """AMD product line from the report's CPUID family/model (reports of version >= 3).

    Family 19h models 00h-0Fh are Milan, 10h-1Fh Genoa, A0h-AFh Bergamo/Siena (Genoa keys);
    family 1Ah models 00h-11h are Turin. Anything else is unknown and left to the VCEK.
    """
    if family == 0x19:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    if family == 0x1A and model <= 0x11:
        return "Turin"
    return None


@dataclass(frozen=True)
class TcbVersion:
    """One TCB_VERSION (8 bytes). ``fmc`` exists on Turin only."""

    raw: bytes
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, product: str | None) -> TcbVersion:
        """Milan/Genoa: [BL, TEE, 0, 0, 0, 0, SNP, UCODE]; Turin: [FMC, BL, TEE, SNP, 0, 0, 0,
        UCODE]. An unknown product is decoded with the Milan/Genoa layout (every report of
        version 2, which has no CPUID fields, predates Turin)."""
        raw = bytes(raw)
        if product == "Turin":
            return cls(raw, raw[1], raw[2], raw[3], raw[7], fmc=raw[0])
        return cls(raw, raw[0], raw[1], raw[6], raw[7])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }
        if self.fmc is not None:
            out["fmc"] = self.fmc
        out["raw"] = self.raw.hex()
        return out

    def __str__(self) -> str:
        fmc = f"fmc={self.fmc} " if self.fmc is not None else ""
        return (
            f"{fmc}bootloader={self.bootloader} tee={self.tee} snp={self.snp} "
            f"microcode={self.microcode}"
        )


@dataclass(frozen=True)
class SnpReport:
    """Every field of the report that a verifier or a policy reads."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    chip_id: bytes
    cpuid: tuple[int, int, int] | None  # family, model, stepping (version >= 3)
    current_version: tuple[int, int, int]  # major, minor, build
    committed_version: tuple[int, int, int]
    raw_current_tcb: bytes
    raw_reported_tcb: bytes
    raw_committed_tcb: bytes
    raw_launch_tcb: bytes
    signature_r: bytes
    signature_s: bytes

    # -- flags -------------------------------------------------------------------------------
    @property
    def author_key_en(self) -> int:
        return self.flags & 1

    @property
    def mask_chip_key(self) -> int:
        return (self.flags >> 1) & 1

    @property
    def signing_key(self) -> int:
        """0 = VCEK, 1 = VLEK, 7 = none."""
        return (self.flags >> 2) & 7

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def smt_allowed(self) -> bool:
        return bool(self.policy & POLICY_SMT)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @property
    def smt_enabled(self) -> bool:
        return bool(self.platform_info & PLATFORM_SMT_EN)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def product(self) -> str | None:
        return product_from_cpuid(self.cpuid[0], self.cpuid[1]) if self.cpuid else None

    def tcb(self, which: str, product: str | None = None) -> TcbVersion:
        """``which``: current | reported | committed | launch, decoded for ``product``."""
        raw = getattr(self, f"raw_{which}_tcb")
        return TcbVersion.decode(raw, product or self.product)

    def to_dict(self, product: str | None = None) -> dict[str, Any]:
        """JSON-safe view (hex for bytes), kept in verdict files and read by the SNP policy."""
        product = product or self.product
        out: dict[str, Any] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": f"{self.policy:#x}",
            "debug": self.debug,
            "smt_allowed": self.smt_allowed,
            "migrate_ma": self.migrate_ma,
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "signing_key": {0: "vcek", 1: "vlek", 7: "none"}.get(self.signing_key, "reserved"),
            "mask_chip_key": self.mask_chip_key,
            "author_key_en": self.author_key_en,
            "platform_info": f"{self.platform_info:#x}",
            "smt_enabled": self.smt_enabled,
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "chip_id": self.chip_id.hex(),
            "product": product,
            "current_version": ".".join(map(str, self.current_version)),
            "reported_tcb": self.tcb("reported", product).to_dict(),
            "current_tcb": self.tcb("current", product).to_dict(),
            "committed_tcb": self.tcb("committed", product).to_dict(),
            "launch_tcb": self.tcb("launch", product).to_dict(),
        }
        if self.cpuid is not None:
            out["cpuid"] = {"family": self.cpuid[0], "model": self.cpuid[1], "step": self.cpuid[2]}
        return out


def looks_like_snp_report(data: bytes) -> bool:
    """Format detection for `teefl tee verify`: exactly 1184 bytes, version 2..5, algo 1.

    A DCAP quote starts with version 3/4/5 and attestation key type 2/3 as two u16, so its first
    u32 is >= 0x20003 and cannot pass for an SNP report version.
    """
    if len(data) != REPORT_SIZE:
        return False
    version, algo = struct.unpack_from("<I", data, 0)[0], struct.unpack_from("<I", data, 0x34)[0]
    return 2 <= version <= 5 and algo == 1


def parse_report(data: bytes) -> SnpReport:
    """Parse an ATTESTATION_REPORT; no signature is checked here (see ``verify``)."""
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise AttestationError(
            f"SNP report must be {REPORT_SIZE} bytes, got {len(data)} (is it a raw report, not a "
            "hex dump or an Azure HCL report?)"
        )
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
    if version < 2:
        raise AttestationError(f"SNP report version {version} is not supported (need >= 2)")
    vmpl, algo = struct.unpack_from("<II", data, 0x30)
    (platform_info,) = struct.unpack_from("<Q", data, 0x40)
    (flags,) = struct.unpack_from("<I", data, 0x48)
    cpuid = tuple(data[0x188:0x18B]) if version >= 3 else None

    def take(off: int, size: int) -> bytes:
        return data[off : off + size]

    return SnpReport(
        raw=data,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=take(0x10, 16),
        image_id=take(0x20, 16),
        vmpl=vmpl,
        signature_algo=algo,
        platform_info=platform_info,
        flags=flags,
        report_data=take(0x50, 64),
        measurement=take(0x90, 48),
        host_data=take(0xC0, 32),
        id_key_digest=take(0xE0, 48),
        author_key_digest=take(0x110, 48),
        report_id=take(0x140, 32),
        report_id_ma=take(0x160, 32),
        chip_id=take(0x1A0, 64),
        cpuid=cpuid,  # type: ignore[arg-type]
        current_version=(data[0x1EA], data[0x1E9], data[0x1E8]),
        committed_version=(data[0x1EE], data[0x1ED], data[0x1EC]),
        raw_current_tcb=take(0x38, 8),
        raw_reported_tcb=take(0x180, 8),
        raw_committed_tcb=take(0x1E0, 8),
        raw_launch_tcb=take(0x1F0, 8),
        signature_r=take(SIG_R, SIG_COMPONENT),
        signature_s=take(SIG_S, SIG_COMPONENT),
    )
