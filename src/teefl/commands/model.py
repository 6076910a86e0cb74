"""CLI commands: ``teefl model ...`` (sealed models: decrypt, create keys).

Kept thin: every command parses, calls into ``teefl.security.sealed`` and prints, imported
inside the commands so ``teefl --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from teefl.commands.tee_common import err_console
from teefl.errors import TeeflError

model_app = typer.Typer(
    help="Sealed (encrypted) models: decrypt, create keys.", no_args_is_help=True
)


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
    err_console().print(f"decrypted {src} -> {dst} ({len(plaintext)} bytes)")


@model_app.command("keygen")
def keygen(
    path: Path = typer.Argument(..., metavar="FILE", help="Key file to create (mode 0600)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Create a random AES-256 sealing key as 64 hex characters (usable as --key-env value)."""
    from teefl.security.sealed import key_id, write_key_file

    key = write_key_file(path, overwrite=force)
    err_console().print(f"wrote {path} (mode 0600, key id {key_id(key).hex()})")


def register(app: typer.Typer) -> None:
    """Add the ``model`` group to the teefl app."""
    app.add_typer(model_app, name="model")
