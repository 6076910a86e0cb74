"""Launching a teefl process under Gramine: the Gramine tools' steps, and the command line.

Flow (the same steps a Gramine user runs by hand):

1. ``render_manifest`` -> ``<name>.manifest.template`` (TOML with two Jinja placeholders,
   ``{{ gramine.libos }}`` and ``{{ gramine.runtimedir() }}``, that only Gramine can resolve),
2. ``preprocess_manifest`` runs ``gramine-manifest`` -> ``<name>.manifest``,
3. for SGX, ``sign_manifest`` runs ``gramine-sgx-sign`` -> ``<name>.manifest.sgx`` (+ ``.sig``),
4. launch ``gramine-direct|gramine-sgx <manifest_dir>/<name>``.

``wrap_command`` does 1-3 (each only when its input changed) and returns the argv for 4. What the
manifest holds, and why it is generated: `teefl.security.tee.gramine_manifest`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from teefl.errors import TeeflError
from teefl.security.keyfile import check_private_file
from teefl.security.tee.gramine_manifest import GRAMINE_DOCS, absolute_path, render_manifest

Launcher = Literal["native", "gramine-direct", "gramine-sgx"]
LAUNCHERS: tuple[str, ...] = ("native", "gramine-direct", "gramine-sgx")


# --------------------------------------------------------------------------------------------
# Gramine tool steps
# --------------------------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """Absolute path of a Gramine tool, or a TeeflError that says how to get it."""
    found = shutil.which(name)
    if not found:
        raise TeeflError(
            f"{name} not found on PATH: install Gramine ({GRAMINE_DOCS}) or use --launcher native"
        )
    return found


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def _stale(output: Path, *inputs: Path) -> bool:
    if not output.exists():
        return True
    out_time = output.stat().st_mtime_ns
    return any(i.stat().st_mtime_ns > out_time for i in inputs)


def _run_tool(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TeeflError(f"{what} failed to run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise TeeflError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def preprocess_manifest(template: Path, output: Path) -> Path:
    """``gramine-manifest template output`` when the template is newer than the output."""
    tool = require_tool("gramine-manifest")
    if _stale(output, template):
        _run_tool([tool, str(template), str(output)], "gramine-manifest")
    return output


def sign_manifest(manifest: Path, *, key: Path | None = None) -> Path:
    """``gramine-sgx-sign`` -> ``<manifest>.sgx``, only when the manifest changed since signing.

    Signing hashes every trusted file (the whole site-packages), so it is slow; doing it only when
    needed keeps repeated runs cheap. ``key`` defaults to Gramine's own default enclave key.
    """
    tool = require_tool("gramine-sgx-sign")
    output = manifest.with_name(manifest.name + ".sgx")
    if key is not None and not Path(key).is_file():
        raise TeeflError(
            f"enclave signing key {key} not found: create one with gramine-sgx-gen-private-key"
        )
    if key is not None:
        check_private_file(key, "enclave signing key")
    if _stale(output, manifest):
        cmd = [tool, "--manifest", str(manifest), "--output", str(output)]
        if key is not None:
            cmd += ["--key", str(key)]
        _run_tool(cmd, "gramine-sgx-sign")
    return output


def wrap_command(
    launcher: Launcher | str,
    argv: Sequence[str],
    manifest_dir: Path,
    *,
    role: str = "collaborator",
    name: str | None = None,
    plan_path: Path | None = None,
    cert_paths: Sequence[Path] = (),
    data_dirs: Sequence[Path] = (),
    key_paths: Sequence[Path] = (),
    trusted_paths: Sequence[Path] = (),
    run_dir: Path | None = None,
    threads: int = 1,
    enclave_size: str = "16G",
    max_threads: int = 64,
    checkpoint_dir: Path | None = None,
    sign_key: Path | None = None,
) -> list[str]:
    """The argv that starts ``argv`` under ``launcher``; prepares manifests as needed.

    ``native`` returns ``argv`` unchanged. For Gramine, ``argv[0]`` must be the Python
    interpreter; the arguments are fixed inside the manifest (``loader.argv``), so the returned
    command is just ``[<gramine-direct|gramine-sgx>, <manifest_dir>/<name>]`` -- Gramine discards
    host-side arguments when the manifest sets them. ``name`` (default: the role) must differ per
    process on one host because each process has its own arguments. Use absolute paths in
    ``argv``: the process starts in ``run_dir``.
    """
    if launcher not in LAUNCHERS:
        raise TeeflError(f"unknown launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if not argv:
        raise TeeflError("empty command")
    if launcher == "native":
        return [str(a) for a in argv]
    binary = require_tool(str(launcher))
    require_tool("gramine-manifest")
    sgx = launcher == "gramine-sgx"
    if sgx:
        require_tool("gramine-sgx-sign")
    manifest_dir = absolute_path(manifest_dir)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    stem = name or role
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem):
        raise TeeflError(f"manifest name {stem!r} must be letters, digits, '.', '_' or '-'")
    text = render_manifest(
        role,
        python=Path(argv[0]),
        plan_path=plan_path,
        cert_paths=cert_paths,
        data_dirs=data_dirs,
        key_paths=key_paths,
        trusted_paths=trusted_paths,
        run_dir=run_dir or manifest_dir,
        sgx=sgx,
        enclave_size=enclave_size,
        max_threads=max_threads,
        threads=threads,
        argv=list(argv),
        checkpoint_dir=checkpoint_dir,
    )
    for needed_dir in (run_dir, checkpoint_dir):
        if needed_dir is not None:  # Gramine mounts host paths; they must exist
            absolute_path(needed_dir).mkdir(parents=True, exist_ok=True)
    template = manifest_dir / f"{stem}.manifest.template"
    _write_if_changed(template, text)
    manifest = preprocess_manifest(template, manifest_dir / f"{stem}.manifest")
    if sgx:
        sign_manifest(manifest, key=sign_key)
    return [binary, str(manifest_dir / stem)]


__all__ = [
    "LAUNCHERS",
    "Launcher",
    "preprocess_manifest",
    "require_tool",
    "sign_manifest",
    "wrap_command",
]
