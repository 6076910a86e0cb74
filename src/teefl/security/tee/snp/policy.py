"""What a verifier accepts from an SEV-SNP guest (the ``snp:`` block of a role's policy).

AMD has no TCB status service like Intel's: whether a platform's firmware is recent enough is
decided by the minimum TCB written here, component by component, against REPORTED_TCB (the TCB
the VCEK/VLEK was derived for; the host may report a lower TCB than it runs, never a higher one).
That is why a pinned SNP policy needs ``min_tcb`` as well as ``measurement``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


def _short(value: str) -> str:
    return f"{value[:16]}…" if len(value) > 16 else value


def check_snp(snp: dict[str, Any], policy: SnpPolicy, allow_debug: bool) -> list[str]:
    """Every SNP policy check ``snp`` (an ``SnpReport.to_dict()`` of a verified report) fails."""
    failures: list[str] = []
    if snp.get("debug") and not allow_debug:
        failures.append(
            f"SNP guest policy {snp['policy']} allows DEBUG: debug guests are refused "
            "(policy allow_debug is false)"
        )
    if snp.get("migrate_ma") and not policy.allow_migration_agent:
        failures.append(f"SNP guest policy {snp['policy']} allows a migration agent (MIGRATE_MA)")
    if snp.get("smt_enabled") and not policy.allow_smt:
        failures.append(f"SMT is enabled on the platform (PLATFORM_INFO {snp['platform_info']})")
    if snp.get("signer") not in policy.signers:
        failures.append(f"SNP report signed by a {str(snp.get('signer')).upper()}, not allowed")
    for name in ("measurement", "host_data", "id_key_digest", "author_key_digest"):
        allowed = getattr(policy, name)
        if allowed is not None and snp.get(name) not in allowed:
            failures.append(f"SNP {name.upper()} {_short(str(snp.get(name)))} not in policy")
    if policy.vmpl is not None and snp.get("vmpl") not in policy.vmpl:
        failures.append(f"SNP VMPL {snp.get('vmpl')} not in policy {policy.vmpl}")
    if policy.min_guest_svn is not None and int(snp.get("guest_svn", 0)) < policy.min_guest_svn:
        failures.append(
            f"SNP GUEST_SVN {snp.get('guest_svn')} below minimum {policy.min_guest_svn}"
        )
    if policy.min_tcb is not None:
        tcb = snp.get("reported_tcb", {})
        for name, minimum in policy.min_tcb.model_dump(exclude_none=True).items():
            have = tcb.get(name)
            if have is None:
                failures.append(f"SNP TCB has no {name} component, the policy needs >= {minimum}")
            elif have < minimum:
                failures.append(f"SNP TCB {name} {have} below the policy's minimum {minimum}")
    return failures


__all__ = ["SnpPolicy", "SnpTcb", "check_snp", "hex_list"]
