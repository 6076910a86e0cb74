"""The workload digest: one SHA-256 naming the exact code a party trains with.

Why the code and not the model: two parties with the same model but different training code
(another loss, a backdoored data filter, a leaky ``evaluate``) are different parties. The
digest is computed on the FILES, path-independently, so the same code gives the same digest in
every process and on every host, and one changed byte gives another one -- a value a user can
put into a policy (``teefl workload digest REF``) and that attestation can bind.

What is covered (the "code root"):

- a lone file reference (``./task.py:Task``, its directory no package): that file;
- a file inside a package, or a module reference (``mypkg.fl:Task``, an entry point): the
  outermost regular package holding it (the directory with ``__init__.py`` whose parent is on
  ``sys.path``), every file in it; a top-level plain module: its file;
- teefl's built-in workloads (``vision``, ``image-folder``, ``tabular``, ``noop``) and any other
  module of teefl itself: the ``teefl/workload/`` package directory, every file in it. The rest
  of teefl (federation, strategies, security) is named by teefl's version, not hashed.

Every file under a code root counts (data files and compiled extensions too), except
directories named ``__pycache__`` and files ending in ``.pyc``/``.pyo``; symbolic links are
followed (a directory reached twice counts once). The digest is SHA-256 over the tag
``teefl-workload-digest/1``, ``teefl.__version__``, then for each file in order of its path
relative to the code root's parent (``task.py``, ``mypkg/fl.py``, ``workload/api.py``): the path
(UTF-8), its length and the content, each length-prefixed. Absolute paths, mtimes and
permissions do not count.

Computing a digest runs none of the workload's code (a module is located with
``importlib.util.find_spec``; only namespace packages on the way are imported, which have none).
What it cannot see: code the workload imports from OUTSIDE its code root (other installed
packages, torch) -- those are pinned by the environment, and under attestation by the image.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from teefl.errors import TeeflError
from teefl.registry import Target

TAG = b"teefl-workload-digest/1"
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class CodeFile:
    """One covered file: its path relative to the code root's parent, and its bytes' SHA-256."""

    path: str
    size: int
    sha256: str


def _teefl_workload_dir() -> Path:
    return Path(__file__).resolve().parent


def _module_root(module: str, ref: str) -> Path:
    """The code root of dotted ``module`` (see the module docstring), found without running it."""
    parts = module.split(".")
    if parts[0] == "teefl":
        return _teefl_workload_dir()
    loaded = sys.modules.get(module)
    if parts[0].startswith("teefl_user_") and loaded is not None:  # a lone file we executed
        return Path(loaded.__file__ or "").resolve()
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as exc:
            raise TeeflError(f"workload {ref!r}: cannot locate module {name}: {exc}") from None
        if spec is None:
            raise TeeflError(f"workload {ref!r}: no module named {name!r} (is it installed?)")
        origin = spec.origin
        if origin in (None, "namespace") and spec.submodule_search_locations is not None:
            continue  # a namespace package has no code of its own: look one level down
        if not origin or origin in ("built-in", "frozen") or not Path(origin).is_file():
            raise TeeflError(f"workload {ref!r}: module {name} has no file to digest ({origin})")
        path = Path(origin).resolve()
        return path.parent if spec.submodule_search_locations is not None else path
    raise TeeflError(f"workload {ref!r}: {module} is a namespace package without a code file")


def code_root(target: Target) -> Path:
    """The file or directory whose files the digest of ``target`` covers."""
    if target.kind == "file" and target.path is not None:
        if target.package_root is None:
            return target.path
        return target.package_root / target.module.split(".")[0]
    return _module_root(target.module, target.ref)


def _walk(root: Path) -> list[tuple[str, Path]]:
    """(path relative to root's parent, absolute path) of every covered file under ``root``."""
    if root.is_file():
        return [(root.name, root)]
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a directory linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(_SKIP_SUFFIXES):
                continue
            p = Path(dirpath) / f
            if p.is_file():
                out.append((p.relative_to(root.parent).as_posix(), p))
    return out


def code_files(target: Target) -> list[tuple[str, bytes]]:
    """The covered files of ``target`` as (relative path, content), sorted by path. A lone file
    reference contributes the bytes that were (or will be) executed, not a second read."""
    root = code_root(target)
    if target.source is not None and target.path is not None and root == target.path:
        return [(root.name, target.source)]
    files = []
    for rel, path in _walk(root):
        try:
            files.append((rel, path.read_bytes()))
        except OSError as exc:
            raise TeeflError(
                f"workload {target.ref!r}: cannot read {path} to digest it: {exc.strerror}"
            ) from None
    return sorted(files)


def digest_of_files(files: list[tuple[str, bytes]], version: str | None = None) -> str:
    """The digest (hex) of already-collected files; see the module docstring for the format."""
    if version is None:
        from teefl import __version__ as version
    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)

    put(TAG)
    put(version.encode())
    for rel, data in sorted(files):
        put(rel.encode("utf-8"))
        put(data)
    return h.hexdigest()


def code_paths(ref: str, base_dir: Path | None = None) -> list[Path]:
    """The absolute paths of the files the digest of ``ref`` covers, sorted: what a Gramine
    manifest lists as trusted files, so that the enclave can load no other bytes of them."""
    from teefl.workload.registry import WORKLOADS

    return [path for _, path in sorted(_walk(code_root(WORKLOADS.target(ref, base_dir))))]


def digest_target(target: Target) -> str:
    return digest_of_files(code_files(target))


def workload_digest(ref: str, base_dir: Path | None = None) -> str:
    """The workload digest of reference ``ref`` (a name, ``module:attr`` or ``./file.py:attr``
    relative to ``base_dir``, default the current directory), running none of its code."""
    from teefl.workload.registry import WORKLOADS

    return digest_target(WORKLOADS.target(ref, base_dir))


def describe_files(ref: str, base_dir: Path | None = None) -> tuple[str, Path, list[CodeFile]]:
    """The digest of ``ref``, its code root and each covered file's path, size and SHA-256
    (for an audit of what the digest vouches for)."""
    from teefl.workload.registry import WORKLOADS

    target = WORKLOADS.target(ref, base_dir)
    files = code_files(target)
    listing = [CodeFile(rel, len(data), hashlib.sha256(data).hexdigest()) for rel, data in files]
    return digest_of_files(files), code_root(target), listing
