"""Security mechanisms: the x_k of the overhead model, from run metadata or from a config label.

Why a fixed vocabulary and order: the overhead model compares runs by *which* protections were on,
so ``tdx+tls`` from a CSV and a run whose run.json says ``{"tee": "tdx", "transport": "tls"}``
must become the same tuple ``("tdx", "tls")``, printed the same way everywhere.

Mapping from run.json ``config`` (as in the paper, SGX adds on top of gramine-direct):

=====================  =========================
run.json               mechanisms
=====================  =========================
transport tls          ``tls``
transport mtls         ``mtls``
launcher gramine-direct ``gramine``
launcher gramine-sgx   ``gramine`` + ``sgx``
at_rest sealed         ``sealed``
attestation required   ``attestation``
tee tdx / sev-snp / …  that label (VM-based TEE the whole run sat in)
=====================  =========================

A ``tee`` label of ``sgx`` is *not* a mechanism by itself: an SGX-capable host running a native
process protects nothing; only the ``gramine-sgx`` launcher puts the process in an enclave.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from teefl.errors import TeeflError

#: Display order of known mechanisms (isolation first, then protections added on top).
ORDER = (
    "gramine",
    "sgx",
    "tdx",
    "sev-snp",
    "sev",
    "cca",
    "tee-vm",
    "attestation",
    "sealed",
    "tls",
    "mtls",
)
BASELINE = "baseline"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_NO_TEE = {"", "none", "no", "off", "null", "unknown", "sgx"}


def _order_key(name: str) -> tuple[int, str]:
    if name in ORDER:
        return (ORDER.index(name), name)
    # unknown names are most likely other TEE labels: place them with the TEEs
    return (ORDER.index("tee-vm"), name)


def normalize(mechanisms: Iterable[str]) -> tuple[str, ...]:
    """Deduplicate and sort mechanism names in the canonical order."""
    return tuple(sorted({m for m in mechanisms}, key=_order_key))


def config_label(mechanisms: Iterable[str]) -> str:
    """``baseline`` for no mechanism, else the ``+``-joined names (``gramine+sgx+tls``)."""
    mechs = normalize(mechanisms)
    return "+".join(mechs) if mechs else BASELINE


def parse_config(label: str, *, where: str = "") -> tuple[str, ...]:
    """Parse a ``+``-joined label (``TDX + TLS`` works too); ``baseline``/``none`` is empty.

    Names are lower-cased; ``baseline`` inside a combination (``baseline+tls``, as the paper
    writes "Baseline + TLS") is dropped because it adds no mechanism.
    """
    text = str(label).strip().lower()
    if not text:
        raise TeeflError(f"empty configuration{where}: write 'baseline' for no mechanism")
    out = []
    for part in text.split("+"):
        name = part.strip().replace(" ", "-")
        if name in ("baseline", "none", "plain"):
            continue
        if not _NAME_RE.match(name):
            raise TeeflError(
                f"invalid mechanism {part.strip()!r} in configuration {label!r}{where}: use "
                "'+'-joined names such as tdx+tls or gramine+sgx, or 'baseline'"
            )
        out.append(name)
    return normalize(out)


def from_run_config(config: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Mechanisms that were on in a run, from run.json's ``config`` (missing keys = off)."""
    if not config:
        return ()
    mechs: list[str] = []
    transport = str(config.get("transport") or "none").lower()
    if transport in ("tls", "mtls"):
        mechs.append(transport)
    launcher = str(config.get("launcher") or "native").lower()
    if launcher == "gramine-direct":
        mechs.append("gramine")
    elif launcher == "gramine-sgx":
        mechs += ["gramine", "sgx"]
    if str(config.get("at_rest") or "plain").lower() == "sealed":
        mechs.append("sealed")
    if str(config.get("attestation") or "off").lower() == "required":
        mechs.append("attestation")
    tee = str(config.get("tee") or "none").strip().lower()
    if tee not in _NO_TEE:
        mechs.append(tee)
    return normalize(mechs)
