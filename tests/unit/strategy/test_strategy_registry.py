"""The registry: by name, by module:attr, by entry point; every bad reference or bad option is
one TeeflError line that names it."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from teefl.errors import TeeflError
from teefl.registry import Registry
from teefl.strategy import (
    FedAdam,
    FedAvg,
    Strategy,
    build_strategy,
    register_strategy,
    resolve_strategy,
    strategy_names,
)
from teefl.strategy.registry import STRATEGIES

PLUGIN = """
from teefl.strategy import FedAvg, StrategyOptions

class Options(StrategyOptions):
    scale: float = 1.0

class Scaled(FedAvg):
    Options = Options

def not_a_strategy():
    pass
"""


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch):
    """A package of one's own on sys.path: module ``myplug``, and an installed distribution
    ``myplug`` that declares entry points in group ``teefl.strategies`` (real metadata that
    importlib.metadata finds on sys.path, as for a pip-installed package)."""
    (tmp_path / "myplug.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "broken_plug.py").write_text("raise RuntimeError('half-installed')\n")
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    dist = tmp_path / "myplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[teefl.strategies]\n"
        "scaled = myplug:Scaled\n"
        "notone = myplug:not_a_strategy\n"
        "gone = myplug:Missing\n"
        "fedavg = myplug:Scaled\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for mod in ("myplug", "broken_plug", "needs_dep"):
        sys.modules.pop(mod, None)


def test_builtin_names() -> None:
    assert {
        "fedavg",
        "median",
        "trimmed_mean",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "krum",
        "multi_krum",
    } <= set(strategy_names())
    assert resolve_strategy("fedadam") is FedAdam
    assert build_strategy("fedadam", {"eta": 0.5}).options.eta == 0.5
    assert build_strategy("teefl.strategy.fedavg:FedAvg").name == "fedavg"


def test_module_attr_and_entry_points(plugin_dir) -> None:
    s = build_strategy("myplug:Scaled", {"scale": 2.0})
    assert type(s).__name__ == "Scaled" and s.options.scale == 2.0
    assert s.name == "myplug:Scaled"  # unregistered: its state is saved under its reference
    assert "scaled" in strategy_names()
    assert type(build_strategy("scaled")).__name__ == "Scaled"
    assert resolve_strategy("fedavg") is FedAvg  # a registered name wins over an entry point


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nosuch", "federation.strategy: unknown strategy 'nosuch'; choose one of: .*fedadam"),
        ("no_such_module_xyz:Thing", "no module named 'no_such_module_xyz'"),
        ("myplug:Nope", "module 'myplug' has no attribute 'Nope'"),
        ("myplug:not_a_strategy", "is the callable myplug:not_a_strategy, not a teefl strategy"),
        ("teefl.strategy.fedopt:FedOpt", "FedOpt, not a teefl strategy"),  # abstract
        ("broken_plug:X", "importing 'broken_plug' failed: RuntimeError: half-installed"),
        ("needs_dep:X", "importing 'needs_dep' failed: No module named 'no_such_dependency_xyz'"),
        ("notone", "'notone' is the callable myplug:not_a_strategy, not a teefl strategy"),
        ("gone", r"entry point \(teefl.strategies: myplug:Missing\) failed to load"),
        ("myplug:", "must read 'module:attribute'"),
        ("", "non-empty string"),
    ],
)
def test_bad_references(plugin_dir, ref, message) -> None:
    with pytest.raises(TeeflError, match=message) as info:
        build_strategy(ref, where="federation.strategy")
    assert "\n" not in str(info.value) and "federation.strategy" in str(info.value)


def test_bad_options_name_the_key() -> None:
    with pytest.raises(TeeflError) as info:
        build_strategy("fedadam", {"beta_1": 1.5, "etaa": 0.1}, where="federation.strategy")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("strategy 'fedadam': ")
    assert "federation.strategy.options.beta_1: Input should be less than 1" in msg
    assert "federation.strategy.options.etaa: unknown key" in msg
    with pytest.raises(TeeflError, match=r"options\.beta_2: unknown key"):
        build_strategy("fedadagrad", {"beta_2": 0.9})  # Adagrad has no second-moment decay
    with pytest.raises(TeeflError, match=r"options\.f: Input should be greater than or equal"):
        build_strategy("krum", {"f": -1})
    with pytest.raises(TeeflError, match="options must be a mapping"):
        build_strategy("median", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TeeflError, match=r"options\.trim_ratio: unknown key"):
        build_strategy("median", {"trim_ratio": 0.1})


def test_register_refuses_clashes_and_non_strategies() -> None:
    class Mine(FedAvg):
        pass

    try:
        assert register_strategy("test-mine")(Mine) is Mine
        assert register_strategy("test-mine")(Mine) is Mine  # again: a no-op
        assert Mine.name == "test-mine" and resolve_strategy("test-mine") is Mine
        register_strategy("test-alias")(FedAdam)
        assert resolve_strategy("test-alias") is FedAdam and FedAdam.name == "fedadam"
        with pytest.raises(TeeflError, match="'fedavg' is registered already"):
            register_strategy("fedavg")(Mine)
        with pytest.raises(TeeflError, match="not a teefl strategy"):
            register_strategy("test-fn")(lambda: None)
        with pytest.raises(TeeflError, match="not valid"):
            register_strategy("a:b")
    finally:
        STRATEGIES._entries.pop("test-mine", None)
        STRATEGIES._entries.pop("test-alias", None)


def test_the_core_is_generic() -> None:
    """What the workload registry will be: any kind of object, its own group and check."""
    reg: Registry[object] = Registry("workload", "teefl.test-workloads", callable, "a callable")

    @reg.register("double")
    def double(x):
        return 2 * x

    assert reg.resolve("double") is double
    assert reg.resolve("os.path:join") is __import__("os.path").path.join
    with pytest.raises(TeeflError, match="workload 'math:pi' is a float object, not a callable"):
        reg.resolve("math:pi")
    with pytest.raises(TeeflError, match="unknown workload 'x'; choose one of: double"):
        reg.resolve("x")


def test_a_strategy_written_outside_teefl() -> None:
    """docs/strategies.md's example in substance: subclass, options, register, build by name."""
    import torch

    from teefl.strategy import StrategyOptions
    from teefl.strategy.kept import KeptUpdates

    class MaxOptions(StrategyOptions):
        floor: float = 0.0

    class MaxAcc(KeptUpdates):
        def __init__(self, ref, layout, floor):
            super().__init__(ref, layout)
            self.floor = floor

        def combine(self, stack):
            return stack.double().max(dim=0).values.clamp(min=self.floor)

    class Largest(Strategy):
        Options = MaxOptions
        keeps_updates = True

        def begin(self, rnd, reference, layout=None):
            return MaxAcc(reference, layout, self.options.floor)

    try:
        register_strategy("test-largest")(Largest)
        s = build_strategy("test-largest", {"floor": 0.5})
        acc = s.begin(1, {"w": torch.zeros(2)})
        acc.add({"w": torch.tensor([0.0, 3.0])}, 1)
        acc.add({"w": torch.tensor([0.25, 1.0])}, 1)
        assert torch.equal(acc.result()["w"], torch.tensor([0.5, 3.0]))
    finally:
        STRATEGIES._entries.pop("test-largest", None)
