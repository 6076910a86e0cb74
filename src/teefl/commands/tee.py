"""CLI commands: ``teefl tee ...`` (detection, quotes, Gramine) and ``teefl model ...`` (sealing).

Kept thin: every command parses, calls into ``teefl.security`` and prints. Imports of the
security modules happen inside the commands so ``teefl --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import typer

from teefl.errors import TeeflError

tee_app = typer.Typer(
    help="Trusted execution environments: detection, quote verification, Gramine manifests.",
    no_args_is_help=True,
)
model_app = typer.Typer(
    help="Sealed (encrypted) models: decrypt, create keys.", no_args_is_help=True
)


class Role(StrEnum):
    aggregator = "aggregator"
    collaborator = "collaborator"


def _console():
    from rich.console import Console

    return Console()


def _err_console():
    from rich.console import Console

    return Console(stderr=True)


# ----------------------------------------------------------------------------------------------
# teefl tee info
# ----------------------------------------------------------------------------------------------


@tee_app.command("info")
def info(
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON."),
    root: Path = typer.Option(Path("/"), "--root", help="Probe this tree instead of / (testing)."),
    tee_label: str | None = typer.Option(
        None,
        "--tee-label",
        help="State the TEE yourself (recorded as source=stated, detection kept beside it).",
    ),
) -> None:
    """Detect the TEE this process runs in and show the evidence behind the label."""
    import logging

    from teefl.security.tee.detect import detect_tee

    logging.getLogger("teefl.tee").setLevel(logging.ERROR)  # warnings are printed below instead
    result = detect_tee(root, tee_label)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    console = _console()
    table = Table(show_header=False, box=None)
    table.add_row("label", f"[bold]{result.label}[/bold] ({result.source})")
    if result.source == "stated":
        table.add_row("detected", result.detected_label)
    table.add_row("ambient (VM)", result.ambient)
    table.add_row("isolation", result.isolation)
    table.add_row("SGX-capable host", "yes" if result.sgx_host else "no")
    if result.attestation_type:
        table.add_row("Gramine attestation", result.attestation_type)
    if result.tsm_providers:
        table.add_row("configfs-tsm", ", ".join(result.tsm_providers))
    console.print(table)
    for finding in result.findings:
        console.print(f"[cyan]{finding.kind}[/cyan]: " + "; ".join(finding.evidence))
    if not result.findings:
        console.print("no TEE markers found")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]")
    err = _err_console()
    for contradiction in result.contradictions:
        err.print(f"[red]contradiction:[/red] {contradiction}")
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")


# ----------------------------------------------------------------------------------------------
# teefl tee verify
# ----------------------------------------------------------------------------------------------


def _parse_time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise TeeflError(
            f"--at {value!r} is not an ISO 8601 time (e.g. 2025-07-01T00:00:00Z)"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _snp_collateral(certs: list[Path], crls: list[Path], kds: bool, kds_cache: Path | None):
    from teefl.security.tee.snp.collateral import SnpCollateral, default_kds_cache

    cache = (kds_cache or default_kds_cache()) if kds else None
    return SnpCollateral.from_files(certs, crls, kds_cache=cache)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TeeflError(f"cannot read {what} {path}: {exc.strerror}") from None


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


_SNP_CERTS = typer.Option(
    [], "--snp-certs", help="AMD cert_chain / VCEK / VLEK file (PEM or DER; repeatable)."
)
_SNP_CRL = typer.Option([], "--snp-crl", help="AMD CRL file (repeatable).")
_CERT_TABLE = typer.Option(
    None, "--cert-table", help="The guest's SNP certificate table (configfs-tsm auxblob)."
)
_KDS = typer.Option(False, "--kds", help="Fetch missing SNP collateral from AMD KDS (network).")


@tee_app.command("verify")
def verify(
    quote: Path = typer.Argument(
        ..., help="Raw quote or SEV-SNP report file (binary; format detected)."
    ),
    collateral: Path | None = typer.Option(None, "--collateral", help="Collateral JSON file."),
    pccs_url: str | None = typer.Option(None, "--pccs-url", help="Fetch collateral (network)."),
    snp_certs: list[Path] = _SNP_CERTS,
    snp_crl: list[Path] = _SNP_CRL,
    cert_table: Path | None = _CERT_TABLE,
    kds: bool = _KDS,
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

    data = _read_bytes(quote, "quote")
    collateral_text = _read_bytes(collateral, "collateral").decode() if collateral else None
    when = _parse_time(at)
    snp = _snp_collateral(snp_certs, snp_crl, kds, None)
    if cert_table is not None:
        verdict = verify_snp(data, snp, when, guest_table=_read_bytes(cert_table, "table"))
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
        _console().print(f"[green]{what}[/green]")


def _print_verdict(verdict) -> None:
    console = _console()
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


@tee_app.command("policy")
def policy(
    quote: Path | None = typer.Argument(
        None, metavar="QUOTE_OR_REPORT", help="TDX/SGX quote or SEV-SNP report (format detected)."
    ),
    role: Role | None = typer.Option(
        None, "--role", help="Print it under security.attestation.policies.<role> for a plan."
    ),
    collateral: Path | None = typer.Option(None, "--collateral", help="Collateral JSON file."),
    pccs_url: str | None = typer.Option(None, "--pccs-url", help="Fetch collateral (network)."),
    snp_certs: list[Path] = _SNP_CERTS,
    snp_crl: list[Path] = _SNP_CRL,
    kds: bool = _KDS,
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
        data = _read_bytes(quote, "quote")
        from teefl.security.tee.snp import looks_like_snp_report

        snp = looks_like_snp_report(data)
        can_verify = (snp and (snp_certs or kds)) or (not snp and (collateral or pccs_url))
        if can_verify:
            verdict = verify_any(
                data,
                collateral_json=_read_bytes(collateral, "collateral").decode()
                if collateral
                else None,
                pccs_url=pccs_url,
                snp_collateral=_snp_collateral(snp_certs, snp_crl, kds, None),
                now=_parse_time(at),
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


# ----------------------------------------------------------------------------------------------
# teefl tee gramine-manifest
# ----------------------------------------------------------------------------------------------


@tee_app.command(
    "gramine-manifest",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def gramine_manifest(
    ctx: typer.Context,
    role: Role = typer.Option(..., "--role", help="Which teefl process the manifest is for."),
    sgx: bool = typer.Option(False, "--sgx", help="For gramine-sgx (adds DCAP attestation)."),
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
    python: Path = typer.Option(Path(sys.executable), "--python", help="Interpreter to run."),
    plan: Path | None = typer.Option(None, "--plan", help="Plan file (trusted: hashed)."),
    cert: list[Path] = typer.Option(
        [], "--cert", help="Certificate (trusted: hashed) or key file (allowed); repeatable."
    ),
    data: list[Path] = typer.Option([], "--data", help="Dataset directory (repeatable)."),
    run_dir: Path = typer.Option(Path("runs"), "--run-dir", help="Run directory (writable)."),
    threads: int = typer.Option(1, "--threads", help="Compute threads (OMP/MKL)."),
    enclave_size: str = typer.Option("16G", "--enclave-size"),
    max_threads: int = typer.Option(64, "--max-threads"),
    checkpoint_dir: Path | None = typer.Option(
        None, "--checkpoint-dir", help="Encrypted mount for checkpoints."
    ),
) -> None:
    """Render a Gramine manifest template; a command after `--` becomes loader.argv."""
    from teefl.security.tee.gramine_manifest import render_manifest

    command = [str(a) for a in ctx.args]
    if command and command[0] == "--":
        command = command[1:]
    text = render_manifest(
        role.value,
        python=python,
        plan_path=plan,
        cert_paths=cert,
        data_dirs=data,
        run_dir=run_dir,
        sgx=sgx,
        enclave_size=enclave_size,
        max_threads=max_threads,
        threads=threads,
        argv=[str(python), *command] if command else None,
        checkpoint_dir=checkpoint_dir,
    )
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        _err_console().print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------
# teefl model decrypt / keygen
# ----------------------------------------------------------------------------------------------


@model_app.command("decrypt")
def decrypt(
    src: Path = typer.Argument(..., metavar="IN", help="Sealed file."),
    dst: Path = typer.Argument(..., metavar="OUT", help="Where to write the plaintext."),
    key_file: Path | None = typer.Option(None, "--key-file", help="Key: 32 bytes or 64 hex."),
    key_env: str | None = typer.Option(None, "--key-env", help="Env variable holding hex key."),
) -> None:
    """Decrypt a sealed checkpoint or model (AES-256-GCM) with the owner's key."""
    import os
    import secrets

    from teefl.security.sealed import load_key, read_sealed

    key = load_key(key_file, key_env)
    plaintext = read_sealed(src, key)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # The plaintext goes to a new file that nobody else can have prepared: a random name,
        # O_EXCL (never an existing file), O_NOFOLLOW (never through a planted symlink), 0600.
        # The rename then replaces OUT itself, not what a symlink at OUT points to.
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(8)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise TeeflError(f"cannot write {dst}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(plaintext)
        os.replace(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise TeeflError(f"cannot write {dst}: {exc.strerror}") from None
        raise
    _err_console().print(f"decrypted {src} -> {dst} ({len(plaintext)} bytes)")


@model_app.command("keygen")
def keygen(
    path: Path = typer.Argument(..., metavar="FILE", help="Key file to create (mode 0600)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Create a random AES-256 sealing key as 64 hex characters (usable as --key-env value)."""
    from teefl.security.sealed import key_id, write_key_file

    key = write_key_file(path, overwrite=force)
    _err_console().print(f"wrote {path} (mode 0600, key id {key_id(key).hex()})")


def register(app: typer.Typer) -> None:
    """Add the ``tee`` and ``model`` groups to the teefl app."""
    app.add_typer(tee_app, name="tee")
    app.add_typer(model_app, name="model")
