"""The workload digest: the same code gives the same digest in every process and at every path;
one changed byte gives another; built-ins cover teefl's workload package; nothing is run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from paths import REPO

from teefl.errors import TeeflError
from teefl.workload.digest import (
    code_root,
    describe_files,
    digest_of_files,
    workload_digest,
)
from teefl.workload.resolve import WORKLOADS, resolve_workload

TASK = textwrap.dedent(
    """
    from torch import nn

    class Task:
        def build_model(self, seed):
            return nn.Linear(2, 2)

        def load(self, party):
            return None

        def train(self, model, data, round_info):
            return {"samples": 1}

        def evaluate(self, model, data):
            return {"samples": 1}
    """
)


def env() -> dict[str, str]:
    e = dict(os.environ)
    src = str(REPO / "src")
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONHASHSEED"] = "random"
    return e


def digest_in_subprocess(ref: str, cwd: Path, extra_path: Path | None = None) -> dict:
    """The digest computed by a fresh interpreter, and whether computing it imported anything."""
    code = textwrap.dedent(
        f"""
        import json, sys
        {f"sys.path.insert(0, {str(extra_path)!r})" if extra_path else ""}
        before = set(sys.modules)
        from teefl.workload.digest import workload_digest
        d = workload_digest({ref!r})
        new = set(sys.modules) - before
        user = sorted(m for m in new if m.startswith(("dgpkg", "teefl_user")))
        print(json.dumps({{"digest": d, "torch": "torch" in new, "user": user}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def clean_modules():
    before_mods, before_path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - before_mods:
        del sys.modules[name]
    sys.path[:] = before_path


def test_lone_file_same_across_processes_and_paths(tmp_path):
    a = tmp_path / "a" / "deep" / "er"
    a.mkdir(parents=True)
    (a / "task.py").write_text(TASK)
    here = workload_digest("./task.py:Task", a)
    assert len(here) == 64 and int(here, 16) >= 0
    # another process, another working directory, an absolute reference
    other = digest_in_subprocess(f"{a}/task.py:Task", tmp_path)
    assert other["digest"] == here
    assert not other["torch"] and not other["user"]  # nothing of the workload ran
    # the same file copied elsewhere: the same digest (paths do not count)
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy2(a / "task.py", b / "task.py")
    assert workload_digest("./task.py:Task", b) == here
    # the attribute named does not matter: the code does
    assert workload_digest("./task.py:Other", b) == here


def test_one_byte_changes_the_digest(tmp_path):
    (tmp_path / "task.py").write_text(TASK)
    before = workload_digest("./task.py:Task", tmp_path)
    (tmp_path / "task.py").write_text(TASK.replace('"samples": 1}', '"samples": 2}', 1))
    assert workload_digest("./task.py:Task", tmp_path) != before
    # a renamed file is other code too (the name is imported, logged, listed)
    (tmp_path / "task.py").rename(tmp_path / "task2.py")
    (tmp_path / "task2.py").write_text(TASK)
    assert workload_digest("./task2.py:Task", tmp_path) != before


def make_package(root: Path) -> Path:
    pkg = root / "dgpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fl.py").write_text(TASK)
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "helpers.py").write_text("SCALE = 2\n")
    (pkg / "weights.json").write_text('{"a": 1}')
    return pkg


def test_package_digest_covers_every_file_and_is_path_independent(tmp_path, clean_modules):
    pkg = make_package(tmp_path / "one")
    ref = "dgpkg.fl:Task"
    sys.path.insert(0, str(tmp_path / "one"))
    first = workload_digest(ref)
    value, root, files = describe_files(ref)
    assert value == first and root == pkg
    assert [f.path for f in files] == [
        "dgpkg/__init__.py",
        "dgpkg/fl.py",
        "dgpkg/sub/__init__.py",
        "dgpkg/sub/helpers.py",
        "dgpkg/weights.json",
    ]
    # a file reference into the package covers the same files
    assert workload_digest("./dgpkg/fl.py:Task", tmp_path / "one") == first
    # copied to another directory and computed in another process: the same digest
    shutil.copytree(pkg, tmp_path / "two" / "dgpkg")
    assert digest_in_subprocess(ref, tmp_path, tmp_path / "two")["digest"] == first
    # bytecode caches do not count, a changed helper (not the referenced module) does
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "fl.cpython-311.pyc").write_bytes(b"junk")
    (pkg / "sub" / "helpers.pyc").write_bytes(b"junk")
    assert workload_digest(ref) == first
    (pkg / "sub" / "helpers.py").write_text("SCALE = 3\n")
    assert workload_digest(ref) != first


