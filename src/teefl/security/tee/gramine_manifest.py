"""The Gramine manifest of a teefl process: where the interpreter's files are, and the manifest
template that lists them.

Why generate the manifest instead of shipping a static template: what an SGX enclave may load is
fixed at signing time (``sgx.trusted_files`` are hashed into the signature), so the manifest has
to list *this* interpreter, *this* standard library and *this* site-packages, and its
``loader.argv`` pins the exact command -- the host cannot add arguments to a measured enclave.

``render_manifest`` writes TOML with two Jinja placeholders, ``{{ gramine.libos }}`` and
``{{ gramine.runtimedir() }}``, that only Gramine can resolve (``gramine-manifest``, run by
`teefl.security.tee.gramine`). Manifest syntax follows Gramine >= 1.8
(``loader.entrypoint.uri``, ``sgx.max_threads``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from teefl.errors import TeeflError

ROLES: tuple[str, ...] = ("aggregator", "collaborator")

GRAMINE_DOCS = "https://gramine.readthedocs.io"
_SIZE_RE = re.compile(r"^[1-9][0-9]*[KMG]$")
_JINJA_RE = re.compile(r"\{\{|\{%|\{#")
#: Gramine's own helper threads (IPC, async, TLS handshake) need slots beyond the app's threads.
GRAMINE_HELPER_THREADS = 4
#: gRPC and the data loader add threads beyond the compute threads.
APP_EXTRA_THREADS = 16


# --------------------------------------------------------------------------------------------
# Interpreter layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonLayout:
    """Where an interpreter's files live on the host; every path must be visible in Gramine."""

    interpreter: Path  # the real binary (symlinks resolved: trusted files are real files)
    stdlib_dirs: tuple[Path, ...]  # the standard library (lib-dynload lives inside it)
    lib_files: tuple[Path, ...]  # libpython*.so* of a shared build (none when static)
    path_dirs: tuple[Path, ...]  # site-packages and other sys.path entries (incl. teefl's)
    multiarch: str  # e.g. "x86_64-linux-gnu"


# Runs in the target interpreter. Base (not venv) prefixes: a venv's "platstdlib" points into
# the venv and would swallow its site-packages.
_LAYOUT_PROBE = r"""
import glob, json, os, sys, sysconfig
base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
        "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
libdir = sysconfig.get_config_var("LIBDIR") or ""
soname = sysconfig.get_config_var("INSTSONAME") or ""
shared = sysconfig.get_config_var("Py_ENABLE_SHARED")
libs = sorted(glob.glob(os.path.join(libdir, soname.split(".so")[0] + ".so*"))) if (
    shared and libdir and soname) else []
print(json.dumps({
    "stdlib": [os.path.dirname(os.__file__), sysconfig.get_path("platstdlib", vars=base)],
    "lib_files": libs,
    "sys_path": sys.path[1:],
    "multiarch": sysconfig.get_config_var("MULTIARCH") or "",
}))
"""


def _teefl_root() -> Path:
    import teefl

    return Path(teefl.__file__).resolve().parent.parent


