"""What a verifier accepts from an SEV-SNP guest (the ``snp:`` block of a role's policy).

AMD has no TCB status service like Intel's: whether a platform's firmware is recent enough is
decided by the policy's minimum TCB, component by component, against REPORTED_TCB (the TCB
the VCEK/VLEK was derived for; the host may report a lower TCB than it runs, never a higher one).
That is why a pinned SNP policy needs ``min_tcb`` as well as ``measurement``. The schema
(`SnpPolicy`) is part of the plan's and lives in `teefl.policyspec`; the checks live here.
"""

from __future__ import annotations

from typing import Any

from teefl.policyspec import SnpPolicy, SnpTcb, hex_list  # the schema, re-exported here


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
