"""CLI commands: ``teefl workload digest|list`` -- the workloads a plan can name, and their code.

``digest`` prints the SHA-256 a user puts into a policy to say which training code a party may
run (`teefl.workload.digest` says exactly what it covers). It runs none of the workload's code
and imports no torch, so it works on a machine that could not run the workload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

workload_app = typer.Typer(
    help="Your own workloads: list the known ones, print a workload's code digest.",
    no_args_is_help=True,
)


@workload_app.command("digest")
def digest(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF", help="A workload name (vision), package.module:Class or ./file.py:Class."
        ),
    ],
    base_dir: Annotated[
        Path | None,
        typer.Option(
            "--base-dir", help="What a ./file.py reference is relative to (the plan's directory)."
        ),
    ] = None,
    files: Annotated[
        bool, typer.Option("--files", help="Also list each covered file with its SHA-256.")
    ] = False,
) -> None:
    """Print the workload digest of REF: SHA-256 over its code files and teefl's version."""
    from teefl.workload.digest import describe_files, workload_digest

    if not files:
        typer.echo(workload_digest(ref, base_dir))
        return
    value, root, listing = describe_files(ref, base_dir)
    typer.echo(value)
    typer.echo(f"# code root: {root} ({len(listing)} files)")
    for f in listing:
        typer.echo(f"{f.sha256}  {f.size:>9}  {f.path}")


@workload_app.command("list")
def list_() -> None:
    """The workload names a plan can use (built-in, registered, installed entry points)."""
    from teefl.workload.registry import WORKLOADS

    for name in WORKLOADS.names():
        typer.echo(name)


def register(app: typer.Typer) -> None:
    """Add the ``workload`` group to the teefl app."""
    app.add_typer(workload_app, name="workload")
