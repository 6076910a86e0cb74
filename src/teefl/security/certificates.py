"""The certificates and keys of a PKI directory: where they are, writing them safely, reading,
checking and describing them.

Why check locally what a TLS peer would check: gRPC reports every such problem as an opaque
handshake failure, usually on the *other* machine. Every problem a user can cause (missing file,
not PEM, key of another certificate, expired, signed by another CA) is raised here as one
`TeeflError` line that names the file. Issuing is `teefl.security.pki`'s, revoking
`teefl.security.crl`'s.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teefl.errors import TeeflError
from teefl.security.keyfile import check_private_file

Purpose = Literal["server", "client"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
AGGREGATOR = "aggregator"
COLLABORATOR_DIR = "collaborators"
#: the owner's key service (`teefl keys serve`): its server certificate, and the directory of
#: the client certificates parties present to it (the aggregator's: ``key-clients/aggregator``)
KEY_SERVICE = "key-service"
KEY_CLIENT_DIR = "key-clients"

#: certificates (and CRLs) start this far in the past so a peer whose clock is a little behind
#: accepts them
CLOCK_SKEW = dt.timedelta(minutes=5)
#: what the CA signs with (certificates and CRLs)
SIGNATURE_HASH = hashes.SHA384()
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


# -- paths -------------------------------------------------------------------------------------
def ca_paths(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) of the CA in a PKI directory."""
    directory = Path(directory)
    return directory / CA_CERT, directory / CA_KEY


def aggregator_paths(directory: Path, name: str = AGGREGATOR) -> tuple[Path, Path]:
    """(certificate, key) of the aggregator in a PKI directory."""
    directory = Path(directory)
    return directory / f"{name}.crt", directory / f"{name}.key"


def collaborator_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) of a collaborator: ``<dir>/collaborators/<name>.crt|.key``.

    The same layout as `TlsSpec.client_dir` expects, so a plan can point at
    ``<dir>/collaborators`` directly.
    """
    client_dir = Path(directory) / COLLABORATOR_DIR
    return client_dir / f"{name}.crt", client_dir / f"{name}.key"


def key_client_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) a party presents to the key service: ``<dir>/key-clients/<name>.crt``.

    Apart from ``collaborators/`` so a certificate made for the key service (the aggregator's,
    say) is never mistaken for a federation member's."""
    client_dir = Path(directory) / KEY_CLIENT_DIR
    return client_dir / f"{name}.crt", client_dir / f"{name}.key"


# -- time ------------------------------------------------------------------------------------
def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(t: dt.datetime) -> str:
    """A certificate time for messages: minutes are enough to act on; UTC is explicit."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- writing ---------------------------------------------------------------------------------
def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically: a temp file created with its final ``mode`` from the start, then rename.

    ``os.open(..., mode)`` applies the mode at creation (minus the umask, which can only remove
    bits), so a private key is never readable by others, not even for an instant; the explicit
    fchmod makes a permissive-but-odd umask irrelevant for the public files too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(path, pem, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    write_file(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


# -- loading -----------------------------------------------------------------------------------
def read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TeeflError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise TeeflError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise TeeflError(f"cannot read {what} {path}: permission denied") from None
    except OSError as exc:
        raise TeeflError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file; missing or non-PEM files become a `TeeflError`."""
    data = read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TeeflError(f"{path} is not a PEM certificate") from None


def load_private_key(path: Path) -> PrivateKey:
    """An unencrypted PEM private key (gRPC cannot prompt for a passphrase)."""
    data = read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TeeflError(
            f"private key {path} is encrypted; teefl needs an unencrypted key (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TeeflError(f"{path} is not a PEM private key") from None
    # Our CA issues only these; Ed25519 & co. are not usable with every gRPC TLS configuration.
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TeeflError(f"private key {path} is {type(key).__name__}; use an EC or RSA key")
    check_private_file(path)
    return key


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_key_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKey]:
    """Certificate and key, checked to belong together.

    Why check here: gRPC reports a mismatched pair only as a failed handshake on the *peer*
    ("Handshake failed"), far from the file that is wrong.
    """
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise TeeflError(f"private key {key_path} does not match certificate {cert_path}")
    return cert, key


def load_ca(directory: Path) -> tuple[x509.Certificate, PrivateKey]:
    """The CA certificate and key of a PKI directory (to issue certificates with)."""
    cert_path, key_path = ca_paths(directory)
    if not cert_path.exists() and not key_path.exists():
        raise TeeflError(f"no CA in {directory}; create one with: teefl pki init {directory}")
    cert, key = load_key_pair(cert_path, key_path)
    if not is_ca(cert):
        raise TeeflError(f"{cert_path} is not a CA certificate (basicConstraints CA is not true)")
    return cert, key


# -- checks ------------------------------------------------------------------------------------
def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def ekus(cert: x509.Certificate) -> list[str]:
    """Extended key usages by name; empty when the extension is absent (= any usage)."""
    try:
        value = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [_EKU_NAMES.get(oid, oid.dotted_string) for oid in value]


