"""Which trusted execution environment (if any) this process runs in, and why we think so.

Why a separate, evidence-listing detector: the TEE label ends up in every run's ``env/*.json``
and from there in the paper-style tables, so a wrong label silently corrupts the study. We
therefore never guess: every conclusion lists the files and CPU flags it rests on, conflicting
markers are reported instead of hidden, and a label the user *states* (``--tee-label``) is recorded
as ``source: "stated"`` with the detected findings kept beside it.

All probes read below a ``root`` path so tests can run against fake trees
(``tmp_path/proc/cpuinfo``, ``tmp_path/dev/tdx_guest``, ``tmp_path/sys/kernel/config/tsm/...``).

Markers used (Linux kernel and Gramine conventions):

- SGX-capable host: ``/dev/sgx_enclave`` (in-kernel driver, 5.11+), ``/dev/sgx/enclave`` (legacy
  out-of-tree DCAP driver), cpuinfo flag ``sgx``.
- Inside Gramine: ``/dev/attestation`` exists (Gramine's pseudo-fs). ``attestation_type`` missing
  or ``none`` means gramine-direct (no enclave); ``dcap`` / ``epid`` means gramine-sgx.
- TDX guest: cpuinfo flag ``tdx_guest``, ``/dev/tdx_guest``, configfs-tsm provider ``tdx_guest``.
- SEV-SNP guest: ``/dev/sev-guest``, configfs-tsm provider ``sev_guest``. The cpuinfo flag
  ``sev_snp`` describes the *CPU's* capability and is normally visible on the host, not in the
  guest, so on its own it is recorded as a host note and never yields the ``sev-snp`` label.

Label precedence, strongest first (documented in ``LABEL_PRECEDENCE``): ``gramine-sgx`` >
``tdx`` > ``sev-snp`` > ``gramine-direct`` > ``sgx-host`` > ``none``. The label names the strongest
protection that actually covers *this process's memory*: gramine-direct gives no confidentiality,
so gramine-direct inside a TDX VM is labelled ``tdx`` (with ``isolation: gramine-direct`` kept in
the record); an SGX-capable host only *could* run an enclave, so it ranks just above ``none``.

`default_provider` picks, by the same markers, the evidence provider this machine supports.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from teefl.errors import TeeflError

if TYPE_CHECKING:
    from teefl.security.tee.evidence import EvidenceProvider

log = logging.getLogger("teefl.tee")

#: Labels, strongest first. The first label with a finding wins when several are found.
LABEL_PRECEDENCE: tuple[str, ...] = (
    "gramine-sgx",
    "tdx",
    "sev-snp",
    "gramine-direct",
    "sgx-host",
    "none",
)

#: Labels a user may state that detection also knows; other well-formed labels are accepted too
#: (e.g. a platform we cannot probe) but earn a warning.
KNOWN_LABELS = frozenset(LABEL_PRECEDENCE)

_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")

TSM_REPORT_DIR = Path("sys/kernel/config/tsm/report")

_TSM_PROVIDER_LABEL = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


@dataclass(frozen=True)
class Finding:
    """One conclusion ("this is a TDX guest") and the observations it rests on."""

    kind: str
    evidence: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "evidence": list(self.evidence)}


@dataclass(frozen=True)
class TeeInfo:
    """What we know about this process's TEE; ``to_dict()`` is written to ``env/<process>.json``.

    ``label`` is the value tables group by. With ``source == "stated"`` it is the user's word and
    ``detected_label`` still says what the probes found, so a reader can spot a mismatch.
    """

    label: str
    source: Literal["detected", "stated"]
    detected_label: str
    stated_label: str | None
    ambient: str  # none | tdx | sev-snp: the VM-level TEE
    isolation: str  # none | gramine-direct | gramine-sgx: the process-level wrapper
    sgx_host: bool
    findings: tuple[Finding, ...]
    contradictions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    attestation_type: str | None = None
    tsm_providers: tuple[str, ...] = ()
    root: str = "/"

    @property
    def evidence(self) -> list[str]:
        """Observations behind the detected label (empty for ``none``)."""
        for finding in self.findings:
            if finding.kind == self.detected_label:
                return list(finding.evidence)
        return []

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "source": self.source,
            "detected_label": self.detected_label,
            "stated_label": self.stated_label,
            "ambient": self.ambient,
            "isolation": self.isolation,
            "sgx_host": self.sgx_host,
            "evidence": self.evidence,
            "findings": [f.to_dict() for f in self.findings],
            "contradictions": list(self.contradictions),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "attestation_type": self.attestation_type,
            "tsm_providers": list(self.tsm_providers),
            "root": self.root,
        }


def _under(root: Path, absolute: str | Path) -> Path:
    return root / str(absolute).lstrip("/")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def cpu_flags(root: Path = Path("/")) -> set[str]:
    """Union of the ``flags`` lines of ``/proc/cpuinfo`` (empty when unreadable or non-x86)."""
    text = _read_text(_under(root, "/proc/cpuinfo"))
    flags: set[str] = set()
    if not text:
        return flags
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags.update(value.split())
    return flags


def tsm_providers(root: Path = Path("/"), *, probe: bool = True) -> tuple[list[str], list[str]]:
    """Providers behind configfs-tsm, and notes on how they were found.

    Existing report directories are read first. Only if there are none and ``probe`` is set do we
    create a throw-away directory (the kernel populates ``provider`` on mkdir) and remove it at
    once -- without it an idle TDX guest would show no provider at all.
    """
    report_dir = _under(root, TSM_REPORT_DIR)
    notes: list[str] = []
    found: list[str] = []
    if not report_dir.is_dir():
        return found, notes
    try:
        entries = sorted(p for p in report_dir.iterdir() if p.is_dir())
    except OSError as exc:
        notes.append(f"cannot list {TSM_REPORT_DIR}: {exc.strerror}")
        return found, notes
    for entry in entries:
        text = _read_text(entry / "provider")
        if text and text.strip() and text.strip() not in found:
            found.append(text.strip())
    if found or not probe:
        return found, notes
    probe_dir = report_dir / f"teefl-detect-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe_dir.mkdir()
    except OSError as exc:
        reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror
        notes.append(f"configfs-tsm report dir present, provider unreadable ({reason})")
        return found, notes
    try:
        text = _read_text(probe_dir / "provider")
        if text and text.strip():
            found.append(text.strip())
    finally:
        try:
            probe_dir.rmdir()
        except OSError as exc:
            notes.append(f"could not remove probe dir {probe_dir.name}: {exc.strerror}")
    return found, notes


def _add(findings: dict[str, list[str]], kind: str, evidence: str) -> None:
    findings.setdefault(kind, []).append(evidence)


def _probe(root: Path, probe_tsm: bool) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Collect raw observations: kind -> evidence strings, plus side facts."""
    findings: dict[str, list[str]] = {}
    facts: dict[str, Any] = {"notes": [], "attestation_type": None, "providers": []}
    flags = cpu_flags(root)

    # SGX-capable host.
    for dev in ("/dev/sgx_enclave", "/dev/sgx/enclave"):
        if _under(root, dev).exists():
            _add(findings, "sgx-host", f"file {dev} exists")
    if "sgx" in flags:
        _add(findings, "sgx-host", "cpuinfo flag sgx")

    # Gramine.
    att = _under(root, "/dev/attestation")
    if att.exists():
        att_type_path = att / "attestation_type"
        text = _read_text(att_type_path) if att_type_path.exists() else None
        if text is None:
            _add(findings, "gramine-direct", "file /dev/attestation exists")
            _add(findings, "gramine-direct", "no /dev/attestation/attestation_type")
        else:
            value = text.strip().strip("\x00").lower()
            facts["attestation_type"] = value
            if value in ("", "none"):
                _add(findings, "gramine-direct", "file /dev/attestation exists")
                _add(findings, "gramine-direct", f"/dev/attestation/attestation_type is {value!r}")
            elif value in ("dcap", "epid"):
                _add(findings, "gramine-sgx", f"/dev/attestation/attestation_type is {value!r}")
            else:
                facts["notes"].append(f"unknown Gramine attestation_type {value!r}")
                _add(findings, "gramine-direct", "file /dev/attestation exists")

    # TDX guest.
    if "tdx_guest" in flags:
        _add(findings, "tdx", "cpuinfo flag tdx_guest")
    if _under(root, "/dev/tdx_guest").exists():
        _add(findings, "tdx", "file /dev/tdx_guest exists")

    # SEV-SNP guest.
    if _under(root, "/dev/sev-guest").exists():
        _add(findings, "sev-snp", "file /dev/sev-guest exists")
    if "sev_snp" in flags:
        facts["notes"].append(
            "cpuinfo flag sev_snp: the CPU supports SEV-SNP (a host-side flag; not a guest marker)"
        )

    # configfs-tsm, shared by TDX and SEV-SNP guests (Linux 6.7+).
    providers, notes = tsm_providers(root, probe=probe_tsm)
    facts["providers"] = providers
    facts["notes"].extend(notes)
    for provider in providers:
        kind = _TSM_PROVIDER_LABEL.get(provider)
        if kind:
            _add(findings, kind, f"configfs-tsm provider {provider}")
        else:
            facts["notes"].append(f"unknown configfs-tsm provider {provider!r}")
    return findings, facts


