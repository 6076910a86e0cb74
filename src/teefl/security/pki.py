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

Reading and checking certificates is `teefl.security.certificates`'s, revoking
`teefl.security.crl`'s, the certificates a plan needs `teefl.security.plan_pki`'s.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teefl.errors import TeeflError
from teefl.security.certificates import (
    AGGREGATOR,
    CLOCK_SKEW,
    SIGNATURE_HASH,
    PrivateKey,
    aggregator_paths,
    ca_paths,
    collaborator_paths,
    key_client_paths,
    load_ca,
    now_utc,
    write_cert,
    write_key,
)

KeyType = Literal["ec", "rsa"]


# -- keys, names, validity ---------------------------------------------------------------------
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
    start = not_before if not_before is not None else now_utc() - CLOCK_SKEW
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


def _name(cn: str) -> x509.Name:
    # X.509 caps a CN at 64 characters; a longer host name still works via the SAN.
    cn = cn if 0 < len(cn) <= 64 else cn[:64] or "teefl"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teefl"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def san_entry(host: str) -> x509.GeneralName:
    host = host.strip().strip("[]")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or "/" in host or ":" in host:
        raise TeeflError(f"{host!r} is neither a host name nor an IP address")
    return x509.DNSName(host.lower())


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
        .sign(key, SIGNATURE_HASH)
    )
    write_key(key_path, key)
    write_cert(cert_path, cert)
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
    cert = builder.sign(ca_key, SIGNATURE_HASH)
    write_key(key_path, key)
    write_cert(cert_path, cert)
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
        entry = san_entry(h)
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

    The CN *is* the identity in mtls mode (`teefl.security.peer_identity.authorize`), so the name
    is checked with the plan's rule for collaborator names -- also keeping it safe as a file name.
    """
    paths = collaborator_paths(directory, name)
    return _issue_client(directory, paths, name, "collaborator", days, force, not_before, key_type)


def issue_key_client(
    directory: Path,
    name: str,
    *,
    days: int = 365,
    force: bool = False,
    not_before: dt.datetime | None = None,
    key_type: KeyType | None = None,
) -> Path:
    """Client certificate ``dir/key-clients/<name>.crt|.key`` (CN = ``name``, clientAuth): what
    a party presents to the owner's key service (`teefl keys serve`), whose configuration names
    the party by this CN. The aggregator's is ``aggregator`` by convention.

    Why a directory of its own: the aggregator has only a server certificate, and a client
    certificate for it under ``collaborators/`` would read as a federation member's."""
    paths = key_client_paths(directory, name)
    return _issue_client(directory, paths, name, "key client", days, force, not_before, key_type)


def _issue_client(
    directory: Path,
    paths: tuple[Path, Path],
    name: str,
    what: str,
    days: int,
    force: bool,
    not_before: dt.datetime | None,
    key_type: KeyType | None,
) -> Path:
    """A clientAuth leaf with CN = ``name`` (a plan name: checked) at ``paths``."""
    from teefl.plan import NAME_RE

    if not NAME_RE.match(name):
        raise TeeflError(f"{what} name {name!r} must be 1-63 letters, digits, '.', '_' or '-'")
    cert_path, key_path = paths
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
