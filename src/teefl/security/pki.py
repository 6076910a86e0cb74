"""A small private PKI for one federation: a CA, an aggregator server certificate, one client
certificate per collaborator.

Why our own CA and not the system trust store: a federation is a closed group. Trusting only a CA
made for it means a certificate bought from any public CA cannot impersonate the aggregator, and in
mtls mode the aggregator can treat "signed by our CA, CN = col1" as *being* col1.

Why these choices:

- EC P-384 by default (RSA-3072 on request), SHA-384 signatures: ~192-bit/128-bit security that
  every TLS stack (BoringSSL in gRPC, OpenSSL in Python) handles; P-384 keys are generated in
  milliseconds, which keeps tests fast.
- The CA has ``pathlen:0``: it signs only end-entity certificates, so a stolen leaf key cannot mint
  further certificates, and keyUsage limited to certificate/CRL signing.
- Leaf certificates carry an extended key usage (serverAuth for the aggregator, clientAuth for a
  collaborator) so a collaborator's certificate cannot be used to impersonate the aggregator.
- Private keys are created with ``os.open(..., 0o600)`` in the target directory and renamed into
  place: the key is never world-readable, not even between creating and chmod-ing the file, and a
  crash never leaves a half-written key under the final name.

Every problem a user can cause (missing file, not PEM, key of another certificate, expired,
signed by another CA) is raised as one `TeeflError` line that names the file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teefl.errors import TeeflError
from teefl.security.keyfile import check_private_file

if TYPE_CHECKING:
    from teefl.plan import Plan

KeyType = Literal["ec", "rsa"]
Purpose = Literal["server", "client"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_CRL = "ca.crl"
AGGREGATOR = "aggregator"
COLLABORATOR_DIR = "collaborators"

#: certificates start this far in the past so a peer whose clock is a little behind accepts them
CLOCK_SKEW = dt.timedelta(minutes=5)
_HASH = hashes.SHA384()
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
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


# -- small helpers -----------------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(t: dt.datetime) -> str:
    """A certificate time for messages: minutes are enough to act on; UTC is explicit."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise TeeflError(f"unknown key type {key_type!r}; choose 'ec' (P-384) or 'rsa' (3072 bits)")


def _key_type_of(key: PrivateKey | Any) -> KeyType:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) else "ec"


