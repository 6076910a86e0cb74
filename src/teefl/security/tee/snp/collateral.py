"""Where the certificates for an SNP report come from: the guest, the plan's files, AMD's KDS.

Three sources, in this order of preference, all checked the same way afterwards (nothing here
is trusted: ``verify.verify_report`` checks every signature up to a pinned AMD root):

1. the guest's certificate table (configfs-tsm ``auxblob`` with provider ``sev_guest``, or the
   extended report of /dev/sev-guest): what the host loaded for this chip, usually VCEK/VLEK,
   ASK and ARK. Format (GHCB spec 56421, MSG_REPORT_REQ): 24-byte entries {GUID, offset u32,
   length u32}, ended by an all-zero entry, offsets from the start of the table;
2. certificate and CRL files named in the plan (``security.attestation.snp``);
3. AMD's Key Distribution Service, only when the plan allows network (``kds: true``), each
   answer cached on disk (a CRL is fetched again once it is past its nextUpdate).
"""

from __future__ import annotations

import logging
import os
import struct
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509

from teefl.security.tee.errors import AttestationError
from teefl.security.tee.snp.certs import (
    AMD_ARKS,
    common_name,
    fingerprint,
    is_ark,
    is_ask,
    is_key_cert,
    key_cert_info,
    load_certificates,
    load_crls,
)
from teefl.security.tee.snp.report import PRODUCTS, SnpReport

log = logging.getLogger("teefl.tee")

GUIDS = {
    "c0b406a4-a803-4952-9743-3fb6014cd0ae": "ark",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782": "ask",
    "63da758d-e664-4564-adc5-f4b93be8accd": "vcek",
    "a8074bc2-a25a-483e-aae6-39c045a0b8a1": "vlek",
    "92f81bc3-5811-4d3d-97ff-d19f88dc67ea": "crl",
}
_ENTRY = 24
_MAX_ENTRIES = 64

KDS_BASE = "https://kdsintf.amd.com"
KDS_TIMEOUT_S = 20.0


def guid_bytes(kind: str) -> bytes:
    """The table's GUID bytes for ``kind`` (RFC 4122 order, as the kernel and AMD tools write)."""
    for text, name in GUIDS.items():
        if name == kind:
            return uuid.UUID(text).bytes
    raise KeyError(kind)


def parse_cert_table(blob: bytes) -> list[tuple[str, bytes]]:
    """(kind, bytes) for each entry; kind is ark|ask|vcek|vlek|crl or the GUID of another entry.

    GUIDs are matched in RFC 4122 byte order and, leniently, in Microsoft's mixed-endian order:
    nothing depends on the label, since every certificate is classified again by its content.
    """
    blob = bytes(blob)
    known = {uuid.UUID(g).bytes: k for g, k in GUIDS.items()}
    known.update({uuid.UUID(g).bytes_le: k for g, k in GUIDS.items()})
    out: list[tuple[str, bytes]] = []
    for i in range(_MAX_ENTRIES):
        pos = i * _ENTRY
        if pos + _ENTRY > len(blob):
            raise AttestationError("SNP certificate table truncated (no terminating entry)")
        guid = blob[pos : pos + 16]
        offset, length = struct.unpack_from("<II", blob, pos + 16)
        if guid == bytes(16):
            return out
        if length == 0:  # an empty slot the host left: nothing to read
            continue
        if offset + length > len(blob):
            raise AttestationError(
                f"SNP certificate table entry {i} points outside the table ({offset}+{length})"
            )
        out.append((known.get(guid, str(uuid.UUID(bytes=guid))), blob[offset : offset + length]))
    raise AttestationError(f"SNP certificate table has more than {_MAX_ENTRIES} entries")


