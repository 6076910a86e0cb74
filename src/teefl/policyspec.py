"""The attestation policy schema of a plan (``security.attestation.policies``), torch- and
crypto-free.

Why apart from the verifiers (`teefl.security.tee.policy`, which import this): loading a plan
validates its policies, and the plan must not import the security package to do so (the
import rules in tests/unit/core/test_import_rules.py). This module is the data and what follows
from the data alone (which pins a policy has, which it lacks); judging evidence against it stays
in security.
What each pin is for, and why pinning is enforced: `teefl.security.tee.policy`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TDX_PINS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
ROLES = ("aggregator", "collaborator")
#: the plan key of each role's policy (``security.attestation.policies.<key>``)
ROLE_KEYS = {"aggregator": "aggregator", "collaborator": "collaborators"}


def hex_list(values: list[str] | None, size: int, name: str) -> list[str] | None:
    """Normalise a list of hex strings (``0x``, upper case, spaces allowed) of ``size`` bytes."""
    if values is None:
        return None
    out = []
    for value in values:
        v = str(value).strip().lower().removeprefix("0x")
        if not re.fullmatch(r"[0-9a-f]*", v) or len(v) != 2 * size:
            raise ValueError(f"{name}: {value!r} is not {size} bytes of hex")
        out.append(v)
    return out


class SnpTcb(BaseModel):
    """Minimum security patch level per TCB component (``fmc`` exists on Turin only)."""

    model_config = ConfigDict(extra="forbid")

    bootloader: int = Field(ge=0, le=255)
    tee: int = Field(ge=0, le=255)
    snp: int = Field(ge=0, le=255)
    microcode: int = Field(ge=0, le=255)
    fmc: int | None = Field(None, ge=0, le=255)


class SnpPolicy(BaseModel):
    """SEV-SNP checks. ``None`` for a list = not checked; ``measurement`` + ``min_tcb`` pin it."""

    model_config = ConfigDict(extra="forbid")

    #: launch digests (48 bytes hex) the guest may have
    measurement: list[str] | None = None
    #: minimum REPORTED_TCB, per component
    min_tcb: SnpTcb | None = None
    #: HOST_DATA values (32 bytes hex) the hypervisor may have set at launch
    host_data: list[str] | None = None
    #: digests (48 bytes hex) of the ID key / author key that signed the guest's ID block
    id_key_digest: list[str] | None = None
    author_key_digest: list[str] | None = None
    #: VMPLs the report may come from (0 = most privileged)
    vmpl: list[int] | None = None
    #: lowest accepted GUEST_SVN
    min_guest_svn: int | None = Field(None, ge=0)
    #: refuse a platform running with SMT enabled (PLATFORM_INFO.SMT_EN) when false
    allow_smt: bool = True
    #: accept a guest whose policy allows a migration agent (MIGRATE_MA)
    allow_migration_agent: bool = False
    #: VCEK (per chip), VLEK (per cloud provider) or both
    signers: list[str] = Field(default_factory=lambda: ["vcek", "vlek"])

    @field_validator("measurement", "id_key_digest", "author_key_digest")
    @classmethod
    def _hex48(cls, v: list[str] | None, info: Any) -> list[str] | None:
        return hex_list(v, 48, info.field_name)

    @field_validator("host_data")
    @classmethod
    def _hex32(cls, v: list[str] | None, info: Any) -> list[str] | None:
        return hex_list(v, 32, info.field_name)

    @field_validator("signers")
    @classmethod
    def _signers(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in ("vcek", "vlek")]
        if bad or not v:
            raise ValueError(f"signers: choose from vcek, vlek (got {v})")
        return v

    @property
    def pinned(self) -> bool:
        return self.measurement is not None and self.min_tcb is not None

    def missing_pins(self) -> list[str]:
        return [k for k in ("measurement", "min_tcb") if getattr(self, k) is None]


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
        fields = KIND_FIELDS["tdx" if kind == "simulated" else kind]
        return any(getattr(self, f) is not None for f in fields)


KIND_FIELDS = {
    "tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid", "xfam", "td_attributes"),
    "sgx": ("mrenclave", "mrsigner", "isv_prod_id", "min_isv_svn"),
    "sev-snp": ("snp",),
}


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


__all__ = [
    "KIND_FIELDS",
    "ROLES",
    "ROLE_KEYS",
    "TDX_PINS",
    "AttestationPolicies",
    "Policy",
    "SnpPolicy",
    "SnpTcb",
    "hex_list",
]