def sans(cert: x509.Certificate) -> list[str]:
    """Subject alternative names as ``DNS:name`` / ``IP:addr``, the notation of OpenSSL."""
    try:
        value = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = [f"DNS:{n}" for n in value.get_values_for_type(x509.DNSName)]
    out += [f"IP:{a}" for a in value.get_values_for_type(x509.IPAddress)]
    return out


def common_name(cert: x509.Certificate) -> str | None:
    """The subject CN (the collaborator name for client certificates)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode() if isinstance(value, bytes) else value


def covers_host(cert: x509.Certificate, host: str) -> bool:
    """Would a TLS client connecting to ``host`` accept this certificate's names?

    RFC 6125 rules as gRPC/BoringSSL applies them: an IP literal must match an IP SAN; a DNS name
    matches a DNS SAN case-insensitively, with a wildcard only as the whole left-most label. The CN
    is consulted only when the certificate has no SAN at all (legacy behaviour of gRPC).
    """
    host = host.strip("[]").rstrip(".").lower()
    try:
        value = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cn = common_name(cert)
        return cn is not None and cn.lower() == host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in value.get_values_for_type(x509.IPAddress)
    for name in value.get_values_for_type(x509.DNSName):
        name = name.rstrip(".").lower()
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def check_validity(
    cert: x509.Certificate, path: Path | str, now: dt.datetime | None = None
) -> None:
    """Raise when the certificate is outside its validity window at ``now``."""
    now = now or now_utc()
    if now > cert.not_valid_after_utc:
        raise TeeflError(f"certificate {path} expired on {format_time(cert.not_valid_after_utc)}")
    if now < cert.not_valid_before_utc:
        raise TeeflError(
            f"certificate {path} is not valid before {format_time(cert.not_valid_before_utc)}"
        )


def check_signed_by(
    cert: x509.Certificate, cert_path: Path | str, ca: x509.Certificate, ca_path: Path | str
) -> None:
    """Raise unless ``cert`` was issued (and signed) by ``ca`` directly -- our chains are 1 deep."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature, TypeError):
        raise TeeflError(
            f"certificate {cert_path} is not signed by CA {ca_path} (unknown CA; issuer is "
            f"'{cert.issuer.rfc4514_string()}')"
        ) from None


def check_certificate(
    cert_path: Path,
    *,
    ca_path: Path,
    key_path: Path | None = None,
    purpose: Purpose | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """All checks a TLS peer would make on our own certificate, done locally with clear messages.

    Why: gRPC reports every one of these problems as an opaque handshake failure, and usually on
    the *other* machine. Checking before starting turns "Handshake failed" into "certificate
    collaborators/col1.crt expired on 2025-01-01 00:00 UTC" where the file is.
    """
    ca_cert = load_certificate(ca_path)
    if not is_ca(ca_cert):
        raise TeeflError(f"{ca_path} is not a CA certificate (basicConstraints CA is not true)")
    check_validity(ca_cert, ca_path, now)
    if key_path is not None:
        cert, _ = load_key_pair(cert_path, key_path)
    else:
        cert = load_certificate(cert_path)
    check_validity(cert, cert_path, now)
    check_signed_by(cert, cert_path, ca_cert, ca_path)
    if purpose is not None:
        usages = ekus(cert)
        want = "serverAuth" if purpose == "server" else "clientAuth"
        if usages and want not in usages:
            how = "--aggregator HOST" if purpose == "server" else "--collaborator NAME"
            raise TeeflError(
                f"certificate {cert_path} is not a {purpose} certificate (extended key usage: "
                f"{', '.join(usages)}); issue one with: teefl pki issue DIR {how}"
            )
    return cert


# -- describing --------------------------------------------------------------------------------
def _key_description(public_key: Any) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = {"secp384r1": "P-384", "secp256r1": "P-256", "secp521r1": "P-521"}
        return f"EC {curve.get(public_key.curve.name, public_key.curve.name)}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    return type(public_key).__name__.removeprefix("_")


def describe_certificate(path: Path) -> dict[str, Any]:
    """What `teefl pki show` prints, as data: names, usages, validity, fingerprint, key type."""
    cert = load_certificate(path)
    now = now_utc()
    if now > cert.not_valid_after_utc:
        status = "expired"
    elif now < cert.not_valid_before_utc:
        status = "not yet valid"
    else:
        status = "valid"
    fp = cert.fingerprint(hashes.SHA256()).hex().upper()
    return {
        "path": str(path),
        "subject": cert.subject.rfc4514_string(),
        "common_name": common_name(cert),
        "issuer": cert.issuer.rfc4514_string(),
        "is_ca": is_ca(cert),
        "sans": sans(cert),
        "eku": ekus(cert),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "status": status,
        "fingerprint_sha256": ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)),
        "key_type": _key_description(cert.public_key()),
        "signature_hash": cert.signature_hash_algorithm.name
        if cert.signature_hash_algorithm
        else None,
    }
