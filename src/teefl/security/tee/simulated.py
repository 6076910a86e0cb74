"""Simulated evidence, for tests and demos only: a "quote" in TDX shape, signed by a software
ECDSA key instead of by a TEE.

It proves nothing about the platform, and says so: a provider refuses to start without
``allow_simulated``, every use logs a loud warning, and its evidence names
``provider: simulated``. What it gives a test is the attestation *protocol* (report data binding,
policy, refusal paths) on a machine without a TEE.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teefl.errors import TeeflError
from teefl.security.keyfile import check_private_file
from teefl.security.tee.evidence import REPORT_DATA_SIZE, Evidence, check_report_data

log = logging.getLogger("teefl.tee")

SIMULATED_MAGIC = b"TEEFLSIM"
SIMULATED_VERSION = 1
#: Fake measurement set in TDX shape so the same policy fields apply (48 bytes each).
SIMULATED_MEASUREMENT_NAMES = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")

_SIM_WARNING = (
    "SIMULATED ATTESTATION IN USE: evidence is signed by a software key, proves nothing about "
    "the platform and must never be used outside tests (plan option allow_simulated: true)"
)


def warn_simulated(what: str) -> None:
    """Log the loud warning; called on *every* use so it cannot scroll out of sight once."""
    log.warning("%s [%s]", _SIM_WARNING, what)


def _require_simulated_allowed(allow_simulated: bool) -> None:
    if not allow_simulated:
        raise TeeflError(
            "simulated attestation is disabled: it proves nothing about the platform. Set "
            "allow_simulated: true in the plan only for tests and demos"
        )


def default_simulated_measurements() -> dict[str, bytes]:
    """Deterministic fake measurements, so a policy can name them in tests."""
    return {
        name: hashlib.sha384(b"teefl simulated " + name.encode()).digest()
        for name in SIMULATED_MEASUREMENT_NAMES
    }


def simulated_key_fingerprint(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: what a policy's ``simulated_keys`` lists."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_or_create_simulated_key(path: Path | None) -> ec.EllipticCurvePrivateKey:
    """P-256 key from a PEM file (created 0600 if absent), or a fresh per-process key."""
    if path is None:
        return ec.generate_private_key(ec.SECP256R1())
    path = Path(path)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise TeeflError(f"{path}: simulated attestation key must be an ECDSA P-256 key")
        check_private_file(path, "simulated attestation key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of the same run created it first: use theirs
        return load_or_create_simulated_key(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def _sim_body(measurements: dict[str, bytes], report_data: bytes, spki: bytes) -> bytes:
    parts = [SIMULATED_MAGIC, bytes([SIMULATED_VERSION])]
    for name in SIMULATED_MEASUREMENT_NAMES:
        value = measurements[name]
        if len(value) != 48:
            raise TeeflError(f"simulated measurement {name} must be 48 bytes")
        parts.append(value)
    parts += [report_data, struct.pack(">H", len(spki)), spki]
    return b"".join(parts)


class SimulatedProvider:
    """Software "quote": ECDSA P-256 over magic || measurements || report data || public key.

    It exists only so the attestation *protocol* (binding, policy, refusal paths) can be tested on
    machines without a TEE. It is refused unless ``allow_simulated=True`` and warns on every use.
    """

    kind = "simulated"

    def __init__(
        self,
        *,
        allow_simulated: bool = False,
        key: ec.EllipticCurvePrivateKey | None = None,
        key_file: Path | None = None,
        measurements: dict[str, bytes] | None = None,
    ) -> None:
        _require_simulated_allowed(allow_simulated)
        warn_simulated("SimulatedProvider created")
        self.key = key or load_or_create_simulated_key(key_file)
        self.measurements = {**default_simulated_measurements(), **(measurements or {})}

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def get_evidence(self, report_data: bytes) -> Evidence:
        report_data = check_report_data(report_data)
        warn_simulated("simulated evidence produced")
        spki = self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        body = _sim_body(self.measurements, report_data, spki)
        signature = self.key.sign(body, ec.ECDSA(hashes.SHA256()))
        quote = body + struct.pack(">H", len(signature)) + signature
        return Evidence(kind="simulated", quote=quote, provider="simulated")


@dataclass(frozen=True)
class SimulatedQuote:
    """Parsed fields of a simulated quote."""

    measurements: dict[str, bytes]
    report_data: bytes
    public_key_der: bytes
    body: bytes
    signature: bytes


def parse_simulated_quote(quote: bytes) -> SimulatedQuote:
    """Split a simulated quote; raises TeeflError on any malformation."""
    head = len(SIMULATED_MAGIC) + 1
    fixed = head + 48 * len(SIMULATED_MEASUREMENT_NAMES) + REPORT_DATA_SIZE + 2
    if len(quote) < fixed or not quote.startswith(SIMULATED_MAGIC):
        raise TeeflError("not a simulated quote (bad magic or too short)")
    if quote[len(SIMULATED_MAGIC)] != SIMULATED_VERSION:
        raise TeeflError(f"unsupported simulated quote version {quote[len(SIMULATED_MAGIC)]}")
    pos = head
    measurements = {}
    for name in SIMULATED_MEASUREMENT_NAMES:
        measurements[name] = quote[pos : pos + 48]
        pos += 48
    report_data = quote[pos : pos + REPORT_DATA_SIZE]
    pos += REPORT_DATA_SIZE
    (spki_len,) = struct.unpack(">H", quote[pos : pos + 2])
    pos += 2
    spki = quote[pos : pos + spki_len]
    pos += spki_len
    if len(spki) != spki_len or len(quote) < pos + 2:
        raise TeeflError("simulated quote truncated")
    body = quote[:pos]
    (sig_len,) = struct.unpack(">H", quote[pos : pos + 2])
    signature = quote[pos + 2 : pos + 2 + sig_len]
    if len(signature) != sig_len or len(quote) != pos + 2 + sig_len:
        raise TeeflError("simulated quote truncated or has trailing bytes")
    return SimulatedQuote(measurements, report_data, spki, body, signature)


def verify_simulated_signature(
    parsed: SimulatedQuote, trusted_keys: list[ec.EllipticCurvePublicKey] | None
) -> None:
    """Check the ECDSA signature, and that the key is a trusted one when keys are given."""
    key = serialization.load_der_public_key(parsed.public_key_der)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TeeflError("simulated quote key is not an EC key")
    if trusted_keys is not None:
        der = parsed.public_key_der
        trusted_der = [
            k.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for k in trusted_keys
        ]
        if der not in trusted_der:
            raise TeeflError("simulated quote signed by an untrusted key")
    try:
        key.verify(parsed.signature, parsed.body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise TeeflError("simulated quote signature invalid") from exc


__all__ = [
    "SIMULATED_MAGIC",
    "SimulatedProvider",
    "SimulatedQuote",
    "default_simulated_measurements",
    "load_or_create_simulated_key",
    "parse_simulated_quote",
    "simulated_key_fingerprint",
    "verify_simulated_signature",
    "warn_simulated",
]
