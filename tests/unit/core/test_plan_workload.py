"""The plan's ``workload:`` section: its form checked torch-free, old plans = vision, one-line
errors for the mistakes a user makes."""

from __future__ import annotations

import pytest

from teefl.errors import TeeflError
from teefl.plan import load_plan, plan_digest, plan_from_dict


def test_an_old_plan_is_the_vision_workload_with_its_sections() -> None:
    plan = plan_from_dict({"model": {"name": "resnet18"}, "dataset": {"name": "cifar10"}})
    assert plan.workload.name == "vision" and plan.workload.options == {}
    assert plan.model.name == "resnet18"


def test_vision_options_are_the_same_plan_as_top_level_sections() -> None:
    a = plan_from_dict({"workload": {"name": "vision", "options": {"model": {"name": "resnet18"}}}})
    b = plan_from_dict({"model": {"name": "resnet18"}})
    assert a.model.name == "resnet18" and plan_digest(a) == plan_digest(b)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"workload": {"name": "tabular"}, "model": {"name": "resnet18"}}, "belong to the vision"),
        ({"workload": {"options": {"modle": {}}}}, "workload.options.modle: unknown key"),
        ({"workload": {"options": {"model": {}}}, "model": {}}, "given both"),
        ({"workload": {"name": "my task"}}, "workload.name: 'my task' is not a workload ref"),
        ({"workload": {"allowed_digests": ["abc"]}}, "workload.allowed_digests: 'abc'"),
        ({"workload": {"nme": "x"}}, "workload.nme"),
    ],
)
def test_a_bad_workload_section_is_one_line(data, needle) -> None:
    with pytest.raises(TeeflError) as err:
        plan_from_dict(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_file_references_are_relative_to_the_plan_and_host_local(tmp_path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "plan.yaml").write_text(
            "workload:\n  name: ./task.py:Task\n  data_root: parties\n"
        )
    a, b = load_plan(tmp_path / "a" / "plan.yaml"), load_plan(tmp_path / "b" / "plan.yaml")
    assert a.workload.base == (tmp_path / "a").resolve()
    assert a.workload.data_root == (tmp_path / "a" / "parties").resolve()
    assert plan_digest(a) == plan_digest(b)  # where the code is differs; WHICH is the digest's
    again = plan_from_dict(__import__("yaml").safe_load(a.to_yaml()))  # the run dir's copy
    assert again.workload.base == a.workload.base


def test_a_plan_workload_is_resolved_with_one_line_errors(tmp_path) -> None:
    from teefl.workload.resolve import plan_workload

    (tmp_path / "task.py").write_text("class NotAWorkload:\n    pass\n")
    cases = {
        "missing_mod:Task": "missing_mod",
        "./task.py:Nope": "Nope",
        "./task.py:NotAWorkload": "lacks build_model",
        "./absent.py:Task": "file not found",
    }
    for ref, needle in cases.items():
        plan = plan_from_dict({"workload": {"name": ref}}, base=tmp_path)
        with pytest.raises(TeeflError) as err:
            plan_workload(plan)
        assert needle in str(err.value) and "\n" not in str(err.value), ref
    plan = plan_from_dict({"workload": {"name": "tabular", "options": {"lr": -1}}})
    with pytest.raises(TeeflError, match=r"workload\.options"):
        plan_workload(plan)
