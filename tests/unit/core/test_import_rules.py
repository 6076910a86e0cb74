"""Import rules as tests: which part of teefl may import which (docs/architecture.md draws them).

The graph is read from the source with `ast`, so a rule is checked for every module whether or
not a test happens to import it. Two kinds of edge:

- module level: runs at ``import``; a rule on what importing a module costs (torch, grpc) or
  drags in is checked on these, transitively, with every parent package of an imported module;
- lazy (inside a function): runs on first use; it still is a dependency, so the cycle rule and
  the layering rules for bench and analysis count it.

Imports under ``if TYPE_CHECKING:`` never run and are not edges. The root package ``teefl`` is
no node: every module implies it, and its own imports are lazy re-exports (`teefl.__all__`).

A rule that names a package that does not exist (yet) is checked for the packages that do; a
rule whose subject does not exist is skipped.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from paths import REPO

SRC = REPO / "src"
ROOT = "teefl"


@dataclass
class Module:
    name: str
    path: Path
    eager: set[str] = field(default_factory=set)  # modules imported at module level
    lazy: set[str] = field(default_factory=set)  # modules imported inside functions
    eager_ext: set[str] = field(default_factory=set)  # third-party top-level names
    lazy_ext: set[str] = field(default_factory=set)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """(import node, lazy?) for every import that can run, skipping TYPE_CHECKING blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for n in child.orelse:
                yield from _imports_of(n, in_function)
            continue
        yield from _imports_of(child, in_function)


def _imports_of(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.AST, bool]]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, in_function
        return
    lazy = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    yield from _imports(node, lazy)


@cache
def graph() -> dict[str, Module]:
    mods: dict[str, Module] = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = Module(".".join(parts), path)
    for mod in mods.values():
        package = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]
        tree = ast.parse(mod.path.read_text(encoding="utf-8"), str(mod.path))
        for node, lazy in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                top = t.split(".")[0]
                if top != ROOT:
                    (mod.lazy_ext if lazy else mod.eager_ext).add(top)
                    continue
                # the deepest teefl module the name is (``from teefl.x import y``: x, or x.y)
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != ROOT and t != mod.name:
                    (mod.lazy if lazy else mod.eager).add(t)
    return mods


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def closure(start: str, lazy: bool) -> set[str]:
    """Every teefl module importing ``start`` runs (``lazy``: or may run on first use)."""
    mods, seen, todo = graph(), set(), [start]
    while todo:
        m = todo.pop()
        if m in seen or m not in mods:
            continue
        seen.add(m)
        todo += _parents(m)
        todo += mods[m].eager | (mods[m].lazy if lazy else set())
    return seen


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _subjects(prefix: str) -> list[str]:
    subjects = [m for m in graph() if _under(m, (prefix,))]
    if not subjects:
        pytest.skip(f"{prefix} does not exist (yet)")
    return subjects


@dataclass(frozen=True)
class Rule:
    subject: str  # a module or package: the rule holds for each module under it
    forbidden: tuple[str, ...]  # teefl packages/modules
    external: tuple[str, ...] = ()  # third-party top-level names
    lazy: bool = False  # count imports inside functions too
    #: forbidden modules reached today, each with why; the rule fails once one is no longer
    #: reached (so the list only shrinks) or a new one appears
    known: tuple[str, ...] = ()


SERVER_SIDE = (
    "teefl.federation",
    "teefl.server",
    "teefl.client",
    "teefl.transport",
    "teefl.wire",
    "teefl.store",
    "teefl.strategy",
    "teefl.workload",
)

