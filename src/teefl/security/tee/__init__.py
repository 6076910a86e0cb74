"""Trusted execution environments: detection, evidence, verification and Gramine launch.

The pieces are independent so the federation can use them one at a time:

- ``detect.detect_tee`` -> ``TeeInfo`` (what this process runs in, with evidence),
- ``evidence`` providers turn 64 bytes of report data into a quote (``simulated``: the software
  stand-in for tests; ``detect.default_provider``: the one this machine supports),
- ``verify`` checks a quote (DCAP) or an SEV-SNP report (``snp``), parses its identity,
- ``policy`` says what a verifier accepts per role, including the binding of the evidence to the
  TLS key, and refuses a ``required`` policy that pins no identity,
- ``gramine`` renders manifests and wraps a command for gramine-direct / gramine-sgx.

Names are loaded lazily (PEP 562): the plan imports ``policy`` (pydantic only) without pulling
in the verifiers' cryptography, and heavy imports (dcap_qvl) happen inside the functions.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LABEL_PRECEDENCE": "detect",
    "TeeInfo": "detect",
    "detect_tee": "detect",
    "ConfigfsTsmProvider": "evidence",
    "Evidence": "evidence",
    "EvidenceError": "evidence",
    "EvidenceProvider": "evidence",
    "GramineProvider": "evidence",
    "SimulatedProvider": "simulated",
    "default_provider": "detect",
    "AttestationError": "errors",
    "AttestationPolicies": "policy",
    "Policy": "policy",
    "check_policy": "policy",
    "enforce_policy": "policy",
    "policy_block": "policy",
    "require_pinned": "policy",
    "QuoteVerdict": "verdict",
    "SimulatedVerifier": "verify",
    "report_data_for": "verify",
    "spki_der_of": "verify",
    "verify_any": "verify",
    "verify_evidence": "verify",
    "verify_quote": "verify",
    "verify_snp": "verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