def test_digest_runs_none_of_the_packages_code(tmp_path):
    pkg = make_package(tmp_path)
    (pkg / "__init__.py").write_text("raise SystemExit('must not run')\n")
    out = digest_in_subprocess("dgpkg.fl:Task", tmp_path, tmp_path)
    assert out["user"] == [] and len(out["digest"]) == 64


def test_symlink_loops_are_walked_once(tmp_path, clean_modules):
    pkg = make_package(tmp_path)
    sys.path.insert(0, str(tmp_path))
    before = workload_digest("dgpkg.fl:Task")
    (pkg / "sub" / "loop").symlink_to(pkg, target_is_directory=True)
    # terminates, and a link back to a directory already covered adds nothing
    assert workload_digest("dgpkg.fl:Task") == before


def test_builtins_cover_teefls_workload_package():
    import teefl.workload

    wl_dir = Path(teefl.workload.__file__).resolve().parent
    for name in ("vision", "tabular", "image-folder", "noop"):
        assert code_root(WORKLOADS.target(name)) == wl_dir
    value, _, files = describe_files("vision")
    paths = {f.path for f in files}
    assert {"workload/vision.py", "workload/train.py", "workload/api.py"} <= paths
    assert not any("federation" in p or p.endswith("plan.py") for p in paths)
    # the four built-ins share one code root, hence one digest; a module reference into teefl too
    assert workload_digest("tabular") == value == workload_digest("teefl.workload.vision:Vision")


def test_teefls_version_is_part_of_the_digest():
    files = [("task.py", b"x = 1\n")]
    assert digest_of_files(files, "0.1.0") != digest_of_files(files, "0.1.1")
    assert digest_of_files(files, "0.1.0") == digest_of_files(list(files), "0.1.0")
    # path and content are length-prefixed: moving a byte between them is another digest
    assert digest_of_files([("ab", b"c")], "v") != digest_of_files([("a", b"bc")], "v")


def test_resolved_workload_digest_is_the_executed_bytes(tmp_path, clean_modules):
    (tmp_path / "task.py").write_text(TASK)
    w = resolve_workload("./task.py:Task", None, tmp_path)
    assert w.digest == workload_digest("./task.py:Task", tmp_path)


def test_digest_errors_are_one_line(tmp_path):
    for ref in ("./missing.py:T", "no_such_digest_pkg:T", "nosuchname"):
        with pytest.raises(TeeflError) as exc:
            workload_digest(ref, tmp_path)
        assert "\n" not in str(exc.value)


def test_cli_prints_the_digest(tmp_path):
    (tmp_path / "task.py").write_text(TASK)
    cmd = [sys.executable, "-m", "teefl", "workload", "digest"]
    run = subprocess.run(
        [*cmd, "./task.py:Task"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == workload_digest("./task.py:Task", tmp_path)
    listed = subprocess.run(
        [*cmd, "task.py:Task", "--base-dir", str(tmp_path), "--files"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = listed.stdout.splitlines()
    assert lines[0] == run.stdout.strip() and lines[-1].endswith("  task.py")
    bad = subprocess.run(
        [*cmd, "./nope.py:T"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "file not found" in bad.stderr


def test_cli_lists_workloads():
    run = subprocess.run(
        [sys.executable, "-m", "teefl", "workload", "list"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert {"vision", "tabular", "image-folder", "noop"} <= set(run.stdout.split())