RULES = {
    # the plan is data: loading one needs neither torch (workload) nor the verifiers (security);
    # its attestation policy schema is teefl.policyspec, which the verifiers import
    "plan-no-workload-security": Rule(
        "teefl.plan", ("teefl.workload", "teefl.security"), ("torch", "grpc")
    ),
    # the bench drives runs through the library, never through the CLI layer above it (the report
    # and the fit it ends with are teefl.analysis.report / .fitting / .console)
    "bench-no-commands": Rule("teefl.bench", ("teefl.commands",), lazy=True),
    # the analysis reads run directories (teefl.rundir) anywhere, without the training stack
    "analysis-no-federation": Rule("teefl.analysis", SERVER_SIDE, ("torch", "grpc"), lazy=True),
    # the run-directory contract is readable by the analysis: same rule
    "rundir-no-federation": Rule("teefl.rundir", SERVER_SIDE, ("torch", "grpc"), lazy=True),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_import_rule(name: str) -> None:
    rule, mods = RULES[name], graph()
    reached: dict[str, str] = {}
    for subject in _subjects(rule.subject):
        for m in closure(subject, rule.lazy):
            if _under(m, rule.forbidden):
                reached.setdefault(m, subject)
            ext = mods[m].eager_ext | (mods[m].lazy_ext if rule.lazy else set())
            for bad in sorted(ext & set(rule.external)):
                reached.setdefault(bad, f"{subject} via {m}")
    new = {m: via for m, via in reached.items() if m not in rule.known}
    assert not new, f"{name}: forbidden imports (module: imported from) {new}"
    gone = sorted(set(rule.known) - set(reached))
    assert not gone, f"{name}: no longer imported, remove from `known`: {gone}"


#: the layers of docs/architecture.md, lowest first: a module imports (at module level or
#: lazily) only modules of its own layer or of a lower one. The package ``teefl`` itself (the
#: lazy public API) is no node.
LAYERS: list[tuple[str, ...]] = [
    (  # the foundation: data and contracts, no torch, no grpc
        "teefl.errors",
        "teefl.runfiles",
        "teefl.writable",
        "teefl.catalog",
        "teefl.policyspec",
        "teefl.plan_specs",
        "teefl.plan",
        "teefl.registry",
        "teefl.rundir",
        "teefl.resolved",
        "teefl.faults",
    ),
    ("teefl.wire",),
    ("teefl.security", "teefl.measure"),
    ("teefl.workload", "teefl.analysis"),
    ("teefl.strategy", "teefl.store"),
    ("teefl.transport",),
    ("teefl.server", "teefl.client"),
    ("teefl.federation",),
    ("teefl.slurm", "teefl.bench"),
    ("teefl.commands", "teefl.cli", "teefl.__main__"),
]


def layer_of(module: str) -> int:
    for i, members in enumerate(LAYERS):
        if _under(module, members):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (docs/architecture.md)")


def test_dependencies_point_down_the_layers() -> None:
    mods = graph()
    up = []
    for name, m in mods.items():
        if name == ROOT:
            continue
        mine = layer_of(name)
        for dep in sorted((m.eager | m.lazy) & set(mods)):
            if dep != ROOT and layer_of(dep) > mine:
                up.append(f"{name} -> {dep}")
    assert not up, f"imports that point up a layer (docs/architecture.md): {up}"


def test_server_and_client_do_not_import_each_other() -> None:
    mods = graph()
    for a, b in (("teefl.server", "teefl.client"), ("teefl.client", "teefl.server")):
        bad = [
            f"{n} -> {d}"
            for n, m in mods.items()
            if _under(n, (a,))
            for d in m.eager | m.lazy
            if _under(d, (b,))
        ]
        assert not bad, bad


#: lazy-import cycles left today, each with why; the list may only shrink (it is empty: the
#: bench's cells are teefl.bench.cell below the runner and the executors, the workload registry
#: is teefl.workload.registry below the resolver and the digest)
KNOWN_CYCLES: set[frozenset[str]] = set()


def cycles() -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), lazy edges included."""
    mods = graph()
    edges = {m: sorted((mods[m].eager | mods[m].lazy) & set(mods)) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[frozenset[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(mods)))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    found = set(cycles())
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    assert not new, f"import cycles (lazy imports count): {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not gone, f"cycles broken: remove them from KNOWN_CYCLES: {gone}"


def test_graph_sees_imports() -> None:
    """The reader finds the edges the rules rely on (a parser that saw none passes every rule)."""
    mods = graph()
    assert "teefl.errors" in mods["teefl.plan"].eager
    assert "teefl.plan_specs" in mods["teefl.plan"].eager
    assert "teefl.catalog" in mods["teefl.plan_specs"].eager
    assert "teefl.bench.matrix" in mods["teefl.bench.study"].lazy
    assert "teefl.bench.study" not in mods["teefl.bench.matrix"].eager  # TYPE_CHECKING only
    assert "torch" in mods["teefl.workload.models"].eager_ext
    assert closure("teefl.workload.datasets", lazy=False) >= {"teefl.plan", "teefl.workload"}