def _validity(days: int | float, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0:
        raise TeeflError(f"--days must be positive, got {days}")
    start = not_before if not_before is not None else _now() - CLOCK_SKEW
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=days)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Check *before* generating anything, so a refusal leaves the directory untouched."""
    if force:
        return
    for p in paths:
        if p.exists():
            raise TeeflError(f"{p} already exists; pass --force to overwrite it")


def _write_file(path: Path, data: bytes, mode: int) -> None:
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


def _write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_file(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _name(cn: str) -> x509.Name:
    # X.509 caps a CN at 64 characters; a longer host name still works via the SAN.
    cn = cn if 0 < len(cn) <= 64 else cn[:64] or "teefl"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teefl"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _san_entry(host: str) -> x509.GeneralName:
    host = host.strip().strip("[]")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or "/" in host or ":" in host:
        raise TeeflError(f"{host!r} is neither a host name nor an IP address")
    return x509.DNSName(host.lower())


# -- loading -----------------------------------------------------------------------------------
def _read(path: Path, what: str) -> bytes:
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
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TeeflError(f"{path} is not a PEM certificate") from None


def load_private_key(path: Path) -> PrivateKey:
    """An unencrypted PEM private key (gRPC cannot prompt for a passphrase)."""
    data = _read(path, "private key")
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
    now = now or _now()
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


# -- issuing -----------------------------------------------------------------------------------
def init_ca(
    directory: Path,
    *,
    key_type: KeyType = "ec",
    days: int = 3650,
    force: bool = False,
    not_before: dt.datetime | None = None,
) -> Path:
    """Create ``dir/ca.crt`` and ``dir/ca.key``; returns the certificate path.

    The random CN suffix makes two federations' CAs distinguishable in `teefl pki show` and in
    error messages ("issuer is 'CN=teefl CA 3fa9c1d2'"), which is how one spots a certificate from
    the wrong PKI directory.
    """
    directory = Path(directory)
    cert_path, key_path = ca_paths(directory)
    _refuse_existing([cert_path, key_path], force)
    start, end = _validity(days, not_before)
    key = _new_key(key_type)
    name = _name(f"teefl CA {secrets.token_hex(4)}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, _HASH)
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path


def _issue_leaf(
    directory: Path,
    cert_path: Path,
    key_path: Path,
    *,
    cn: str,
    san: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    days: int,
    force: bool,
    not_before: dt.datetime | None,
    key_type: KeyType | None,
) -> Path:
    _refuse_existing([cert_path, key_path], force)
    start, end = _validity(days, not_before)
    ca_cert, ca_key = load_ca(directory)
    key = _new_key(key_type or _key_type_of(ca_key))
    rsa_key = isinstance(key, rsa.RSAPrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=rsa_key,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, _HASH)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path


def issue_aggregator(
    directory: Path,
    hosts: list[str],
    *,
    days: int = 365,
    force: bool = False,
    name: str = AGGREGATOR,
    not_before: dt.datetime | None = None,
    key_type: KeyType | None = None,
) -> Path:
    """Server certificate ``dir/<name>.crt|.key`` for every host name/IP collaborators dial.

    Each entry of ``hosts`` becomes a SAN (an IP SAN when it parses as an address, since TLS
    clients match IP literals only against IP SANs); the CN is the first host, for humans.
    ``key_type`` defaults to the CA's.
    """
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise TeeflError("the aggregator certificate needs at least one host name or IP address")
    san: list[x509.GeneralName] = []
    for h in hosts:
        entry = _san_entry(h)
        if entry not in san:
            san.append(entry)
    cert_path, key_path = aggregator_paths(directory, name)
    return _issue_leaf(
        Path(directory),
        cert_path,
        key_path,
        cn=hosts[0].strip("[]"),
        san=san,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
        force=force,
        not_before=not_before,
        key_type=key_type,
    )


def issue_collaborator(
    directory: Path,
    name: str,
    *,
    days: int = 365,
    force: bool = False,
    not_before: dt.datetime | None = None,
    key_type: KeyType | None = None,
) -> Path:
    """Client certificate ``dir/collaborators/<name>.crt|.key`` with CN = ``name``.

    The CN *is* the identity in mtls mode (`teefl.security.tls.authorize`), so the name is checked
    with the plan's rule for collaborator names -- also keeping it safe as a file name.
    """
    from teefl.plan import NAME_RE

    if not NAME_RE.match(name):
        raise TeeflError(
            f"collaborator name {name!r} must be 1-63 letters, digits, '.', '_' or '-'"
        )
    cert_path, key_path = collaborator_paths(directory, name)
    return _issue_leaf(
        Path(directory),
        cert_path,
        key_path,
        cn=name,
        san=[],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
        force=force,
        not_before=not_before,
        key_type=key_type,
    )


# -- revoking ---------------------------------------------------------------------------------
def crl_path(directory: Path) -> Path:
    """Where `revoke` keeps the CA's certificate revocation list: ``<dir>/ca.crl``."""
    return Path(directory) / CA_CRL


