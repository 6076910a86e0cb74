"""What the ``teefl tee`` commands share: the role choice, the consoles, and reading the
evidence a user names (quote files, SNP collateral, a verification time) into one-line errors.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import typer

from teefl.errors import TeeflError


class Role(StrEnum):
    aggregator = "aggregator"
    collaborator = "collaborator"


def out_console():
    from rich.console import Console

    return Console()


def err_console():
    from rich.console import Console

    return Console(stderr=True)


def parse_time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise TeeflError(
            f"--at {value!r} is not an ISO 8601 time (e.g. 2025-07-01T00:00:00Z)"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def snp_collateral(certs: list[Path], crls: list[Path], kds: bool, kds_cache: Path | None):
    from teefl.security.tee.snp.collateral import SnpCollateral, default_kds_cache

    cache = (kds_cache or default_kds_cache()) if kds else None
    return SnpCollateral.from_files(certs, crls, kds_cache=cache)


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TeeflError(f"cannot read {what} {path}: {exc.strerror}") from None


SNP_CERTS = typer.Option(
    [], "--snp-certs", help="AMD cert_chain / VCEK / VLEK file (PEM or DER; repeatable)."
)
SNP_CRL = typer.Option([], "--snp-crl", help="AMD CRL file (repeatable).")
CERT_TABLE = typer.Option(
    None, "--cert-table", help="The guest's SNP certificate table (configfs-tsm auxblob)."
)
KDS = typer.Option(False, "--kds", help="Fetch missing SNP collateral from AMD KDS (network).")
