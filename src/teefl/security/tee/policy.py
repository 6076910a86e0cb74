"""The attestation policy: what a verifier accepts, per role, and what must be pinned.

Why pinning is enforced: a genuine quote only proves "some TEE of this vendor ran *something*".
Without the measurements of the image the operator built, an attacker's own TD, enclave or SNP
guest on a genuine platform passes, with its own key bound into the report. So a policy used with
``attestation: required`` must pin an identity (checked at start by ``require_pinned``):

- TDX: MRTD and RTMR0-3; a subset only when the plan says so (``tdx_unpinned``), with a warning
  logged at every start;
- SGX: MRENCLAVE, or MRSIGNER + ISV_PROD_ID + a minimum ISV SVN;
- SEV-SNP: ``snp.measurement`` and ``snp.min_tcb`` (AMD has no TCB status service; the minimum
  TCB is what stands for Intel's "UpToDate");
- simulated (tests only): the SHA-256 fingerprints of the simulated signing keys plus the TDX-shaped
  simulated measurements -- enforced by the model itself, whatever the attestation mode.

Debug TEEs are refused unless ``allow_debug`` (TDX TD attribute DEBUG, SGX attribute DEBUG, SNP
guest policy DEBUG): their memory can be read by the host, so their evidence proves nothing.
A policy may pin several TEE kinds (a federation of TDX and SNP parties); each piece of evidence
is judged by the pins of its own kind.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from teefl.policyspec import (
    KIND_FIELDS,
    ROLE_KEYS,
    ROLES,
    TDX_PINS,
    AttestationPolicies,
    Policy,
    SnpPolicy,
)
from teefl.security.tee.errors import AttestationError
from teefl.security.tee.snp.policy import check_snp
from teefl.security.tee.verdict import QuoteVerdict

log = logging.getLogger("teefl.tee")

REPORT_DATA_SIZE = 64
# TD attribute and SGX attribute DEBUG bits (Intel TDX module spec; SGX SDM "ATTRIBUTES").
TD_ATTRIBUTE_DEBUG = 1 << 0
SGX_ATTRIBUTE_DEBUG = 1 << 1


_DISPLAY = {
    "mrtd": "MRTD",
    "rtmr0": "RTMR0",
    "rtmr1": "RTMR1",
    "rtmr2": "RTMR2",
    "rtmr3": "RTMR3",
    "mrconfigid": "MRCONFIGID",
    "xfam": "XFAM",
    "td_attributes": "TD attributes",
    "mrenclave": "MRENCLAVE",
    "mrsigner": "MRSIGNER",
    "isv_prod_id": "ISV PROD ID",
    "min_isv_svn": "ISV SVN",
    "snp": "an SNP section",
}
#: where each TDX policy field is found in the verdict's measurements
_TDX_SOURCE = {"mrconfigid": "mr_config_id"}


def require_pinned(policy: Policy | None, where: str) -> list[str]:
    """Refuse (AttestationError, one line) a policy that cannot pin any identity; return the
    warnings to log at every start (a stated TDX subset).

    ``where`` names the plan key, e.g. ``security.attestation.policies.collaborators``.
    """
    hint = "`teefl tee policy QUOTE_OR_REPORT --role ROLE` prints the values to pin from a quote"
    if policy is None:
        raise AttestationError(f"{where} is not set but attestation is required: {hint}")
    if not policy.require_binding:
        raise AttestationError(
            f"{where}.require_binding is false: with attestation required, evidence must bind "
            "the TLS key of the connection"
        )
    if not policy.pinned_kinds():
        wanted = {k: policy.missing_pins(k) for k in ("tdx", "sgx", "sev-snp")}
        partial = [k for k in wanted if policy._mentions(k)]
        detail = (
            "; ".join(f"{k} lacks {', '.join(wanted[k])}" for k in partial)
            if partial
            else "no measurement is pinned"
        )
        raise AttestationError(
            f"{where} pins no TEE identity ({detail}): pin TDX MRTD+RTMR0-3 (or state a subset "
            "with tdx_unpinned), SGX MRENCLAVE or MRSIGNER+ISV_PROD_ID+min_isv_svn, or SNP "
            f"measurement+min_tcb; {hint}"
        )
    warnings = []
    if policy.tdx_unpinned and "tdx" in policy.pinned_kinds():
        pinned = [n.upper() for n in TDX_PINS if n not in policy.tdx_unpinned]
        warnings.append(
            f"{where} pins only {', '.join(pinned)} of a TD: "
            f"{', '.join(r.upper() for r in policy.tdx_unpinned)} NOT CHECKED (tdx_unpinned), "
            "so any code measured there is accepted"
        )
    if policy.allow_debug:
        warnings.append(f"{where}.allow_debug is true: DEBUG TEEs (host-readable) are accepted")
    return warnings


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _short(hex_value: str) -> str:
    return f"{hex_value[:16]}…" if len(hex_value) > 16 else hex_value


def _u64(hex_le: str) -> int:
    return int.from_bytes(bytes.fromhex(hex_le), "little") if hex_le else 0


def check_policy(
    verdict: QuoteVerdict,
    policy: Policy,
    expected_report_data: bytes | None,
    *,
    require_pinned: bool = False,
) -> list[str]:
    """Every policy check the verdict fails, as readable sentences (empty list = accepted).

    ``require_pinned``: the evidence's own kind must be fully pinned (what the federation uses;
    ``teefl tee verify --policy`` too). Without it a partial policy checks what it names.
    """
    failures: list[str] = []
    kind = verdict.tee_type
    if require_pinned:
        missing = policy.missing_pins(kind)
        if missing:
            failures.append(
                f"{kind} evidence refused: the policy does not pin {', '.join(missing)}"
            )
    if verdict.simulated:
        if not policy.allow_simulated:
            failures.append("simulated evidence not accepted (policy allow_simulated is false)")
        else:
            key = str(verdict.details.get("signing_key_sha256", ""))
            if key not in (policy.simulated_keys or []):
                failures.append(
                    f"simulated signing key {_short(key) or '(none)'} not in policy simulated_keys"
                )
        # A simulated quote has no TCB; its status is not compared with real statuses.
    elif kind in ("tdx", "sgx") and verdict.status not in policy.accepted_tcb_statuses:
        advisories = (
            f" (advisories {', '.join(verdict.advisory_ids)})" if verdict.advisory_ids else ""
        )
        failures.append(f"TCB status {verdict.status} not accepted{advisories}")

    shape = "tdx" if kind == "simulated" else kind
    own = policy._mentions(kind)
    for other, fields in KIND_FIELDS.items():
        if other == shape or own:
            continue  # a policy pinning this kind too may pin others (mixed federations)
        for name in fields:
            if getattr(policy, name) is not None:
                failures.append(f"{_DISPLAY[name]} required by policy but a {kind} quote has none")

    if shape == "tdx":
        names = TDX_PINS if kind == "simulated" else KIND_FIELDS["tdx"]
        for name in names:
            allowed = getattr(policy, name)
            if allowed is None:
                continue
            value = verdict.measurements.get(_TDX_SOURCE.get(name, name), "")
            if value not in allowed:
                failures.append(f"{_DISPLAY[name]} {_short(value)} not in policy")
        if (
            kind == "tdx"
            and _u64(verdict.measurements.get("td_attributes", "")) & (TD_ATTRIBUTE_DEBUG)
            and not policy.allow_debug
        ):
            failures.append("TD attribute DEBUG is set: debug TDs are refused (allow_debug)")
    elif kind == "sgx":
        for name in ("mrenclave", "mrsigner"):
            allowed = getattr(policy, name)
            if allowed is not None and verdict.measurements.get(name, "") not in allowed:
                value = verdict.measurements.get(name, "")
                failures.append(f"{_DISPLAY[name]} {_short(value)} not in policy")
        if policy.isv_prod_id is not None and verdict.isv_prod_id != policy.isv_prod_id:
            failures.append(f"ISV PROD ID {verdict.isv_prod_id} is not {policy.isv_prod_id}")
        if policy.min_isv_svn is not None and (verdict.isv_svn or 0) < policy.min_isv_svn:
            failures.append(f"ISV SVN {verdict.isv_svn} below minimum {policy.min_isv_svn}")
        flags = _u64(verdict.measurements.get("attributes", "")[:16])
        if flags & SGX_ATTRIBUTE_DEBUG and not policy.allow_debug:
            failures.append("enclave attribute DEBUG is set: debug enclaves are refused")
    elif kind == "sev-snp":
        snp = verdict.details.get("snp") or {}
        # without an snp section only the defaults apply (no debug, no migration agent); a
        # pinned check has already refused such a policy above
        failures += check_snp(snp, policy.snp or SnpPolicy(), policy.allow_debug)

    if policy.require_binding:
        if expected_report_data is None:
            failures.append("report data binding required but no expected value was given")
        elif len(verdict.report_data) != REPORT_DATA_SIZE or not hmac.compare_digest(
            verdict.report_data, bytes(expected_report_data)
        ):
            failures.append("report data does not bind the TLS key")
    return failures


def enforce_policy(
    verdict: QuoteVerdict,
    policy: Policy,
    expected_report_data: bytes | None,
    *,
    require_pinned: bool = False,
) -> None:
    """Raise AttestationError naming every failed check; return quietly when accepted."""
    failures = check_policy(verdict, policy, expected_report_data, require_pinned=require_pinned)
    if failures:
        raise AttestationError("attestation refused: " + "; ".join(failures))


def policy_block(verdict: QuoteVerdict) -> dict[str, Any]:
    """The policy that pins exactly what ``verdict`` shows (for ``teefl tee policy``)."""
    m = verdict.measurements
    out: dict[str, Any] = {}
    if verdict.tee_type == "tdx":
        out["accepted_tcb_statuses"] = [verdict.status]
        for name in (*TDX_PINS, "mrconfigid", "xfam", "td_attributes"):
            out[name] = [m[_TDX_SOURCE.get(name, name)]]
        if _u64(m.get("td_attributes", "")) & TD_ATTRIBUTE_DEBUG:
            out["allow_debug"] = True
    elif verdict.tee_type == "sgx":
        out["accepted_tcb_statuses"] = [verdict.status]
        out["mrenclave"] = [m["mrenclave"]]
        out["mrsigner"] = [m["mrsigner"]]
        out["isv_prod_id"] = verdict.isv_prod_id
        out["min_isv_svn"] = verdict.isv_svn
        if _u64(m.get("attributes", "")[:16]) & SGX_ATTRIBUTE_DEBUG:
            out["allow_debug"] = True
    elif verdict.tee_type == "sev-snp":
        snp = verdict.details["snp"]
        tcb = {
            k: snp["reported_tcb"][k]
            for k in ("bootloader", "tee", "snp", "microcode", "fmc")
            if k in snp["reported_tcb"]
        }
        out["snp"] = {
            "measurement": [snp["measurement"]],
            "min_tcb": tcb,
            "host_data": [snp["host_data"]],
            "id_key_digest": [snp["id_key_digest"]],
            "author_key_digest": [snp["author_key_digest"]],
            "vmpl": [snp["vmpl"]],
            "min_guest_svn": snp["guest_svn"],
            "signers": [snp["signer"]],
        }
        if not snp.get("smt_enabled"):
            out["snp"]["allow_smt"] = False
        if snp.get("debug"):
            out["allow_debug"] = True
    elif verdict.tee_type == "simulated":
        out["allow_simulated"] = True
        out["simulated_keys"] = [verdict.details["signing_key_sha256"]]
        for name in TDX_PINS:
            out[name] = [m[name]]
    else:  # pragma: no cover - every verifier's kind is listed above
        raise AttestationError(f"no policy template for {verdict.tee_type} evidence")
    return out


__all__ = [
    "ROLES",
    "ROLE_KEYS",
    "TDX_PINS",
    "AttestationPolicies",
    "Policy",
    "check_policy",
    "enforce_policy",
    "policy_block",
    "require_pinned",
]