def build_cert_table(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """The inverse of ``parse_cert_table`` (tests, and tools that stage a table)."""
    entries = list(entries)
    header = (len(entries) + 1) * _ENTRY
    table, body = b"", b""
    for kind, data in entries:
        table += guid_bytes(kind) + struct.pack("<II", header + len(body), len(data))
        body += data
    return table + bytes(_ENTRY) + body


# --------------------------------------------------------------------------------------------
# AMD KDS (network; only when the plan allows it)
# --------------------------------------------------------------------------------------------


def _https_get(url: str) -> bytes:
    if not url.startswith(KDS_BASE + "/"):
        raise AttestationError(f"refusing to fetch SNP collateral from {url}")
    request = urllib.request.Request(url, headers={"User-Agent": "teefl"})
    try:
        with urllib.request.urlopen(request, timeout=KDS_TIMEOUT_S) as response:
            return response.read()
    except OSError as exc:
        raise AttestationError(f"AMD KDS fetch {url} failed: {exc}") from None


def default_kds_cache() -> Path:
    """$XDG_CACHE_HOME/teefl/amd-kds, else ~/.cache/teefl/amd-kds."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "teefl" / "amd-kds"


class KdsClient:
    """AMD KDS (AMD spec 57230): cert_chain, CRL and VCEK per product, cached under ``cache``.

    ``fetch`` is the transport (URL -> bytes); the default speaks HTTPS to kdsintf.amd.com only.
    KDS rate-limits its callers, hence the cache: a VCEK never changes for one chip and TCB, the
    chain for years; only CRLs are fetched again, when past their nextUpdate.
    """

    def __init__(self, cache: Path, fetch: Callable[[str], bytes] | None = None) -> None:
        self.cache = Path(cache)
        self.fetch = fetch or _https_get

    @staticmethod
    def _product(product: str | None) -> str:
        """Only AMD's product names reach a URL or a cache path (the name may come from an
        unverified certificate)."""
        if product not in PRODUCTS:
            raise AttestationError(f"AMD KDS: unknown product {product!r}")
        return product

    def _cached(self, rel: str, url: str, fresh: Callable[[bytes], bool] | None = None) -> bytes:
        path = self.cache / rel
        if path.is_file():
            data = path.read_bytes()
            if fresh is None or fresh(data):
                return data
        data = self.fetch(url)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        log.info("fetched SNP collateral %s", url)
        return data

    def chain(self, product: str, key: str = "vcek") -> list[x509.Certificate]:
        product = self._product(product)
        url = f"{KDS_BASE}/{key}/v1/{product}/cert_chain"
        return load_certificates(self._cached(f"{key}/{product}/cert_chain.pem", url))

    def crl(self, product: str, now: datetime, key: str = "vcek") -> x509.CertificateRevocationList:
        product = self._product(product)

        def fresh(data: bytes) -> bool:
            nxt = load_crls(data)[0].next_update_utc
            return nxt is not None and nxt >= now

        url = f"{KDS_BASE}/{key}/v1/{product}/crl"
        return load_crls(self._cached(f"{key}/{product}/crl.der", url, fresh))[0]

    def vcek(self, product: str, report: SnpReport) -> x509.Certificate:
        product = self._product(product)
        tcb = report.tcb("reported", product)
        hwid = report.chip_id[:8] if product == "Turin" else report.chip_id
        query = (
            f"blSPL={tcb.bootloader:02d}&teeSPL={tcb.tee:02d}&snpSPL={tcb.snp:02d}"
            f"&ucodeSPL={tcb.microcode:02d}"
        )
        if product == "Turin":
            query = f"fmcSPL={tcb.fmc or 0:02d}&" + query
        url = f"{KDS_BASE}/vcek/v1/{product}/{hwid.hex()}?{query}"
        rel = f"vcek/{product}/{hwid.hex()}-{tcb.raw.hex()}.der"
        return load_certificates(self._cached(rel, url))[0]


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


@dataclass
class SnpCollateral:
    """What a verifier has besides the report: plan files, an optional KDS, trust anchors."""

    certs: list[x509.Certificate] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    kds: KdsClient | None = None
    require_crl: bool = False
    trusted_arks: dict[str, str] = field(default_factory=lambda: dict(AMD_ARKS))

    @classmethod
    def from_files(
        cls,
        certs: Iterable[Path] = (),
        crls: Iterable[Path] = (),
        *,
        kds_cache: Path | None = None,
        require_crl: bool = False,
    ) -> SnpCollateral:
        """Load certificate/CRL files (PEM or DER); ``kds_cache`` set = KDS allowed (network)."""
        loaded, revocations = [], []
        for path in certs:
            loaded += load_certificates(_read(path))
        for path in crls:
            revocations += load_crls(_read(path))
        return cls(
            loaded,
            revocations,
            KdsClient(kds_cache) if kds_cache is not None else None,
            require_crl,
        )

    def resolve(
        self, report: SnpReport, guest_table: bytes | None, now: datetime
    ) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate, list]:
        """(key certificate, ASK/ASVK, ARK, CRLs) for ``report``; nothing here is trusted yet."""
        pool: list[x509.Certificate] = []
        crls = list(self.crls)
        if guest_table:
            for kind, data in parse_cert_table(guest_table):
                # the host fills this table: an entry that does not parse is skipped (said in
                # the log), since nothing in it is trusted before the chain check anyway
                try:
                    if kind == "crl":
                        crls += load_crls(data)
                    elif kind in ("ark", "ask", "vcek", "vlek"):
                        pool += load_certificates(data)
                except AttestationError as exc:
                    log.warning("SNP certificate table: %s entry skipped: %s", kind, exc)
        pool += self.certs
        want = "vlek" if report.signing_key == 1 else "vcek"
        key_cert = self._key_cert(report, pool, want)
        if key_cert is None and self.kds is not None and want == "vcek":
            product = report.product or "Milan"  # version-2 reports predate Genoa/Turin keys
            key_cert = self.kds.vcek(product, report)
        if key_cert is None:
            where = (
                "VLEKs are not on AMD's public KDS: the guest's certificate table or a plan file "
                "(security.attestation.snp.certs) must carry it"
                if want == "vlek"
                else "give it in security.attestation.snp.certs, let the host load it into the "
                "guest's certificate table, or allow security.attestation.snp.kds"
            )
            raise AttestationError(f"no {want.upper()} for this report: {where}")
        info = key_cert_info(key_cert)
        ask = next((c for c in pool if c.subject == key_cert.issuer and is_ask(c)), None)
        ark = None
        if ask is not None:
            arks = [c for c in pool if c.subject == ask.issuer and is_ark(c)]
            ark = next((c for c in arks if fingerprint(c) in self.trusted_arks), None)
            ark = ark or (arks[0] if arks else None)
        if (ask is None or ark is None) and self.kds is not None and info.product:
            fetched = self.kds.chain(info.product, want)
            ask = ask or next((c for c in fetched if c.subject == key_cert.issuer), None)
            if ask is not None:
                ark = next((c for c in fetched if c.subject == ask.issuer and is_ark(c)), None)
        if ask is None:
            raise AttestationError(
                f"no ASK {common_name(key_cert.issuer)} for the {want.upper()}: name the "
                f"product's cert_chain file in security.attestation.snp.certs"
            )
        if ark is None:
            raise AttestationError(
                f"no ARK {common_name(ask.issuer)}: name the product's cert_chain file in "
                "security.attestation.snp.certs"
            )
        if self.kds is not None and info.product and not any(c.issuer == ark.subject for c in crls):
            crls.append(self.kds.crl(info.product, now, want))
        return key_cert, ask, ark, crls

    @staticmethod
    def _key_cert(
        report: SnpReport, pool: list[x509.Certificate], want: str
    ) -> x509.Certificate | None:
        """The key certificate for this report: the one whose hwID and SPLs fit; else the first
        of the right kind (so that verification names what does not fit)."""
        candidates = []
        for cert in pool:
            if not is_key_cert(cert):
                continue
            try:
                info = key_cert_info(cert)
            except AttestationError:
                continue
            if info.kind == want:
                candidates.append((cert, info))
        for cert, info in candidates:
            tcb = report.tcb("reported", info.product).to_dict()
            spl_ok = all(tcb.get(k) == v for k, v in info.spl.items())
            hwid = info.hwid or b""
            chip_ok = want == "vlek" or report.chip_id[: len(hwid)] == hwid != b""
            if spl_ok and chip_ok:
                return cert
        return candidates[0][0] if candidates else None


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AttestationError(f"cannot read SNP collateral {path}: {exc.strerror}") from None


__all__ = [
    "GUIDS",
    "KDS_BASE",
    "KdsClient",
    "SnpCollateral",
    "build_cert_table",
    "default_kds_cache",
    "guid_bytes",
    "parse_cert_table",
]
