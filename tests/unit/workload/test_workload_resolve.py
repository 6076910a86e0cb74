"""From ``workload: {name, options}`` to a ready workload -- or one clear line naming the
reference and the Python error, for every way it can go wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from teefl.errors import TeeflError
from teefl.workload.api import Party, RoundInfo
from teefl.workload.digest import workload_digest
from teefl.workload.failure import WorkloadFailure
from teefl.workload.resolve import WORKLOADS, resolve_workload

TASK = """
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
import torch


class Task:
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(0.1, gt=0)
        sizes: dict[str, int] = {}

    def __init__(self, options):
        self.options = options

    def build_model(self, seed):
        torch.manual_seed(seed)
        return nn.Linear(3, 2)

    def load(self, party):
        return party.name

    def train(self, model, data, round_info):
        if data == "broken":
            raise ValueError("bad batch")
        return {"loss": 0.5, "samples": 10}

    def evaluate(self, model, data):
        return {"accuracy": 1.0}    # forgot samples
"""


@pytest.fixture
def clean_modules():
    before_mods, before_path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - before_mods:
        del sys.modules[name]
    sys.path[:] = before_path


@pytest.fixture
def task_dir(tmp_path, clean_modules):
    (tmp_path / "task.py").write_text(TASK)
    return tmp_path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_builtins_are_registered():
    assert {"vision", "image-folder", "tabular", "noop"} <= set(WORKLOADS.names())


def test_user_file_resolves_with_options_and_digest(task_dir):
    w = resolve_workload("./task.py:Task", {"lr": 0.5}, task_dir)
    assert w.ref == "./task.py:Task" and w.options.lr == 0.5
    assert w.digest == workload_digest("./task.py:Task", task_dir)
    model = w.build_model(3)
    assert isinstance(model, torch.nn.Linear)
    assert w.travelling(model) == ["weight", "bias"]
    data = w.load(Party("col1", 0, 2))
    assert w.train(model, data, RoundInfo(1, 1)) == {"loss": 0.5, "samples": 10}


def test_user_failures_in_rounds_are_workload_failures(task_dir):
    w = resolve_workload("./task.py:Task", {}, task_dir)
    model = w.build_model(0)
    with pytest.raises(WorkloadFailure) as exc:
        w.train(model, "broken", RoundInfo(2, 1), party="col3")
    assert str(exc.value) == (
        "col3: workload ./task.py:Task failed in train (round 2): ValueError: bad batch"
    )
    assert "raise ValueError" in exc.value.traceback
    with pytest.raises(WorkloadFailure, match="evaluate returned metrics without 'samples'"):
        w.evaluate(model, "x", party="col3")


# -- options: the plan's error style, with the key's path ---------------------------------------
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"lr": -1}, "workload.options.lr: Input should be greater than 0"),
        ({"lr": "fast"}, "workload.options.lr: Input should be a valid number"),
        ({"lrr": 1}, "workload.options.lrr: unknown key (known: lr, sizes)"),
        ({"sizes": {"a": "x"}}, "workload.options.sizes.a: Input should be a valid integer"),
        ([1, 2], "workload.options: must be a mapping of keys, not list"),
    ],
)
def test_bad_options_name_the_key_path(task_dir, options, expected):
    with pytest.raises(TeeflError) as exc:
        resolve_workload("./task.py:Task", options, task_dir, source="plans/p.yaml")
    text = one_line(exc)
    assert text.startswith("invalid plan plans/p.yaml: ")
    assert expected in text


def test_several_option_errors_in_one_line(task_dir):
    with pytest.raises(TeeflError) as exc:
        resolve_workload("./task.py:Task", {"lr": 0, "x": 1}, task_dir)
    text = one_line(exc)
    assert "workload.options.lr:" in text and "workload.options.x: unknown key" in text


def test_unknown_keys_refused_even_when_the_model_allows_extras(tmp_path, clean_modules):
    (tmp_path / "lax.py").write_text(
        TASK.replace(
            'model_config = ConfigDict(extra="forbid")', 'model_config = {"extra": "allow"}'
        )
    )
    with pytest.raises(TeeflError) as exc:
        resolve_workload("./lax.py:Task", {"lr": 1, "typo": 2}, tmp_path)
    assert "workload.options.typo: unknown key (known: lr, sizes)" in one_line(exc)


def test_options_for_a_workload_without_options(tmp_path, clean_modules):
    body = TASK.split("class Task:")[1].split("def __init__")[0]
    src = TASK.replace(body, "\n    ").replace(
        "def __init__(self, options):\n        self.options = options", "pass"
    )
    (tmp_path / "bare.py").write_text(src)
    assert resolve_workload("./bare.py:Task", None, tmp_path).options is None
    with pytest.raises(TeeflError) as exc:
        resolve_workload("./bare.py:Task", {"lr": 1}, tmp_path)
    assert "takes no options" in one_line(exc)


# -- every bad reference: one clear line -------------------------------------------------------
def _ref_error(ref: str, base: Path | None = None, options=None) -> str:
    with pytest.raises(TeeflError) as exc:
        resolve_workload(ref, options, base, check_build=True)
    text = one_line(exc)
    assert repr(ref) in text or ref in text
    return text


def test_missing_module(clean_modules):
    assert "no module named 'no_such_fl_pkg'" in _ref_error("no_such_fl_pkg.fl:Task")


def test_missing_file(tmp_path):
    assert "file not found" in _ref_error("./nope.py:Task", tmp_path)


def test_missing_attribute(task_dir):
    assert "has no attribute 'Tsk' (it defines: Task)" in _ref_error("./task.py:Tsk", task_dir)


def test_not_a_workload(tmp_path, clean_modules):
    (tmp_path / "w.py").write_text(
        "class Half:\n    def build_model(self, seed): ...\n"
        "def fn(): ...\n"
        "from types import SimpleNamespace\n"
        "inst = SimpleNamespace(build_model=1, load=1, train=1, evaluate=1)\n"
    )
    assert (
        "is the class w.py:Half, not a workload (a class with build_model, load, train and "
        "evaluate): it lacks load, train, evaluate"
    ) in _ref_error("./w.py:Half", tmp_path)
    assert "is the callable w.py:fn, not a workload" in _ref_error("./w.py:fn", tmp_path)
    assert "it is an instance; reference its class" in _ref_error("./w.py:inst", tmp_path)


def test_import_error_in_the_users_module(tmp_path, clean_modules):
    (tmp_path / "w.py").write_text("import numpy\nnumpy.no_such_function()\n")
    text = _ref_error("./w.py:Task", tmp_path)
    assert "AttributeError" in text and "no_such_function" in text and "w.py:2" in text


def test_constructor_raising(tmp_path, clean_modules):
    (tmp_path / "w.py").write_text(
        TASK.replace("self.options = options", "raise OSError('no licence file')")
    )
    assert "creating it failed: OSError: no licence file" in _ref_error("./w.py:Task", tmp_path)


def test_build_model_raising_or_returning_junk(tmp_path, clean_modules):
    (tmp_path / "w.py").write_text(
        TASK.replace("return nn.Linear(3, 2)", "return nn.Linear(3, -2)")
    )
    text = _ref_error("./w.py:Task", tmp_path)
    assert "build_model(seed=0) failed: RuntimeError" in text
    (tmp_path / "v.py").write_text(TASK.replace("return nn.Linear(3, 2)", "return 42"))
    assert "build_model returned int, not a torch.nn.Module" in _ref_error("./v.py:Task", tmp_path)


def test_trainable_state_raising_is_caught_at_check(tmp_path, clean_modules):
    (tmp_path / "w.py").write_text(
        TASK + "\n    def trainable_state(self, model):\n        return ['nope']\n"
    )
    assert "trainable_state names 1 tensors the model's state dict lacks" in _ref_error(
        "./w.py:Task", tmp_path
    )


def test_without_check_build_the_model_is_not_built(tmp_path, clean_modules):
    (tmp_path / "w.py").write_text(TASK.replace("return nn.Linear(3, 2)", "return 42"))
    w = resolve_workload("./w.py:Task", {}, tmp_path)  # building can cost minutes: on request
    with pytest.raises(TeeflError, match=r"not a torch\.nn\.Module"):
        w.build_model(0)


def test_unknown_name():
    assert "unknown workload 'visoin'; choose one of: image-folder, noop, tabular, vision" in (
        _ref_error("visoin")
    )


def test_builtin_options_are_validated_with_paths():
    with pytest.raises(TeeflError) as exc:
        resolve_workload("vision", {"training": {"lr": 0}, "model": {"name": "vgg"}})
    text = one_line(exc)
    assert "workload.options.training.lr: Input should be greater than 0" in text
    assert "workload.options.model.name: unknown model 'vgg'" in text


def test_installed_entry_point_in_the_teefl_workloads_group(tmp_path, clean_modules):
    site = tmp_path / "site"
    (site / "epwl_pkg").mkdir(parents=True)
    (site / "epwl_pkg" / "__init__.py").write_text("")
    (site / "epwl_pkg" / "fl.py").write_text(TASK)
    info = site / "epwl_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epwl-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[teefl.workloads]\nmytask = epwl_pkg.fl:Task\n")
    sys.path.insert(0, str(site))
    assert "mytask" in WORKLOADS.names()
    w = resolve_workload("mytask", {"lr": 0.2})
    assert w.target.kind == "entry-point" and w.options.lr == 0.2
    # its digest covers the installed package, exactly as the module reference's does
    assert w.digest == workload_digest("epwl_pkg.fl:Task") == workload_digest("mytask")


def test_a_builtins_own_error_reads_as_a_sentence(tmp_path):
    w = resolve_workload("tabular", {"label": "y", "classes": ["a", "b"], "numeric": ["x"]})
    with pytest.raises(WorkloadFailure) as exc:
        w.load(Party("col1", 0, 1, 0, tmp_path))
    assert str(exc.value) == (
        f"col1: workload tabular failed in load: table not found: {tmp_path / 'data.csv'}"
    )


def test_where_prefixes_reference_errors(tmp_path):
    with pytest.raises(TeeflError) as exc:
        resolve_workload("./nope.py:T", None, tmp_path, where="workload.name")
    assert one_line(exc).startswith("workload.name: workload './nope.py:T': file not found")