def _read_crl(path: Path) -> x509.CertificateRevocationList:
    data = _read(path, "certificate revocation list")
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
    now = now or _now()
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
    now = _now()
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
    crl = builder.sign(ca_key, _HASH)
    _write_file(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path, added


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
    now = _now()
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


# -- everything a plan needs -------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """localhost or a loopback address: such a plan runs on one machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class PlanPki:
    """Where `issue_for_plan` put things, and what it created versus kept."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_dir: Path
    crl: Path | None = None  # the CA's revocation list, when `revoke` made one
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    def security_yaml(self, relative_to: Path | None = None) -> str:
        """The ``security:`` block for the plan (paths relative to the plan's directory, as
        `teefl.plan` resolves them, so the plan and its pki/ can be moved together)."""

        def rel(p: Path) -> str:
            if relative_to is None:
                return str(p)
            try:
                return os.path.relpath(p.resolve(), Path(relative_to).resolve())
            except ValueError:  # another drive (Windows)
                return str(p.resolve())

        import yaml

        tls = {
            "ca": rel(self.ca),
            "server_cert": rel(self.server_cert),
            "server_key": rel(self.server_key),
            "client_dir": rel(self.client_dir),
        }
        if self.crl is not None:
            tls["crl"] = rel(self.crl)
        block = {"security": {"transport": "mtls", "tls": tls}}
        return yaml.safe_dump(block, sort_keys=False, default_flow_style=False)


def plan_hosts(plan: Plan) -> list[str]:
    """Names the aggregator certificate must cover for ``plan``: the host collaborators dial, and
    for a single-machine plan the usual loopback spellings too (localhost vs 127.0.0.1 is the most
    common way to get a host-name mismatch)."""
    hosts = [plan.network.host]
    if is_loopback(plan.network.host):
        hosts += [h for h in _LOOPBACK_NAMES if h != plan.network.host]
    return hosts


def _usable_leaf(
    cert_path: Path, key_path: Path, ca_path: Path, purpose: Purpose, hosts: list[str]
) -> str | None:
    """None when an existing certificate can be kept, else why not."""
    try:
        cert = check_certificate(cert_path, ca_path=ca_path, key_path=key_path, purpose=purpose)
    except TeeflError as exc:
        return str(exc)
    missing = [h for h in hosts if not covers_host(cert, h)]
    if missing:
        return f"certificate {cert_path} does not cover host {', '.join(map(repr, missing))}"
    return None


def issue_for_plan(
    plan: Plan,
    directory: Path,
    *,
    days: int = 365,
    force: bool = False,
    key_type: KeyType = "ec",
) -> PlanPki:
    """Everything ``plan`` needs for mtls: CA (if missing), aggregator and collaborator certs.

    Idempotent so it can be re-run after adding a collaborator to the plan: certificates that
    exist and still fit (signed by this CA, valid, right usage, covering the hosts) are kept; one
    that does not fit is an error unless ``force``, which re-issues the aggregator and collaborator
    certificates. ``force`` never replaces an existing CA: that would invalidate certificates
    already copied to other machines -- use ``teefl pki init --force`` for that deliberately.
    """
    directory = Path(directory)
    result = PlanPki(
        directory=directory,
        ca=ca_paths(directory)[0],
        server_cert=aggregator_paths(directory)[0],
        server_key=aggregator_paths(directory)[1],
        client_dir=directory / COLLABORATOR_DIR,
        crl=crl_path(directory) if crl_path(directory).exists() else None,
    )
    ca_cert, ca_key = ca_paths(directory)
    if ca_cert.exists() or ca_key.exists():
        load_ca(directory)  # fails clearly on half a CA or a mismatched key
        check_validity(load_certificate(ca_cert), ca_cert)
        result.kept.append(ca_cert)
    else:
        result.created.append(init_ca(directory, key_type=key_type))

    hosts = plan_hosts(plan)
    leaves: list[tuple[tuple[Path, Path], Purpose, list[str], Any]] = [
        (
            aggregator_paths(directory),
            "server",
            hosts,
            lambda f: issue_aggregator(directory, hosts, days=days, force=f),
        )
    ]
    for name in plan.collaborators:
        leaves.append(
            (
                collaborator_paths(directory, name),
                "client",
                [],
                lambda f, n=name: issue_collaborator(directory, n, days=days, force=f),
            )
        )
    # Decide for every leaf first, so a refusal does not leave a half-issued set behind.
    todo = []
    for (cert_path, key_path), purpose, need_hosts, issue in leaves:
        if force or not (cert_path.exists() or key_path.exists()):
            todo.append(issue)
            continue
        problem = _usable_leaf(cert_path, key_path, ca_cert, purpose, need_hosts)
        if problem is not None:
            raise TeeflError(f"{problem}; pass --force to re-issue it")
        result.kept.append(cert_path)
    for issue in todo:
        result.created.append(issue(True))
    return result
