"""Trusted execution environments: detection, evidence, verification and Gramine launch.

The pieces are independent so the federation can use them one at a time:

- ``detect.detect_tee`` -> ``TeeInfo`` (what this process runs in, with evidence),
- ``evidence`` providers turn 64 bytes of report data into a quote,
- ``verify`` checks a quote (DCAP), parses its identity and applies a ``Policy`` that includes the
  binding of the quote to the TLS key,
- ``gramine`` renders manifests and wraps a command for gramine-direct / gramine-sgx.

Heavy imports (dcap_qvl) happen inside the functions that need them.
"""

from teefl.security.tee.detect import LABEL_PRECEDENCE, TeeInfo, detect_tee
from teefl.security.tee.evidence import (
    ConfigfsTsmProvider,
    Evidence,
    EvidenceError,
    EvidenceProvider,
    GramineProvider,
    SimulatedProvider,
    default_provider,
)
from teefl.security.tee.verify import (
    AttestationError,
    Policy,
    QuoteVerdict,
    SimulatedVerifier,
    check_policy,
    enforce_policy,
    report_data_for,
    spki_der_of,
    verify_evidence,
    verify_quote,
)

__all__ = [
    "LABEL_PRECEDENCE",
    "AttestationError",
    "ConfigfsTsmProvider",
    "Evidence",
    "EvidenceError",
    "EvidenceProvider",
    "GramineProvider",
    "Policy",
    "QuoteVerdict",
    "SimulatedProvider",
    "SimulatedVerifier",
    "TeeInfo",
    "check_policy",
    "default_provider",
    "detect_tee",
    "enforce_policy",
    "report_data_for",
    "spki_der_of",
    "verify_evidence",
    "verify_quote",
]
