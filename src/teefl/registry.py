"""Named plug-ins: a registered name, an installed entry point, ``module:attr`` or a file.

Why one generic registry: strategies and workloads are code that a plan names, and each kind of
plug-in must resolve the same way and fail the same way on a bad reference: one `TeeflError`
line that names the reference and the Python error (no module, no attribute, not a plug-in of
that kind, an exception at import with the user's file and line), never a traceback from deep
inside ``importlib``. Torch-free, so the plan may import it.

A reference is, in this order of precedence:

- ``name`` (no colon) -- registered in this process (``@registry.register("name")``, after
  importing the kind's built-in modules), a built-in ``module:attr`` given at construction and
  imported only when used, else an installed package's entry point in the registry's group
  (``[project.entry-points."teefl.workloads"] name = "pkg.mod:Class"``). A registered name wins
  over an entry point of the same name;
- ``pkg.mod:Attr`` -- a module importable from ``sys.path``, imported as written; ``Attr`` may be
  dotted (``pkg.mod:Outer.Inner``);
- ``./task.py:Attr`` (the part before the last ``:`` contains ``/`` or ends with ``.py``) -- a
  file, relative to ``base_dir`` (the plan's directory). A file inside a package directory (one
  holding ``__init__.py``) is imported as that package's module, with the outermost package's
  parent put on ``sys.path``, so its relative imports work; a lone file is executed from the bytes
  `Target.source` read, without a ``sys.path`` change (its siblings are not importable: no code
  runs that its digest does not cover).

`Registry.target` parses a reference and locates its code WITHOUT running any of it (code
identity needs that); `Registry.load` imports it; `Registry.resolve` does both.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, Literal, TypeVar

from teefl.errors import TeeflError

T = TypeVar("T")

#: a registered name: no colon (that makes a ``module:attr`` reference), no spaces
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

Kind = Literal["registered", "builtin", "entry-point", "module", "file"]


@dataclass(frozen=True)
class Target:
    """Where a reference points, found without running its code.

    ``module``: the dotted module name (for a lone file, the private name it is loaded under);
    ``path``: the file, for a file reference; ``package_root``: for a file inside a package, the
    directory put on ``sys.path``; ``source``: a lone file's bytes, read once so that what is
    executed is exactly what was read; ``entry``: an entry point's ``module:attr``.
    """

    ref: str
    kind: Kind
    module: str
    attr: str
    path: Path | None = None
    package_root: Path | None = None
    source: bytes | None = None
    entry: str = ""


def error_line(exc: BaseException, near: Path | str | None = None) -> str:
    """``Type: message`` on one line, with a frame's file:line: the innermost frame in ``near``
    (the user's file or package, or a module name's top-level part) when there is one, else
    the innermost frame -- the user's line matters more than the library line that raised. A
    ModuleNotFoundError's message says it all ("No module named 'x'") and keeps no type name."""
    msg = " ".join(str(exc).split())
    if isinstance(exc, ModuleNotFoundError) and msg:
        text = msg
    else:
        text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{text} ({Path(exc.filename).name}, line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "<frozen" not in f.filename]
    if near is not None:
        key = str(near)
        if isinstance(near, Path):
            mine = [f for f in frames if f.filename == key or f.filename.startswith(key + "/")]
        else:
            mine = [f for f in frames if f"/{key}/" in f.filename or f"/{key}.py" in f.filename]
        frames = mine or frames
    if frames:
        text += f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    return text


class _Problem(Exception):
    """What is wrong with a reference, without the ``kind 'ref': `` prefix `load` adds."""


def _split(ref: str) -> tuple[str, str]:
    where, _, attr = ref.rpartition(":")
    return where, attr


def _is_file_ref(where: str) -> bool:
    return "/" in where or where.endswith(".py")


def _outermost_package(path: Path) -> Path | None:
    """The outermost directory above ``path`` that is a package (holds ``__init__.py``)."""
    top = None
    d = path.parent
    while (d / "__init__.py").is_file():
        top = d
        if d.parent == d:
            break
        d = d.parent
    return top


