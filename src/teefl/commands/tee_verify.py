"""``teefl tee verify``: verify a DCAP quote or an SEV-SNP report and apply a policy.

Kept thin: it parses, calls into ``teefl.security.tee`` and prints; the security modules are
imported inside the command so ``teefl --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from teefl.commands.tee_common import (
    CERT_TABLE,
    KDS,
    SNP_CERTS,
    SNP_CRL,
    out_console,
    parse_time,
    read_bytes,
    snp_collateral,
)
from teefl.errors import TeeflError


def _load_policy(path: Path):
    import yaml
    from pydantic import ValidationError

    from teefl.security.tee.policy import Policy

    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return Policy.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        first = str(exc).splitlines()
        raise TeeflError(f"policy {path}: {' '.join(first[:3])}") from None


def verify(
    quote: Path = typer.Argument(
        ..., help="Raw quote or SEV-SNP report file (binary; format detected)."
    ),
    collateral: Path | None = typer.Option(None, "--collateral", help="Collateral JSON file."),
    pccs_url: str | None = typer.Option(None, "--pccs-url", help="Fetch collateral (network)."),
    snp_certs: list[Path] = SNP_CERTS,
    snp_crl: list[Path] = SNP_CRL,
    cert_table: Path | None = CERT_TABLE,
    kds: bool = KDS,
    at: str | None = typer.Option(None, "--at", help="Verify as of this UTC time (ISO 8601)."),
    policy_file: Path | None = typer.Option(
        None, "--policy", help="Policy YAML (one role's policy); it must pin the identity."
    ),
    report_data: str | None = typer.Option(
        None, "--report-data", help="Expected REPORTDATA (128 hex chars); without it no binding."
    ),
    allow_simulated: bool = typer.Option(
        False, "--allow-simulated", help="Accept a simulated quote (tests only)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Verify a DCAP quote or an SEV-SNP report and apply a policy; exit non-zero with the
    failed checks if refused. Without --policy only the defaults apply (TCB status UpToDate,
    no debug TEE) and nothing is pinned."""
    from teefl.security.tee.policy import Policy, enforce_policy
    from teefl.security.tee.verify import verify_any, verify_snp

    data = read_bytes(quote, "quote")
    collateral_text = read_bytes(collateral, "collateral").decode() if collateral else None
    when = parse_time(at)
    snp = snp_collateral(snp_certs, snp_crl, kds, None)
    if cert_table is not None:
        verdict = verify_snp(data, snp, when, guest_table=read_bytes(cert_table, "table"))
    else:
        verdict = verify_any(
            data,
            collateral_json=collateral_text,
            pccs_url=pccs_url,
            snp_collateral=snp,
            now=when,
            allow_simulated=allow_simulated,
        )
    expected = None
    if report_data is not None:
        try:
            expected = bytes.fromhex(report_data)
        except ValueError as exc:
            raise TeeflError("--report-data must be hex") from exc
    pinned = policy_file is not None
    policy = (
        _load_policy(policy_file) if policy_file else Policy(require_binding=expected is not None)
    )
    if as_json:
        typer.echo(json.dumps(verdict.to_dict(), indent=2))
    else:
        _print_verdict(verdict)
    enforce_policy(verdict, policy, expected, require_pinned=pinned)
    if not as_json:
        what = "accepted by policy" if pinned else "accepted (no --policy: nothing pinned)"
        out_console().print(f"[green]{what}[/green]")


def _print_verdict(verdict) -> None:
    console = out_console()
    kind = verdict.tee_type
    if kind == "sev-snp":
        snp = verdict.details["snp"]
        console.print(
            f"report: sev-snp v{verdict.quote_version}, {snp['product']}, signed by the "
            f"{snp['signer'].upper()} (chain to the AMD root checked"
            f"{', CRL checked' if snp['crl_checked'] else ', no CRL'})"
        )
        tcb = " ".join(f"{k}={v}" for k, v in snp["reported_tcb"].items() if k != "raw")
        console.print(f"reported TCB: [bold]{tcb}[/bold]")
        console.print(
            f"guest policy: {snp['policy']} (debug {'ALLOWED' if snp['debug'] else 'off'}), "
            f"VMPL {snp['vmpl']}, SMT {'on' if snp['smt_enabled'] else 'off'}"
        )
    else:
        console.print(f"quote: {kind} v{verdict.quote_version}, signature valid")
        console.print(f"TCB status: [bold]{verdict.status}[/bold]")
    if verdict.advisory_ids:
        console.print("advisories: " + ", ".join(verdict.advisory_ids))
    for name, value in verdict.measurements.items():
        console.print(f"{name}: {value}", soft_wrap=True)
    console.print(f"report_data: {verdict.report_data.hex()}", soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# teefl tee policy
# ----------------------------------------------------------------------------------------------
