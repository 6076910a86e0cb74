"""The generic plug-in registry: names, entry points, module:attr and file references, and one
clear line for every way a reference can be wrong."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from teefl.errors import TeeflError
from teefl.registry import Registry


class Thing:
    kind = "thing"


def _check(obj):
    if getattr(obj, "kind", None) != "thing":
        return f"{obj!r} has no kind 'thing'"
    return None


@pytest.fixture
def reg():
    return Registry(
        "thing",
        "teefl.test-things",
        lambda obj: _check(obj) is None,
        "a thing",
        why=_check,
        lazy={"builtin": "json:JSONDecoder"},
        files=True,
    )


@pytest.fixture
def clean_modules():
    """Forget modules and sys.path entries a test adds, so tests do not see each other's."""
    before_mods, before_path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - before_mods:
        del sys.modules[name]
    sys.path[:] = before_path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    assert "Traceback" not in text
    return text


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_register_and_resolve_by_name(reg):
    @reg.register("mine")
    class Mine(Thing):
        pass

    assert reg.resolve("mine") is Mine
    assert "mine" in reg.names() and "builtin" in reg.names()
    t = reg.target("mine")
    assert t.kind == "registered" and t.module == __name__


def test_register_refuses_what_the_check_refuses(reg):
    with pytest.raises(TeeflError, match=r"is not a thing: .* has no kind 'thing'"):
        reg.register("bad")(object)
    with pytest.raises(TeeflError, match="not valid"):
        reg.register("no:colons")
    with pytest.raises(TeeflError, match=r"'builtin' is registered already \(by json:JSONDecoder"):
        reg.register("builtin")(Thing)


def test_builtin_is_imported_only_when_loaded(reg):
    t = reg.target("builtin")
    assert (t.kind, t.module, t.attr) == ("builtin", "json", "JSONDecoder")
    with pytest.raises(TeeflError) as exc:  # json.JSONDecoder is no "thing"
        reg.resolve("builtin")
    assert "thing 'builtin' is the class json.decoder:JSONDecoder, not a thing: " in one_line(exc)


def test_module_reference_with_dotted_attribute(reg, tmp_path, clean_modules):
    write(
        tmp_path / "regpkg_a" / "__init__.py",
        """
        class Outer:
            class Inner:
                kind = "thing"
        """,
    )
    sys.path.insert(0, str(tmp_path))
    assert reg.resolve("regpkg_a:Outer.Inner").kind == "thing"


def test_lone_file_relative_to_base_dir(reg, tmp_path, clean_modules):
    write(tmp_path / "plans" / "task.py", "class T:\n    kind = 'thing'\n")
    obj = reg.resolve("./task.py:T", base_dir=tmp_path / "plans")
    assert obj.kind == "thing"
    assert reg.resolve(f"{tmp_path}/plans/task.py:T").kind == "thing"  # absolute path
    # two files named task.py in different folders do not collide
    write(tmp_path / "other" / "task.py", "class T:\n    kind = 'thing'\n    other = 1\n")
    assert reg.resolve("./task.py:T", base_dir=tmp_path / "other").other == 1
    assert not hasattr(reg.resolve("./task.py:T", base_dir=tmp_path / "plans"), "other")


def test_lone_file_does_not_put_its_folder_on_sys_path(reg, tmp_path, clean_modules):
    """Its siblings are not importable: no code may run that the file's digest misses."""
    write(tmp_path / "helper_sibling.py", "X = 1\n")
    write(tmp_path / "task.py", "import helper_sibling\nclass T:\n    kind = 'thing'\n")
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./task.py:T", base_dir=tmp_path)
    text = one_line(exc)
    assert "'./task.py:T'" in text and "No module named 'helper_sibling'" in text
    assert str(tmp_path) not in sys.path


def test_file_inside_a_package_gets_its_relative_imports(reg, tmp_path, clean_modules):
    write(tmp_path / "regpkg_b" / "__init__.py", "")
    write(tmp_path / "regpkg_b" / "util.py", "KIND = 'thing'\n")
    write(tmp_path / "regpkg_b" / "task.py", "from .util import KIND\nclass T:\n    kind = KIND\n")
    t = reg.target("./regpkg_b/task.py:T", tmp_path)
    assert (t.module, t.package_root) == ("regpkg_b.task", tmp_path)
    assert reg.load(t).kind == "thing"


def test_entry_point_of_an_installed_distribution(reg, tmp_path, clean_modules):
    """A real (if minimal) installed distribution on sys.path, found by importlib.metadata."""
    write(tmp_path / "site" / "regpkg_c" / "__init__.py", "class Plug:\n    kind = 'thing'\n")
    write(
        tmp_path / "site" / "regpkg_c-1.0.dist-info" / "METADATA",
        "Metadata-Version: 2.1\nName: regpkg-c\nVersion: 1.0\n",
    )
    write(
        tmp_path / "site" / "regpkg_c-1.0.dist-info" / "entry_points.txt",
        "[teefl.test-things]\nplug = regpkg_c:Plug\n",
    )
    sys.path.insert(0, str(tmp_path / "site"))
    assert "plug" in reg.names()
    t = reg.target("plug")
    assert (t.kind, t.module, t.attr) == ("entry-point", "regpkg_c", "Plug")
    assert reg.resolve("plug").kind == "thing"