def python_layout(python: Path | str) -> PythonLayout:
    """Ask ``python`` where its files are (a subprocess: the answer must describe *that*
    interpreter, which need not be the one running teefl)."""
    exe = shutil.which(str(python)) or str(python)
    interpreter = Path(exe).resolve()
    if not interpreter.is_file():
        raise TeeflError(f"Python interpreter {python} not found")
    try:
        out = subprocess.run(
            [str(exe), "-c", _LAYOUT_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd="/",
        ).stdout
        info = json.loads(out)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
        raise TeeflError(f"cannot query Python interpreter {python}: {exc}") from exc
    stdlib_dirs = _existing_dirs(info["stdlib"])
    lib_files = tuple(
        dict.fromkeys(Path(f).resolve() for f in info["lib_files"] if Path(f).is_file())
    )
    path_dirs = _existing_dirs([*info["sys_path"], _teefl_root()])
    path_dirs = tuple(p for p in path_dirs if not any(_is_within(p, d) for d in stdlib_dirs))
    return PythonLayout(
        interpreter, stdlib_dirs, lib_files, path_dirs, info["multiarch"] or "x86_64-linux-gnu"
    )


def _existing_dirs(candidates: Iterable[object]) -> tuple[Path, ...]:
    seen: list[Path] = []
    for c in candidates:
        if not c:
            continue
        p = Path(str(c)).resolve()
        if p.is_dir() and p not in seen:
            seen.append(p)
    return tuple(seen)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """Drop paths nested inside another listed path (one mount covers them)."""
    unique = sorted(set(paths), key=lambda p: (len(p.parts), str(p)))
    kept: list[Path] = []
    for p in unique:
        if not any(_is_within(p, k) for k in kept):
            kept.append(p)
    return sorted(kept)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    """A TOML basic string; refuses Jinja syntax, which gramine-manifest would interpret."""
    if _JINJA_RE.search(value):
        raise TeeflError(f"path or argument {value!r} contains Jinja syntax ({{{{, {{% or {{#)")
    out = []
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _uri(path: Path, directory: bool = False) -> str:
    text = "file:" + str(path)
    if directory and not text.endswith("/"):
        text += "/"
    return text


def absolute_path(path: Path | str) -> Path:
    """``~`` expanded, made absolute (not resolved: the manifest names what the user named)."""
    return Path(path).expanduser().absolute()


def _sha256_file(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise TeeflError(
            f"cannot hash {path} for the manifest's trusted files: {exc.strerror}"
        ) from None


def _holds_private_key(path: Path) -> bool:
    """A PEM private key (``-----BEGIN ... PRIVATE KEY-----``): a secret, never a trusted file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except OSError:
        return False
    return b"PRIVATE KEY-----" in head


def render_manifest(
    role: str,
    *,
    python: Path,
    plan_path: Path | None,
    cert_paths: Sequence[Path] = (),
    data_dirs: Sequence[Path] = (),
    key_paths: Sequence[Path] = (),
    trusted_paths: Sequence[Path] = (),
    run_dir: Path,
    sgx: bool,
    enclave_size: str = "16G",
    max_threads: int = 64,
    threads: int,
    argv: Sequence[str] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_key_name: str | None = None,
    debug: bool = False,
    edmm: bool = False,
    malloc_arena_max: int = 1,
    log_level: str = "error",
) -> str:
    """Render a Gramine manifest template for one teefl process.

    ``argv`` is the full command (``argv[0]`` ignored in favour of the resolved ``python``); by
    default ``python -m teefl.cli <role> --plan <plan_path>``. It goes into ``loader.argv`` so the
    signed manifest fixes the command. ``checkpoint_dir`` becomes an encrypted mount (Gramine's
    own file encryption) keyed by ``checkpoint_key_name`` -- ``_sgx_mrenclave`` by default under
    SGX, so only this enclave on this machine can read its checkpoints back; gramine-direct has no
    sealing key, so there the mount is only added when a key name is given.

    What decides security is a *trusted* file, its SHA-256 written into the manifest and so into
    the enclave's measurement: the code, the plan (which holds the attestation policy, the
    transport, sealing), the CA and the other certificates in ``cert_paths``, and
    ``trusted_paths`` (e.g. the DCAP collateral). Gramine refuses to open such a file once its
    bytes differ, so a host cannot switch attestation off, swap the CA or loosen the policy
    without changing MRENCLAVE. Private keys (``key_paths``, and any file of ``cert_paths`` that
    holds one) and data directories are *allowed* files: readable, not integrity-checked --
    a trusted file is still plaintext on the host's disk, so listing a key there would protect
    nothing. The manifest is rendered when the process starts, from the files as they are then.
    """
    if role not in ROLES:
        raise TeeflError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    if not _SIZE_RE.match(enclave_size):
        raise TeeflError(f"enclave size {enclave_size!r} must look like 512M, 16G, 1024K")
    if threads < 1:
        raise TeeflError("threads must be at least 1")
    needed = threads + GRAMINE_HELPER_THREADS + APP_EXTRA_THREADS
    if max_threads < needed:
        raise TeeflError(
            f"max_threads {max_threads} is too small for {threads} compute threads: Gramine "
            f"needs at least {needed} (compute + {GRAMINE_HELPER_THREADS} Gramine helpers + "
            f"{APP_EXTRA_THREADS} for gRPC and data loading)"
        )
    if log_level not in ("none", "error", "warning", "debug", "trace", "all"):
        raise TeeflError(f"unknown Gramine log level {log_level!r}")

    layout = python_layout(python)
    run_dir = absolute_path(run_dir)
    plan = absolute_path(plan_path) if plan_path else None
    certs = [absolute_path(p) for p in cert_paths]
    data = [absolute_path(p) for p in data_dirs]
    keys = [*(absolute_path(p) for p in key_paths), *(c for c in certs if _holds_private_key(c))]
    trusted_inputs = list(
        dict.fromkeys(
            [*([plan] if plan else []), *(c for c in certs if c not in keys)]
            + [absolute_path(p) for p in trusted_paths]
        )
    )
    hashes = {p: _sha256_file(p) for p in trusted_inputs}
    if argv is None:
        argv = ["python", "-m", "teefl.cli", role]
        if plan is not None:
            argv += ["--plan", str(plan)]
    args = [str(layout.interpreter), *[str(a) for a in list(argv)[1:]]]

    key_name = checkpoint_key_name
    if checkpoint_dir is not None and key_name is None and sgx:
        key_name = "_sgx_mrenclave"
    if key_name is not None and key_name.startswith("_sgx_") and not sgx:
        raise TeeflError(f"key {key_name} exists only under gramine-sgx")
    ckpt = absolute_path(checkpoint_dir) if checkpoint_dir is not None and key_name else None

    arch = f"/lib/{layout.multiarch}"
    usr_arch = f"/usr/lib/{layout.multiarch}"
    lib_mounts = [Path(p) for p in (arch, usr_arch) if Path(p).is_dir()]
    code_dirs = _outermost([*layout.stdlib_dirs, *layout.path_dirs])
    allowed_inputs = list(dict.fromkeys(p for p in [*keys, *data] if p not in hashes))
    inputs = [*trusted_inputs, *allowed_inputs]
    host_paths = _outermost(
        [*lib_mounts, layout.interpreter, *layout.lib_files, *code_dirs, *inputs, run_dir]
    )
    # A tmpfs /tmp would hide host paths under /tmp (e.g. a run directory there); skip it then.
    tmpfs_tmp = not any(_is_within(p, Path("/tmp")) for p in host_paths)

    lines: list[str] = []
    add = lines.append
    add(f"# Gramine manifest for the teefl {role}; generated by `teefl tee gramine-manifest`.")
    add("# Preprocess with gramine-manifest; sign with gramine-sgx-sign for gramine-sgx.")
    add(f"# {GRAMINE_DOCS}/en/stable/manifest-syntax.html")
    add("")
    add('loader.entrypoint.uri = "file:{{ gramine.libos }}"')
    add(f"libos.entrypoint = {_toml_str(str(layout.interpreter))}")
    add(f"loader.log_level = {_toml_str(log_level)}")
    add("loader.argv = [" + ", ".join(_toml_str(a) for a in args) + "]")
    add("")
    lib_file_dirs = [str(d) for d in dict.fromkeys(f.parent for f in layout.lib_files)]
    # the interpreter's own libpython first: with system directories first, a pyenv/conda
    # Python would load the distribution's libpython of another patch level and fail
    ld_path = ":".join(dict.fromkeys([*lib_file_dirs, "/lib", arch, usr_arch]))
    env = {
        "LD_LIBRARY_PATH": ld_path,
        "PYTHONPATH": ":".join(str(p) for p in layout.path_dirs),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # trusted files are read-only: no __pycache__ writes
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "MALLOC_ARENA_MAX": str(malloc_arena_max),  # each glibc arena reserves enclave memory
        "HOME": str(run_dir),
        "TEEFL_LAUNCHER": "gramine-sgx" if sgx else "gramine-direct",
    }
    for key, value in env.items():
        add(f"loader.env.{key} = {_toml_str(value)}")
    add("")
    add(f"fs.start_dir = {_toml_str(str(run_dir))}")
    add("fs.mounts = [")
    add('  { path = "/lib", uri = "file:{{ gramine.runtimedir() }}" },')
    # Host paths appear at the same path inside Gramine, so a parent mount covers its children.
    for p in host_paths:
        add(f"  {{ path = {_toml_str(str(p))}, uri = {_toml_str(_uri(p))} }},")
    if ckpt is not None and key_name is not None:
        add(
            f'  {{ type = "encrypted", path = {_toml_str(str(ckpt))}, '
            f"uri = {_toml_str(_uri(ckpt))}, key_name = {_toml_str(key_name)} }},"
        )
    if tmpfs_tmp:
        add('  { type = "tmpfs", path = "/tmp" },')
    add("]")
    add("")
    add("sys.enable_extra_runtime_domain_names_conf = true")
    add("sys.enable_sigterm_injection = true")
    add("")
    add(f"sgx.debug = {'true' if debug else 'false'}")
    add(f"sgx.edmm_enable = {'true' if edmm else 'false'}")
    add(f"sgx.enclave_size = {_toml_str(enclave_size)}")
    add(f"sgx.max_threads = {int(max_threads)}")
    if sgx:
        add('sgx.remote_attestation = "dcap"')
    add("")
    add("sgx.trusted_files = [")
    add('  "file:{{ gramine.libos }}",')
    add('  "file:{{ gramine.runtimedir() }}/",')
    for p in lib_mounts:
        add(f"  {_toml_str(_uri(p, directory=True))},")
    add(f"  {_toml_str(_uri(layout.interpreter))},")
    for p in layout.lib_files:
        add(f"  {_toml_str(_uri(p))},")
    for p in code_dirs:
        add(f"  {_toml_str(_uri(p, directory=True))},")
    # the inputs that decide security, pinned by hash (an exact path wins over an allowed
    # directory that contains it, e.g. the plan inside the run directory)
    for p in trusted_inputs:
        add(f"  {{ uri = {_toml_str(_uri(p))}, sha256 = {_toml_str(hashes[p])} }},")
    add("]")
    add("")
    add("# Secrets, data and outputs: readable/writable, not integrity-protected by Gramine.")
    add("sgx.allowed_files = [")
    for p in allowed_inputs:
        add(f"  {_toml_str(_uri(p, directory=p in data and (p.is_dir() or not p.suffix)))},")
    add(f"  {_toml_str(_uri(run_dir, directory=True))},")
    add("]")
    return "\n".join(lines) + "\n"


__all__ = ["ROLES", "PythonLayout", "python_layout", "render_manifest"]
