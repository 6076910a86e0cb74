"""``teefl tee policy``: the values to pin from a quote or report, as plan YAML.

Kept thin: it parses, calls into ``teefl.security.tee`` and prints; the security modules are
imported inside the command so ``teefl --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from teefl.commands.tee_common import (
    KDS,
    SNP_CERTS,
    SNP_CRL,
    Role,
    parse_time,
    read_bytes,
    snp_collateral,
)
from teefl.errors import TeeflError


def policy(
    quote: Path | None = typer.Argument(
        None, metavar="QUOTE_OR_REPORT", help="TDX/SGX quote or SEV-SNP report (format detected)."
    ),
    role: Role | None = typer.Option(
        None, "--role", help="Print it under security.attestation.policies.<role> for a plan."
    ),
    collateral: Path | None = typer.Option(None, "--collateral", help="Collateral JSON file."),
    pccs_url: str | None = typer.Option(None, "--pccs-url", help="Fetch collateral (network)."),
    snp_certs: list[Path] = SNP_CERTS,
    snp_crl: list[Path] = SNP_CRL,
    kds: bool = KDS,
    at: str | None = typer.Option(None, "--at", help="Verify as of this UTC time (ISO 8601)."),
    simulated_key: Path | None = typer.Option(
        None,
        "--simulated-key",
        help="Tests only: the simulated provider's key (created 0600 if absent); prints the "
        "policy pinning it and the simulated measurements.",
    ),
) -> None:
    """Print the values to pin from a quote or report, as YAML ready to paste into the plan.

    With collateral (--collateral/--pccs-url for DCAP, --snp-certs/--kds for SNP) the evidence
    is verified first; without it the values are read unverified and the output says so: pin
    only values read from a machine you control.
    """
    import yaml

    from teefl.security.tee.policy import ROLE_KEYS, policy_block
    from teefl.security.tee.verify import verify_any

    if (quote is None) == (simulated_key is None):
        raise TeeflError("give a QUOTE_OR_REPORT file or --simulated-key FILE (one of them)")
    note: str
    if simulated_key is not None:
        from teefl.security.tee.simulated import SimulatedProvider
        from teefl.security.tee.verify import SimulatedVerifier

        provider = SimulatedProvider(allow_simulated=True, key_file=simulated_key)
        evidence = provider.get_evidence(bytes(64))
        verdict = SimulatedVerifier(allow_simulated=True).verify(evidence.quote)
        note = f"SIMULATED evidence signed by {simulated_key} (tests and demos only)"
    else:
        assert quote is not None
        data = read_bytes(quote, "quote")
        from teefl.security.tee.snp import looks_like_snp_report

        snp = looks_like_snp_report(data)
        can_verify = (snp and (snp_certs or kds)) or (not snp and (collateral or pccs_url))
        if can_verify:
            verdict = verify_any(
                data,
                collateral_json=read_bytes(collateral, "collateral").decode()
                if collateral
                else None,
                pccs_url=pccs_url,
                snp_collateral=snp_collateral(snp_certs, snp_crl, kds, None),
                now=parse_time(at),
            )
            note = f"from {quote}, verified ({verdict.tee_type})"
        else:
            verdict = _unverified(data)
            note = (
                f"from {quote}, NOT VERIFIED (no collateral given): pin only values read from a "
                "machine you control"
            )
    body = policy_block(verdict)
    doc = (
        {"security": {"attestation": {"policies": {ROLE_KEYS[role.value]: body}}}}
        if role is not None
        else body
    )
    typer.echo(f"# teefl tee policy: {note}")
    typer.echo(yaml.safe_dump(doc, sort_keys=False, width=200), nl=False)


def _unverified(data: bytes):
    """A verdict from parsing alone (no signature checked), for printing pins."""
    from teefl.security.tee.quote import parse_quote_fields
    from teefl.security.tee.snp import looks_like_snp_report, parse_report
    from teefl.security.tee.verdict import QuoteVerdict

    if looks_like_snp_report(data):
        report = parse_report(data)
        fields = report.to_dict()
        fields["signer"] = fields["signing_key"]
        return QuoteVerdict(
            "sev-snp", report.version, "n/a", (), report.report_data, {}, details={"snp": fields}
        )
    f = parse_quote_fields(data)
    return QuoteVerdict(
        f.tee_type,
        f.version,
        "UpToDate",
        (),
        f.report_data,
        f.measurements,
        f.isv_prod_id,
        f.isv_svn,
    )
