"""The public API: what ``teefl`` names in ``__all__`` is a promise to users, and ``import
teefl`` stays cheap (no torch, no grpc) so that checking a plan or reading a run needs neither.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import teefl

EXPECTED = {
    "__version__",
    "TeeflError",
    # plan
    "Plan",
    "load_plan",
    "plan_from_dict",
    "default_plan",
    # run directory
    "RunDir",
    # strategies
    "Strategy",
    "StrategyOptions",
    "Accumulator",
    "RoundConfig",
    "register_strategy",
    "strategy_names",
    # workloads
    "Workload",
    "WorkloadOptions",
    "Party",
    "RoundInfo",
    "round_seed",
    "register_workload",
}


def test_all_is_exactly_the_public_api() -> None:
    assert len(teefl.__all__) == len(set(teefl.__all__)), "a name listed twice"
    assert set(teefl.__all__) == EXPECTED


def test_every_public_name_resolves_to_its_defining_object() -> None:
    from teefl.errors import TeeflError
    from teefl.plan import Plan, load_plan
    from teefl.rundir import RunDir
    from teefl.strategy import Strategy, register_strategy
    from teefl.workload.api import Workload

    for name in teefl.__all__:
        assert getattr(teefl, name) is not None, name
    assert teefl.TeeflError is TeeflError
    assert (teefl.Plan, teefl.load_plan, teefl.RunDir) == (Plan, load_plan, RunDir)
    assert (teefl.Strategy, teefl.register_strategy) == (Strategy, register_strategy)
    assert teefl.Workload is Workload
    assert isinstance(teefl.__version__, str)
    assert set(teefl.__all__) <= set(dir(teefl))


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        teefl.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("teefl.NoSuchThing resolved")


def test_register_workload_registers_a_plain_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from teefl.workload.registry import WORKLOADS

    # the registry is process-wide: the name goes again after the test (other tests list names)
    monkeypatch.setattr(WORKLOADS, "_entries", dict(WORKLOADS._entries))

    @teefl.register_workload("test-public-api-wl")
    class W:
        def build_model(self, seed: int): ...
        def load(self, party): ...
        def train(self, model, data, round_info): ...
        def evaluate(self, model, data): ...

    assert "test-public-api-wl" in WORKLOADS.names()


def test_import_teefl_is_cheap() -> None:
    """No torch, grpc or the federation at ``import teefl``; the plan and workload protocol names
    load without torch either."""
    code = (
        "import sys, teefl\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc', 'torchvision')"
        " or m.startswith('teefl.federation')]\n"
        "assert not heavy, ('import teefl', heavy)\n"
        "teefl.Plan, teefl.load_plan, teefl.RunDir, teefl.Workload, teefl.register_workload\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc')]\n"
        "assert not heavy, ('plan/rundir/workload names', heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
