"""Named plug-ins: a name registered with a decorator, a ``module:attr`` reference, or an entry
point of an installed package -- one lookup for all three.

Why one generic registry: strategies use it now and workloads will, and each kind of plug-in must
fail the same way on a bad reference: one `TeeflError` line that names the reference and says
what is wrong with it (no module, no attribute, not a plug-in of that kind), never a traceback
from deep inside ``importlib``. Torch-free, so the plan may import it.

Lookup order for a reference without a colon: names registered in this process (after importing
the kind's built-in modules), then the entry points of group ``group``; a registered name wins
over an entry point of the same name. A reference with a colon is always ``module:attr``
(``attr`` may be dotted: ``pkg.mod:Outer.Inner``) and is imported as written.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from importlib import metadata
from typing import Generic, TypeVar

from teefl.errors import TeeflError

T = TypeVar("T")

#: a registered name: no colon (that makes a ``module:attr`` reference), no spaces
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Registry(Generic[T]):
    """Plug-ins of one kind (``kind``: "strategy", "workload", ...).

    ``accepts(obj)``: whether ``obj`` is a plug-in of this kind (a subclass of its base class, a
    callable of the right shape...); ``what`` names that in errors ("a subclass of
    teefl.strategy.Strategy"). ``builtins``: modules that register the built-in plug-ins,
    imported on the first lookup (importing them here would be circular: they import the
    registry for its decorator).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        accepts: Callable[[object], bool],
        what: str,
        builtins: tuple[str, ...] = (),
    ) -> None:
        self.kind, self.group, self.accepts, self.what = kind, group, accepts, what
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._builtins_loaded = False

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
                    f"{self.kind} {name!r}: {_describe(obj)} is not {self.what}; it cannot be "
                    "registered"
                )
            old = self._entries.get(name)
            if old is not None and old is not obj:
                raise TeeflError(
                    f"{self.kind} name {name!r} is registered already (by {_qualname(old)}); "
                    f"choose another name for {_qualname(obj)}"
                )
            self._entries[name] = obj
            on_register = getattr(obj, "__registered__", None)
            if callable(on_register):
                on_register(name)
            return obj

        return wrap

    def names(self) -> list[str]:
        """Every name a lookup finds: registered ones and the entry points of the group."""
        self._load_builtins()
        eps = {ep.name for ep in metadata.entry_points(group=self.group)}
        return sorted(self._entries.keys() | eps)

    def resolve(self, ref: str, where: str | None = None) -> T:
        """The plug-in ``ref`` names (see the module docstring for the lookup order).

        ``where``: the place the reference came from (a plan key such as
        ``federation.strategy``), named in errors.
        """
        at = f"{where}: " if where else ""
        if not isinstance(ref, str) or not ref.strip():
            raise TeeflError(f"{at}{self.kind} reference must be a non-empty string, got {ref!r}")
        if ":" in ref:
            obj = self._import(ref, at)
        else:
            self._load_builtins()
            if ref in self._entries:
                return self._entries[ref]
            obj = self._entry_point(ref, at)
        if not self.accepts(obj):
            raise TeeflError(f"{at}{self.kind} {ref!r} is {_describe(obj)}, not {self.what}")
        return obj

    def _import(self, ref: str, at: str) -> object:
        module_name, _, attr = ref.partition(":")
        if not module_name or not attr:
            raise TeeflError(f"{at}{self.kind} reference {ref!r} must read 'module:attribute'")
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (
                module_name == exc.name or module_name.startswith(exc.name + ".")
            ):
                raise TeeflError(
                    f"{at}{self.kind} {ref!r}: no module named {module_name!r} (is the package "
                    "installed, or its folder on PYTHONPATH?)"
                ) from None
            raise TeeflError(
                f"{at}{self.kind} {ref!r}: importing {module_name!r} failed: {exc}"
            ) from None
        except Exception as exc:
            raise TeeflError(
                f"{at}{self.kind} {ref!r}: importing {module_name!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise TeeflError(
                    f"{at}{self.kind} {ref!r}: module {module_name!r} has no attribute {attr!r}"
                ) from None
        return obj

    def _entry_point(self, name: str, at: str) -> object:
        found = list(metadata.entry_points(group=self.group, name=name))
        if not found:
            known = ", ".join(self.names()) or "(none)"
            raise TeeflError(
                f"{at}unknown {self.kind} {name!r}; choose one of: {known}, or give a "
                "'module:attribute' reference"
            )
        ep = found[0]
        try:
            return ep.load()
        except Exception as exc:
            raise TeeflError(
                f"{at}{self.kind} {name!r}: its entry point ({self.group}: {ep.value}) failed "
                f"to load: {type(exc).__name__}: {exc}"
            ) from None

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for module in self.builtins:
            importlib.import_module(module)


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _describe(obj: object) -> str:
    if isinstance(obj, type):
        return f"the class {_qualname(obj)}"
    if callable(obj):
        return f"the callable {_qualname(obj)}"
    return f"a {type(obj).__name__} object"