class Registry(Generic[T]):
    """Plug-ins of one kind (``kind``: "strategy", "workload", ...).

    ``accepts(obj)``: whether ``obj`` is a plug-in of this kind; ``what`` names that in errors
    ("a subclass of teefl.strategy.Strategy"); ``why(obj)`` (optional) says what a refused
    object lacks. ``builtins``: modules that register the built-in plug-ins with the decorator,
    imported on the first lookup (importing them here would be circular: they import the
    registry for its decorator). ``lazy``: built-in names as ``module:attr``, imported only when
    that name is loaded -- listing or digesting them imports nothing heavy. ``files``: whether
    ``./file.py:attr`` references are allowed (workloads: yes; strategies: no, their state is
    saved under their module's name, which a file's path would make host-specific).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        accepts: Callable[[object], bool],
        what: str,
        builtins: tuple[str, ...] = (),
        *,
        why: Callable[[object], str | None] | None = None,
        lazy: Mapping[str, str] | None = None,
        files: bool = False,
    ) -> None:
        self.kind, self.group, self.accepts, self.what = kind, group, accepts, what
        self.builtins, self.why = builtins, why
        self.lazy = dict(lazy or {})
        self.files = files
        self._entries: dict[str, T] = {}
        self._builtins_loaded = False

    # -- registering -------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` on a plug-in registers it under ``name``.

        A name taken by another object stops with a `TeeflError` naming both (two plug-ins must
        not silently shadow each other); registering the same object again is a no-op.
        """
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise TeeflError(
                f"{self.kind} name {name!r} is not valid: letters, digits, '_', '.', '-' only "
                "(a ':' makes a module:attr reference)"
            )

        def wrap(obj: T) -> T:
            if not self.accepts(obj):
                raise TeeflError(
                    f"{self.kind} {name!r}: {_describe(obj)} is not {self.what}"
                    f"{self._reason(obj)}; it cannot be registered"
                )
            old = self._entries.get(name)
            if (old is not None and old is not obj) or name in self.lazy:
                taken = _qualname(old) if old is not None else self.lazy[name]
                raise TeeflError(
                    f"{self.kind} name {name!r} is registered already (by {taken}); "
                    f"choose another name for {_qualname(obj)}"
                )
            self._entries[name] = obj
            on_register = getattr(obj, "__registered__", None)
            if callable(on_register):
                on_register(name)
            return obj

        return wrap

    def _reason(self, obj: object) -> str:
        reason = self.why(obj) if self.why is not None else None
        return f": {reason}" if reason else ""

    def _entry_points(self) -> dict[str, str]:
        try:
            eps = metadata.entry_points(group=self.group)
        except Exception:  # a broken installed distribution must not break every lookup
            return {}
        return {ep.name: ep.value.split()[0] for ep in eps if ep.value.strip()}

    def names(self) -> list[str]:
        """Every name a lookup finds: registered, built-in, installed entry points (sorted)."""
        self._load_builtins()
        return sorted(self._entries.keys() | self.lazy.keys() | self._entry_points().keys())

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for module in self.builtins:
            importlib.import_module(module)

    # -- locating (no code of the plug-in runs) -----------------------------------------------
    def target(self, ref: str, base_dir: Path | None = None, where: str | None = None) -> Target:
        """Parse ``ref`` and locate its code, running none of it. ``where``: the place the
        reference came from (a plan key such as ``federation.strategy``), named in errors."""
        at = f"{where}: " if where else ""
        if not isinstance(ref, str) or not ref.strip():
            raise TeeflError(f"{at}{self.kind} reference must be a non-empty string, got {ref!r}")
        ref = ref.strip()
        if ":" not in ref:
            return self._named(ref, at)
        module, attr = _split(ref)
        if not module or not attr or not _DOTTED.match(attr):
            raise TeeflError(
                f"{at}{self.kind} reference {ref!r} must read 'module:attribute'"
                + (" or './file.py:attribute'" if self.files else "")
            )
        if _is_file_ref(module):
            if not self.files:
                raise TeeflError(
                    f"{at}{self.kind} reference {ref!r}: a {self.kind} is named by "
                    "'module:attribute', not by a file"
                )
            return self._file(ref, module, attr, base_dir, at)
        if not _DOTTED.match(module):
            raise TeeflError(
                f"{at}{self.kind} reference {ref!r}: {module!r} is not a module name "
                f"(write ./{module} for a file)"
            )
        return Target(ref, "module", module, attr)

    def _named(self, ref: str, at: str) -> Target:
        self._load_builtins()
        if ref in self._entries:
            obj = self._entries[ref]
            return Target(ref, "registered", getattr(obj, "__module__", None) or "", "")
        if ref in self.lazy:
            module, attr = _split(self.lazy[ref])
            return Target(ref, "builtin", module, attr)
        installed = self._entry_points()
        if ref in installed:
            module, attr = _split(installed[ref])
            return Target(ref, "entry-point", module, attr, entry=installed[ref])
        known = ", ".join(self.names()) or "(none)"
        files = " or './file.py:attribute'" if self.files else ""
        raise TeeflError(
            f"{at}unknown {self.kind} {ref!r}; choose one of: {known}, or give a "
            f"'module:attribute'{files} reference"
        )

    def _file(self, ref: str, where: str, attr: str, base_dir: Path | None, at: str) -> Target:
        path = Path(where).expanduser()
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else Path.cwd()) / path
        path = path.resolve()
        if not path.is_file():
            raise TeeflError(f"{at}{self.kind} {ref!r}: file not found: {path}")
        if path.suffix != ".py":
            raise TeeflError(f"{at}{self.kind} {ref!r}: {path} is not a Python file (.py)")
        top = _outermost_package(path)
        if top is not None:
            parts = list(path.relative_to(top.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            module = ".".join(parts)
            if not _DOTTED.match(module):
                raise TeeflError(
                    f"{at}{self.kind} {ref!r}: {path} is in a package, but {module!r} is not a "
                    "module name"
                )
            return Target(ref, "file", module, attr, path, package_root=top.parent)
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise TeeflError(
                f"{at}{self.kind} {ref!r}: cannot read {path}: {exc.strerror}"
            ) from None
        # a private module name per file: two workloads both called task.py do not collide
        tag = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        module = f"teefl_user_{tag}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
        return Target(ref, "file", module, attr, path, source=source)

    # -- loading -----------------------------------------------------------------------------
    def load(self, target: Target, where: str | None = None) -> T:
        """Import ``target``'s module, fetch its attribute, check it; one line on any failure."""
        at = f"{where}: " if where else ""
        ref = target.ref
        if target.kind == "registered":
            return self._entries[ref]
        try:
            obj = self._fetch(target)
        except _Problem as exc:
            if target.kind == "entry-point":
                raise TeeflError(
                    f"{at}{self.kind} {ref!r}: its entry point ({self.group}: {target.entry}) "
                    f"failed to load: {exc}"
                ) from None
            raise TeeflError(f"{at}{self.kind} {ref!r}: {exc}") from None
        if not self.accepts(obj):
            raise TeeflError(
                f"{at}{self.kind} {ref!r} is {_describe(obj)}, not {self.what}{self._reason(obj)}"
            )
        return obj  # type: ignore[return-value]

    def resolve(self, ref: str, where: str | None = None, base_dir: Path | None = None) -> T:
        """The plug-in ``ref`` names: `target`, then `load`."""
        return self.load(self.target(ref, base_dir, where), where)

    def _fetch(self, target: Target) -> Any:
        module = self._import(target)
        obj: Any = module
        for part in target.attr.split(".") if target.attr else []:
            try:
                obj = getattr(obj, part)
            except AttributeError:
                own = sorted(
                    n
                    for n, v in vars(module).items()
                    if isinstance(v, type) and n[:1] != "_" and v.__module__ == module.__name__
                )
                hint = f" (it defines: {', '.join(own)})" if own else ""
                what = (
                    f"file {target.path}"
                    if target.source is not None
                    else (f"module {target.module!r}")
                )
                raise _Problem(f"{what} has no attribute {target.attr!r}{hint}") from None
        return obj

    def _import(self, target: Target) -> ModuleType:
        name = target.module
        if target.source is not None:
            return self._exec_file(target)
        top = name.split(".")[0]
        near: Path | str = top
        if target.package_root is not None:
            near = target.package_root / top
            have = sys.modules.get(top)
            have_file = getattr(have, "__file__", None)
            want = target.package_root / top / "__init__.py"
            if have is not None and (have_file is None or Path(have_file).resolve() != want):
                raise _Problem(
                    f"another module named {top!r} is imported already (from {have_file})"
                )
            if str(target.package_root) not in sys.path:
                sys.path.insert(0, str(target.package_root))
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if target.kind != "file" and (name == missing or name.startswith(missing + ".")):
                raise _Problem(
                    f"no module named {name!r} (is the package installed, or its folder on "
                    "PYTHONPATH?)"
                ) from None
            raise _Problem(f"importing {name!r} failed: {error_line(exc, near)}") from None
        except Exception as exc:
            raise _Problem(f"importing {name!r} failed: {error_line(exc, near)}") from None

    def _exec_file(self, target: Target) -> ModuleType:
        assert target.path is not None and target.source is not None
        spec = importlib.util.spec_from_loader(target.module, loader=None, origin=str(target.path))
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__file__ = str(target.path)
        # in sys.modules while it runs: dataclasses and pydantic look their module up there
        sys.modules[target.module] = module
        try:
            exec(compile(target.source, str(target.path), "exec"), module.__dict__)
        except Exception as exc:
            sys.modules.pop(target.module, None)
            raise _Problem(
                f"importing {target.path} failed: {error_line(exc, target.path)}"
            ) from None
        return module


def _qualname(obj: object) -> str:
    module = getattr(obj, "__module__", None) or "?"
    if module.startswith("teefl_user_"):  # a lone file: its name says more than its module's
        path = getattr(sys.modules.get(module), "__file__", None)
        module = Path(path).name if path else module
    return f"{module}:{getattr(obj, '__qualname__', repr(obj))}"


def _describe(obj: object) -> str:
    if isinstance(obj, type):
        return f"the class {_qualname(obj)}"
    if callable(obj):
        return f"the callable {_qualname(obj)}"
    return f"a {type(obj).__name__} object"