def _contradictions(findings: dict[str, list[str]]) -> list[str]:
    """Marker combinations that real hardware cannot produce together."""
    out: list[str] = []
    has = findings.__contains__
    if has("tdx") and has("sev-snp"):
        out.append("both TDX and SEV-SNP guest markers present (Intel and AMD TEEs are exclusive)")
    if has("gramine-sgx") and not has("sgx-host"):
        # Inside an enclave Gramine exposes cpuinfo derived from CPUID, which carries the sgx flag.
        out.append("Gramine reports SGX attestation but no SGX CPU flag or SGX device is visible")
    if has("gramine-sgx") and has("tdx"):
        out.append("Gramine-SGX attestation inside a TDX guest (SGX is not available to TDs)")
    if has("sev-snp") and has("sgx-host"):
        out.append("SEV-SNP guest markers together with Intel SGX markers")
    if has("sev-snp") and has("gramine-sgx"):
        out.append("SEV-SNP guest markers together with Gramine-SGX attestation")
    return out


def normalise_label(label: str) -> str:
    """Lower-case a user-stated label and check its shape, so tables group it consistently."""
    value = label.strip().lower()
    if not _LABEL_RE.match(value):
        raise TeeflError(
            f"invalid TEE label {label!r}: use lower-case letters, digits, '.', '_' or '-' "
            f"(known labels: {', '.join(LABEL_PRECEDENCE)})"
        )
    return value