# -- every bad reference: one line naming it and the Python error ------------------------------
def test_unknown_name_lists_the_known_ones(reg):
    with pytest.raises(TeeflError) as exc:
        reg.resolve("nosuch")
    text = one_line(exc)
    assert (
        "unknown thing 'nosuch'; choose one of: builtin, or give a 'module:attribute' or "
        "'./file.py:attribute' reference"
    ) in text


def test_missing_module(reg, clean_modules):
    with pytest.raises(TeeflError) as exc:
        reg.resolve("no_such_pkg_xyz.sub:Thing")
    text = one_line(exc)
    assert "'no_such_pkg_xyz.sub:Thing'" in text and "no module named 'no_such_pkg_xyz.sub'" in text


def test_module_whose_own_import_fails(reg, tmp_path, clean_modules):
    write(tmp_path / "regpkg_d.py", "import not_installed_dep_xyz\n")
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(TeeflError) as exc:
        reg.resolve("regpkg_d:T")
    text = one_line(exc)
    assert "importing 'regpkg_d' failed: No module named 'not_installed_dep_xyz'" in text


def test_missing_file(reg, tmp_path):
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./absent.py:T", base_dir=tmp_path)
    assert f"file not found: {tmp_path / 'absent.py'}" in one_line(exc)


def test_file_that_is_not_python(reg, tmp_path):
    write(tmp_path / "dir" / "task.txt", "")
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./dir/task.txt:T", base_dir=tmp_path)
    assert "not a Python file" in one_line(exc)


def test_missing_attribute_names_what_the_module_defines(reg, tmp_path, clean_modules):
    write(tmp_path / "task.py", "from pathlib import Path\nclass Task:\n    kind = 'thing'\n")
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./task.py:Tsk", base_dir=tmp_path)
    text = one_line(exc)
    assert "has no attribute 'Tsk'" in text and "(it defines: Task)" in text
    assert "Path" not in text  # imported names are not the module's own


def test_file_raising_at_import_names_the_line(reg, tmp_path, clean_modules):
    write(tmp_path / "task.py", "x = 1\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./task.py:T", base_dir=tmp_path)
    text = one_line(exc)
    assert "RuntimeError: no GPU here" in text and "task.py:2" in text
    assert reg.target("./task.py:T", tmp_path).module not in sys.modules  # no half module left


def test_syntax_error(reg, tmp_path, clean_modules):
    write(tmp_path / "task.py", "class T:\n  def f(:\n")
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./task.py:T", base_dir=tmp_path)
    text = one_line(exc)
    assert "SyntaxError" in text and "task.py, line 2" in text


def test_object_of_the_wrong_kind(reg, tmp_path, clean_modules):
    write(tmp_path / "task.py", "def T():\n    pass\n")
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./task.py:T", base_dir=tmp_path)
    assert "thing './task.py:T' is the callable task.py:T, not a thing: " in one_line(exc)


@pytest.mark.parametrize("ref", ["mod:", ":Attr", "mod:1bad", "not a module:X", "  "])
def test_malformed_references(reg, ref):
    with pytest.raises(TeeflError) as exc:
        reg.target(ref)
    one_line(exc)


def test_where_prefixes_every_error(reg, tmp_path):
    with pytest.raises(TeeflError) as exc:
        reg.resolve("./absent.py:T", "workload.name", tmp_path)
    assert one_line(exc).startswith("workload.name: thing './absent.py:T': file not found")


def test_an_entry_point_that_fails_to_load_names_it(reg, tmp_path, clean_modules):
    write(tmp_path / "regpkg_e" / "__init__.py", "")
    write(
        tmp_path / "regpkg_e-1.0.dist-info" / "METADATA",
        "Metadata-Version: 2.1\nName: regpkg-e\nVersion: 1.0\n",
    )
    write(
        tmp_path / "regpkg_e-1.0.dist-info" / "entry_points.txt",
        "[teefl.test-things]\ngone = regpkg_e:Missing\n",
    )
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(TeeflError) as exc:
        reg.resolve("gone")
    assert (
        "thing 'gone': its entry point (teefl.test-things: regpkg_e:Missing) failed to load: "
        "module 'regpkg_e' has no attribute 'Missing'"
    ) in one_line(exc)


def test_file_references_only_where_the_kind_allows_them(tmp_path):
    strict = Registry("plug", "teefl.test-plugs", callable, "a callable")
    with pytest.raises(TeeflError) as exc:
        strict.resolve("./task.py:T", base_dir=tmp_path)
    assert "plug reference './task.py:T': a plug is named by 'module:attribute'" in one_line(exc)
