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


@tee_app.command("verify")
def verify(
    quote: Path = typer.Argument(..., help="Raw quote file (binary)."),
    collateral: Path | None = typer.Option(None, "--collateral", help="Collateral JSON file."),
    pccs_url: str | None = typer.Option(None, "--pccs-url", help="Fetch collateral (network)."),
    at: str | None = typer.Option(None, "--at", help="Verify as of this UTC time (ISO 8601)."),
    policy_file: Path | None = typer.Option(None, "--policy", help="Policy YAML file."),
    report_data: str | None = typer.Option(
        None, "--report-data", help="Expected REPORTDATA (128 hex chars); without it no binding."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Verify a DCAP quote and apply a policy; exit non-zero with the failed checks if refused."""
    from teefl.security.tee.verify import Policy, enforce_policy, verify_quote

    try:
        quote_bytes = quote.read_bytes()
        collateral_text = collateral.read_text() if collateral else None
    except OSError as exc:
        raise TeeflError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    verdict = verify_quote(quote_bytes, collateral_text, pccs_url, _parse_time(at))
    expected = None
    if report_data is not None:
        try:
            expected = bytes.fromhex(report_data)
        except ValueError as exc:
            raise TeeflError("--report-data must be hex") from exc
    if policy_file is not None:
        import yaml
        from pydantic import ValidationError

        try:
            raw = yaml.safe_load(policy_file.read_text()) or {}
            policy = Policy.model_validate(raw)
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise TeeflError(f"policy {policy_file}: {exc}") from exc
    else:
        policy = Policy(require_binding=expected is not None)
    if as_json:
        typer.echo(json.dumps(verdict.to_dict(), indent=2))
    else:
        console = _console()
        console.print(f"quote: {verdict.tee_type} v{verdict.quote_version}, signature valid")
        console.print(f"TCB status: [bold]{verdict.status}[/bold]")
        if verdict.advisory_ids:
            console.print("advisories: " + ", ".join(verdict.advisory_ids))
        for name, value in verdict.measurements.items():
            console.print(f"{name}: {value}", soft_wrap=True)
        console.print(f"report_data: {verdict.report_data.hex()}", soft_wrap=True)
    enforce_policy(verdict, policy, expected)
    if not as_json:
        _console().print("[green]accepted by policy[/green]")


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
    plan: Path | None = typer.Option(None, "--plan", help="Plan file (allowed file)."),
    cert: list[Path] = typer.Option([], "--cert", help="Certificate/key file (repeatable)."),
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
    from teefl.security.tee.gramine import render_manifest

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

    from teefl.security.sealed import load_key, read_sealed

    key = load_key(key_file, key_env)
    plaintext = read_sealed(src, key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(plaintext)
    os.replace(tmp, dst)
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
