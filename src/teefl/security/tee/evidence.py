"""Evidence providers: ask the local TEE for a quote that carries our 64-byte report data.

Why an interface: the federation code only needs "give me evidence for these 64 bytes"; whether
the bytes come from the Linux configfs-tsm ABI (TDX / SEV-SNP guests), from Gramine's
``/dev/attestation`` pseudo-files (SGX enclaves) or from the software stand-in used in tests
(`teefl.security.tee.simulated`) is a deployment detail. The report data is always
``report_data_for(tls_spki, nonce, binding)`` (see
``verify.py``), which is what ties a quote to one TLS key, one handshake and one configuration.

Every provider reads and writes below a ``root`` path so tests run against fake trees.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from teefl.errors import TeeflError

log = logging.getLogger("teefl.tee")

REPORT_DATA_SIZE = 64

_TSM_KIND = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


class EvidenceError(TeeflError):
    """The local TEE could not produce evidence (missing device, refused request, race)."""


@dataclass(frozen=True)
class Evidence:
    """A quote plus what produced it.

    ``kind`` is the quote format ("tdx", "sgx", "sev-snp", "simulated") and decides the verifier;
    ``provider`` names the mechanism ("configfs-tsm/tdx_guest", "gramine/dcap", "simulated");
    ``extra`` carries side data a verifier may need (e.g. SEV-SNP ``auxblob`` certificates).
    """

    kind: str
    quote: bytes
    provider: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (bytes as base64) for sending over the wire or storing in a run."""
        extra = {
            k: {"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v
            for k, v in self.extra.items()
        }
        return {
            "kind": self.kind,
            "provider": self.provider,
            "quote_b64": base64.b64encode(self.quote).decode(),
            "extra": extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evidence:
        extra = {
            k: base64.b64decode(v["b64"]) if isinstance(v, dict) and set(v) == {"b64"} else v
            for k, v in dict(data.get("extra") or {}).items()
        }
        return cls(
            kind=str(data["kind"]),
            quote=base64.b64decode(data["quote_b64"]),
            provider=str(data["provider"]),
            extra=extra,
        )


@runtime_checkable
class EvidenceProvider(Protocol):
    """Anything that turns 64 bytes of report data into evidence."""

    kind: str

    def get_evidence(self, report_data: bytes) -> Evidence: ...


def check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
        size = len(report_data) if isinstance(report_data, bytes | bytearray) else "non-bytes"
        raise EvidenceError(
            f"report data must be exactly {REPORT_DATA_SIZE} bytes, got {size}: "
            "build it with teefl.security.tee.verify.report_data_for()"
        )
    return bytes(report_data)


# --------------------------------------------------------------------------------------------
# configfs-tsm (Linux 6.7+: TDX and SEV-SNP guests)
# --------------------------------------------------------------------------------------------


class TsmFs:
    """The five file operations configfs-tsm needs; a seam so tests can fake the kernel.

    A plain directory cannot behave like configfs (mkdir there does not create attribute files,
    writes do not produce a quote), so tests substitute an object with these methods.
    """

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def write(self, path: Path, data: bytes) -> None:
        # configfs binary attributes take the whole blob in one write(); a short write would be
        # a different request, so insist on one call that consumes everything.
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(errno.EIO, f"short write to {path} ({written} of {len(data)} bytes)")

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)


class ConfigfsTsmProvider:
    """Quotes through ``/sys/kernel/config/tsm/report`` (one directory per request).

    Protocol (Documentation/ABI/testing/configfs-tsm): mkdir a fresh directory, read
    ``generation``, write the 64-byte ``inblob``, read ``outblob`` and ``provider``, read
    ``generation`` again. Each write bumps ``generation``; anything but exactly one more than
    before means another process wrote to our directory between our write and our read, and the
    quote may carry *their* report data -- so we refuse it. The directory is removed in all cases.
    """

    kind = "configfs-tsm"

    def __init__(self, root: Path = Path("/"), fs: TsmFs | None = None) -> None:
        self.root = Path(root)
        self.fs = fs or TsmFs()
        self.report_dir = self.root / "sys/kernel/config/tsm/report"

    def available(self) -> bool:
        return self.fs.exists(self.report_dir)

    def _generation(self, path: Path) -> int:
        raw = self.fs.read(path / "generation").decode("ascii", "replace").strip()
        try:
            return int(raw)
        except ValueError as exc:
            raise EvidenceError(f"configfs-tsm generation is not a number: {raw!r}") from exc

    def get_evidence(self, report_data: bytes) -> Evidence:
        report_data = check_report_data(report_data)
        if not self.available():
            raise EvidenceError(
                f"configfs-tsm not available ({self.report_dir} missing): needs Linux 6.7+ in a "
                "TDX or SEV-SNP guest with configfs mounted (mount -t configfs none "
                "/sys/kernel/config)"
            )
        request = self.report_dir / f"teefl-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.fs.mkdir(request)
        except OSError as exc:
            raise EvidenceError(
                f"cannot create configfs-tsm request {request}: {exc.strerror or exc} "
                "(attestation needs root or write access to the tsm report directory)"
            ) from exc
        try:
            before = self._generation(request)
            try:
                self.fs.write(request / "inblob", report_data)
            except OSError as exc:
                raise EvidenceError(
                    f"configfs-tsm refused the report data: {exc.strerror or exc}"
                ) from exc
            try:
                quote = self.fs.read(request / "outblob")
            except OSError as exc:
                raise EvidenceError(
                    f"configfs-tsm produced no quote: {exc.strerror or exc} "
                    "(is the quoting service, e.g. the TDX QGS, reachable?)"
                ) from exc
            provider = self.fs.read(request / "provider").decode("ascii", "replace").strip()
            aux = None
            if self.fs.exists(request / "auxblob"):
                try:
                    aux = self.fs.read(request / "auxblob") or None
                except OSError:
                    aux = None
            after = self._generation(request)
        except OSError as exc:
            raise EvidenceError(
                f"configfs-tsm request failed: {exc.strerror or exc} ({exc.filename or request})"
            ) from exc
        else:
            if after != before + 1:
                raise EvidenceError(
                    f"concurrent configfs-tsm user detected (generation went {before} -> {after}, "
                    "expected one step): the quote may not carry our report data; retry"
                )
            if not quote:
                raise EvidenceError("configfs-tsm returned an empty quote")
        finally:
            try:
                self.fs.rmdir(request)
            except OSError as exc:  # pragma: no cover - best effort, but say so
                log.warning("could not remove configfs-tsm request %s: %s", request, exc)
        extra: dict[str, Any] = {"generation": after}
        if aux:
            extra["auxblob"] = aux
        return Evidence(
            kind=_TSM_KIND.get(provider, provider),
            quote=quote,
            provider=f"configfs-tsm/{provider}",
            extra=extra,
        )


# --------------------------------------------------------------------------------------------
# Gramine (inside gramine-sgx)
# --------------------------------------------------------------------------------------------


class GramineProvider:
    """Quotes through Gramine's ``/dev/attestation`` pseudo-files (SGX DCAP or EPID).

    Writing ``user_report_data`` sets the 64 bytes of the enclave's REPORTDATA; reading ``quote``
    then returns a quote signed by the Quoting Enclave. Under gramine-direct there is no enclave
    (``attestation_type`` is ``none``), so we refuse rather than return something meaningless.
    """

    kind = "gramine"

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self.dir = self.root / "dev/attestation"

    def attestation_type(self) -> str | None:
        try:
            return (self.dir / "attestation_type").read_text().strip().strip("\x00").lower()
        except OSError:
            return None

    def get_evidence(self, report_data: bytes) -> Evidence:
        report_data = check_report_data(report_data)
        if not self.dir.is_dir():
            raise EvidenceError(
                "/dev/attestation not found: not running inside Gramine "
                "(start the process with --launcher gramine-sgx)"
            )
        att_type = self.attestation_type()
        if att_type in (None, "", "none"):
            raise EvidenceError(
                "Gramine reports no attestation (attestation_type none): gramine-direct cannot "
                'produce quotes; use gramine-sgx with sgx.remote_attestation = "dcap"'
            )
        try:
            with open(self.dir / "user_report_data", "wb", buffering=0) as fh:
                written = fh.write(report_data)
            if written != REPORT_DATA_SIZE:
                raise OSError(errno.EIO, f"short write ({written} bytes)")
            with open(self.dir / "quote", "rb") as fh:
                quote = fh.read()
        except OSError as exc:
            raise EvidenceError(f"Gramine attestation failed: {exc.strerror or exc}") from exc
        if not quote:
            raise EvidenceError("Gramine returned an empty quote")
        return Evidence(
            kind="sgx",
            quote=quote,
            provider=f"gramine/{att_type}",
            extra={"attestation_type": att_type},
        )


__all__ = [
    "REPORT_DATA_SIZE",
    "ConfigfsTsmProvider",
    "Evidence",
    "EvidenceError",
    "EvidenceProvider",
    "GramineProvider",
    "TsmFs",
    "check_report_data",
]
