"""Helpers for key service tests: the owner's configuration on a test PKI, a key service in this
process, and the secret-scanning every acceptance test ends with."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from identutil import attestation_spec
from teefl.security import certificates, pki
from teefl.security.sealed import write_key_file


def owner_setup(
    tmp: Path,
    pki_dir: Path,
    *,
    policy: dict[str, Any] | None = None,
    parties: dict[str, Any] | None = None,
    name: str = "keys.yaml",
    **top: Any,
) -> tuple[Path, bytes]:
    """The owner's side on ``pki_dir`` (a federation PKI with its CA): the key service's
    certificate for 127.0.0.1, the aggregator's key-client certificate, the owner's sealing key
    (``tmp/owner.key``, made once) and a configuration ``tmp/<name>`` whose aggregator policy
    pins the test's simulated key and measurements (``policy`` replaces entries of it).
    Returns (configuration path, sealing key)."""
    service_cert = certificates.aggregator_paths(pki_dir, certificates.KEY_SERVICE)[0]
    if not service_cert.exists():
        pki.issue_aggregator(
            pki_dir, ["127.0.0.1", "localhost"], name=certificates.KEY_SERVICE, force=True
        )
    if not certificates.key_client_paths(pki_dir, "aggregator")[0].exists():
        pki.issue_key_client(pki_dir, "aggregator")
    key_file = tmp / "owner.key"
    key = (
        bytes.fromhex(key_file.read_text().strip())
        if key_file.exists()
        else write_key_file(key_file)
    )
    owner_policy = {**attestation_spec(tmp)["policies"]["aggregator"], **(policy or {})}
    cert, service_key = certificates.aggregator_paths(pki_dir, certificates.KEY_SERVICE)
    data = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": str(pki_dir / "ca.crt"), "cert": str(cert), "key": str(service_key)},
        "sealing_key": str(key_file),
        "parties": parties or {"aggregator": {"release": ["sealing_key"]}},
        "attestation": {"allow_simulated": True, "policies": {"aggregator": owner_policy}},
        "audit_log": str(tmp / f"{Path(name).stem}-audit.jsonl"),
        **top,
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path, key


def key_client(pki_dir: Path, name: str = "aggregator") -> tuple[Path, Path]:
    return certificates.key_client_paths(pki_dir, name)


@contextlib.contextmanager
def key_server(config: Path) -> Iterator[Any]:
    """The key service of ``config`` serving in this process; yields the `KeyServer`."""
    from teefl.security.keys.config import load_config
    from teefl.security.keys.service import KeyServer

    server = KeyServer(load_config(config))
    server.start()
    try:
        yield server
    finally:
        server.stop(0)


def spellings(secret: bytes) -> dict[str, bytes]:
    """The ways a secret could leak into a file: raw, hex (both cases), base64 (standard,
    URL-safe, with and without padding)."""
    b64 = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": b64,
        "base64-unpadded": b64.rstrip(b"="),
        "urlsafe-base64": url.rstrip(b"="),
    }


def files_holding(secret: bytes, *roots: Path) -> list[str]:
    """Every file under ``roots`` (files or directories) that holds ``secret`` in any of its
    `spellings`, as 'path (spelling)'."""
    found, scanned = [], 0
    forms = spellings(secret)
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            data = path.read_bytes()
            scanned += 1
            found += [f"{path} ({how})" for how, form in forms.items() if form in data]
    assert scanned, f"nothing scanned under {roots}"
    return found
