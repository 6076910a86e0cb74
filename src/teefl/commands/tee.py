"""CLI commands: ``teefl tee ...``: which commands the group has, and ``teefl tee info``
(detection). Each other command lives in a module of its own -- tee_verify.py (quote
verification), tee_policy.py (values to pin), tee_gramine.py (Gramine manifests) -- and is
added here, in the order ``teefl tee --help`` lists them.

Kept thin: every command parses, calls into ``teefl.security`` and prints. Imports of the
security modules happen inside the commands so ``teefl --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from teefl.commands.tee_common import err_console, out_console
from teefl.commands.tee_gramine import gramine_manifest
from teefl.commands.tee_policy import policy
from teefl.commands.tee_verify import verify

tee_app = typer.Typer(
    help="Trusted execution environments: detection, quote verification, Gramine manifests.",
    no_args_is_help=True,
)


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

    console = out_console()
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
    err = err_console()
    for contradiction in result.contradictions:
        err.print(f"[red]contradiction:[/red] {contradiction}")
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")


tee_app.command("info")(info)
tee_app.command("verify")(verify)
tee_app.command("policy")(policy)
tee_app.command(
    "gramine-manifest",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(gramine_manifest)


def register(app: typer.Typer) -> None:
    """Add the ``tee`` group to the teefl app."""
    app.add_typer(tee_app, name="tee")