def detect_tee(
    root: Path = Path("/"), stated_label: str | None = None, *, probe_tsm: bool = True
) -> TeeInfo:
    """Probe ``root`` for TEE markers and return the label with the evidence behind it.

    ``stated_label`` is the user's explicit statement (``--tee-label``); it wins as the recorded
    label but is marked ``source: "stated"`` and any disagreement with detection is a warning.
    ``probe_tsm`` allows a throw-away configfs-tsm directory to read the provider (see
    ``tsm_providers``); set it to False for strictly read-only detection.
    """
    root = Path(root)
    raw, facts = _probe(root, probe_tsm)
    findings = tuple(Finding(kind, tuple(raw[kind])) for kind in LABEL_PRECEDENCE if kind in raw)
    detected = next((k for k in LABEL_PRECEDENCE if k in raw), "none")
    contradictions = _contradictions(raw)
    warnings: list[str] = []
    if contradictions:
        warnings.append(
            f"contradictory TEE evidence; label {detected!r} chosen by precedence "
            f"({' > '.join(LABEL_PRECEDENCE)}): " + "; ".join(contradictions)
        )

    ambient = next((k for k in ("tdx", "sev-snp") if k in raw), "none")
    isolation = next((k for k in ("gramine-sgx", "gramine-direct") if k in raw), "none")

    stated: str | None = None
    label, source = detected, "detected"
    if stated_label is not None:
        stated = normalise_label(stated_label)
        label, source = stated, "stated"
        if stated not in KNOWN_LABELS:
            warnings.append(f"stated TEE label {stated!r} is not one detection knows")
        if stated != detected:
            warnings.append(
                f"stated TEE label {stated!r} differs from detected {detected!r}; "
                "recording the stated label as source=stated"
            )
    for message in warnings:
        log.warning("%s", message)

    return TeeInfo(
        label=label,
        source=source,  # type: ignore[arg-type]
        detected_label=detected,
        stated_label=stated,
        ambient=ambient,
        isolation=isolation,
        sgx_host="sgx-host" in raw,
        findings=findings,
        contradictions=tuple(contradictions),
        warnings=tuple(warnings),
        notes=tuple(facts["notes"]),
        attestation_type=facts["attestation_type"],
        tsm_providers=tuple(facts["providers"]),
        root=str(root),
    )


def default_provider(
    root: Path = Path("/"), *, allow_simulated: bool = False, simulated_key: Path | None = None
) -> EvidenceProvider:
    """The provider this machine supports: Gramine-SGX, then configfs-tsm, then (if allowed)
    simulated, signing with ``simulated_key``. Raises EvidenceError naming what is missing when
    nothing fits."""
    # here, not at the top: detection needs no cryptography, only choosing a provider does
    from teefl.security.tee.evidence import ConfigfsTsmProvider, EvidenceError, GramineProvider
    from teefl.security.tee.simulated import SimulatedProvider

    gramine = GramineProvider(root)
    if gramine.dir.is_dir() and gramine.attestation_type() not in (None, "", "none"):
        return gramine
    tsm = ConfigfsTsmProvider(root)
    if tsm.available():
        return tsm
    if allow_simulated:
        return SimulatedProvider(allow_simulated=True, key_file=simulated_key)
    raise EvidenceError(
        "no attestation source: not inside gramine-sgx and no configfs-tsm "
        "(/sys/kernel/config/tsm/report); run in a TDX/SEV-SNP guest or under gramine-sgx, or "
        "set allow_simulated: true for tests"
    )


__all__ = [
    "KNOWN_LABELS",
    "LABEL_PRECEDENCE",
    "Finding",
    "TeeInfo",
    "cpu_flags",
    "default_provider",
    "detect_tee",
    "normalise_label",
    "tsm_providers",
]
