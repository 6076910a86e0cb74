"""``teefl tee gramine-manifest``: render the Gramine manifest of a teefl process.

Kept thin: the template and its checks live in ``teefl.security.tee.gramine_manifest``,
imported inside the command so ``teefl --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from teefl.commands.tee_common import Role, err_console


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
        err_console().print(f"wrote {out}")
