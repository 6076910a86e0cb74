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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from teefl.security.tee.errors import AttestationError
from teefl.security.tee.snp.policy import SnpPolicy, check_snp, hex_list
from teefl.security.tee.verdict import QuoteVerdict

log = logging.getLogger("teefl.tee")

REPORT_DATA_SIZE = 64
TDX_PINS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
ROLES = ("aggregator", "collaborator")
#: the plan key of each role's policy (``security.attestation.policies.<key>``)
ROLE_KEYS = {"aggregator": "aggregator", "collaborator": "collaborators"}

# TD attribute and SGX attribute DEBUG bits (Intel TDX module spec; SGX SDM "ATTRIBUTES").
TD_ATTRIBUTE_DEBUG = 1 << 0
SGX_ATTRIBUTE_DEBUG = 1 << 1


class Policy(BaseModel):
    """What a verifier accepts. ``None`` for a list means "not checked".

    Defaults are strict where it is cheap to be: only ``UpToDate`` Intel platforms, no debug TEE,
    and the evidence must bind the TLS key of the connection. Measurement allow-lists have no
    default because their values depend on the image the operator built; ``require_pinned``
    refuses a policy without them wherever attestation is required.
    """

    model_config = ConfigDict(extra="forbid")

    #: Intel TCB statuses accepted for TDX/SGX (SEV-SNP is judged by ``snp.min_tcb``)
    accepted_tcb_statuses: list[str] = Field(default_factory=lambda: ["UpToDate"])
    #: accept a debug TD / debug enclave / SNP guest whose policy allows debugging
    allow_debug: bool = False
    # TDX
    mrtd: list[str] | None = None
    rtmr0: list[str] | None = None
    rtmr1: list[str] | None = None
    rtmr2: list[str] | None = None
    rtmr3: list[str] | None = None
    #: RTMRs deliberately left unchecked (e.g. RTMR3, extended at run time); warned at every start
    tdx_unpinned: list[Literal["rtmr0", "rtmr1", "rtmr2", "rtmr3"]] = Field(default_factory=list)
    mrconfigid: list[str] | None = None
    #: XFAM and TD attributes as in the quote (8 bytes, little-endian, hex)
    xfam: list[str] | None = None
    td_attributes: list[str] | None = None
    # SGX
    mrenclave: list[str] | None = None
    mrsigner: list[str] | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    # SEV-SNP
    snp: SnpPolicy | None = None
    # Binding and the test stand-in
    require_binding: bool = True
    allow_simulated: bool = False
    #: SHA-256 (hex) of the DER SubjectPublicKeyInfo of each accepted simulated signing key
    simulated_keys: list[str] | None = None

    @field_validator("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid")
    @classmethod
    def _tdx_hex(cls, v: list[str] | None, info: Any) -> list[str] | None:
        return hex_list(v, 48, info.field_name)

    @field_validator("xfam", "td_attributes")
    @classmethod
    def _tdx_u64(cls, v: list[str] | None, info: Any) -> list[str] | None:
        return hex_list(v, 8, info.field_name)

    @field_validator("mrenclave", "mrsigner", "simulated_keys")
    @classmethod
    def _hex32(cls, v: list[str] | None, info: Any) -> list[str] | None:
        return hex_list(v, 32, info.field_name)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        both = [r for r in self.tdx_unpinned if getattr(self, r) is not None]
        if both:
            raise ValueError(f"{', '.join(both)} both pinned and listed in tdx_unpinned")
        if self.allow_simulated:
            missing = []
            if not self.simulated_keys:
                missing.append(
                    "simulated_keys (SHA-256 of each simulated signing key's public key)"
                )
            missing += self.tdx_missing()
            if missing:
                raise ValueError(
                    "allow_simulated needs pinned simulated evidence, missing: "
                    + ", ".join(missing)
                    + " (`teefl tee policy --simulated-key FILE` prints them)"
                )
        return self

    # -- pins --------------------------------------------------------------------------------
    def tdx_missing(self) -> list[str]:
        """TDX measurements that must be pinned but are not (MRTD, RTMRs not in tdx_unpinned)."""
        return [
            name
            for name in TDX_PINS
            if name not in self.tdx_unpinned and getattr(self, name) is None
        ]

    def missing_pins(self, kind: str) -> list[str]:
        """What this policy lacks to accept evidence of ``kind`` under ``required``."""
        if kind == "tdx":
            return self.tdx_missing()
        if kind == "sgx":
            if self.mrenclave is not None:
                return []
            return [
                k for k in ("mrsigner", "isv_prod_id", "min_isv_svn") if getattr(self, k) is None
            ]
        if kind == "sev-snp":
            return (
                ["snp.measurement", "snp.min_tcb"]
                if self.snp is None
                else [f"snp.{k}" for k in self.snp.missing_pins()]
            )
        if kind == "simulated":
            if not self.allow_simulated:
                return ["allow_simulated"]
            return ([] if self.simulated_keys else ["simulated_keys"]) + self.tdx_missing()
        return [f"(no pins known for {kind} evidence)"]

    def pinned_kinds(self) -> list[str]:
        """The kinds of evidence this policy can accept when pins are required."""
        kinds = [k for k in ("tdx", "sgx", "sev-snp") if self._mentions(k)]
        kinds = [k for k in kinds if not self.missing_pins(k)]
        if self.allow_simulated and not self.missing_pins("simulated"):
            kinds.append("simulated")
        return kinds

    def _mentions(self, kind: str) -> bool:
        """Does the policy pin anything for ``kind`` (simulated counts as TDX-shaped)?"""
        fields = _KIND_FIELDS["tdx" if kind == "simulated" else kind]
        return any(getattr(self, f) is not None for f in fields)


_KIND_FIELDS = {
    "tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid", "xfam", "td_attributes"),
    "sgx": ("mrenclave", "mrsigner", "isv_prod_id", "min_isv_svn"),
    "sev-snp": ("snp",),
}

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


class AttestationPolicies(BaseModel):
    """``security.attestation.policies``: one policy per role of the party being verified.

    ``aggregator`` judges the aggregator's evidence (checked by every collaborator);
    ``collaborators`` judges each collaborator's evidence (checked by the aggregator). Two keys,
    because the two roles usually run different images and may run on different TEEs.
    """

    model_config = ConfigDict(extra="forbid")

    aggregator: Policy | None = None
    collaborators: Policy | None = None

    def for_role(self, role: str) -> Policy | None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return getattr(self, ROLE_KEYS[role])


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
    for other, fields in _KIND_FIELDS.items():
        if other == shape or own:
            continue  # a policy pinning this kind too may pin others (mixed federations)
        for name in fields:
            if getattr(policy, name) is not None:
                failures.append(f"{_DISPLAY[name]} required by policy but a {kind} quote has none")

    if shape == "tdx":
        names = TDX_PINS if kind == "simulated" else _KIND_FIELDS["tdx"]
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
    "AttestationPolicies",
    "Policy",
    "check_policy",
    "enforce_policy",
    "policy_block",
    "require_pinned",
]
