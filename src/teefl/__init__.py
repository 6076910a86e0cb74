"""teefl: confidential federated learning, with the cost of every protection measured.

What users may import from ``teefl`` is exactly `__all__` (guarded by
``tests/unit/core/test_public_api.py``); everything else is internal and may move between
releases. ``import teefl`` stays cheap: it imports neither torch nor grpc, and each name below
is loaded on first use (PEP 562), so a plan can be checked or a run directory read on a machine
without the training stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from teefl.errors import TeeflError

__version__ = "0.1.0"

#: public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    # the plan
    "Plan": "teefl.plan",
    "load_plan": "teefl.plan",
    "plan_from_dict": "teefl.plan",
    "default_plan": "teefl.plan",
    # the run directory a run leaves behind
    "RunDir": "teefl.rundir",
    # strategies (torch)
    "Strategy": "teefl.strategy",
    "StrategyOptions": "teefl.strategy",
    "Accumulator": "teefl.strategy",
    "RoundConfig": "teefl.strategy",
    "register_strategy": "teefl.strategy",
    "strategy_names": "teefl.strategy",
    # workloads (a protocol: no torch until a workload is built)
    "Workload": "teefl.workload.api",
    "WorkloadOptions": "teefl.workload.api",
    "Party": "teefl.workload.api",
    "RoundInfo": "teefl.workload.api",
    "round_seed": "teefl.workload.api",
}

__all__ = [
    "Accumulator",
    "Party",
    "Plan",
    "RoundConfig",
    "RoundInfo",
    "RunDir",
    "Strategy",
    "StrategyOptions",
    "TeeflError",
    "Workload",
    "WorkloadOptions",
    "__version__",
    "default_plan",
    "load_plan",
    "plan_from_dict",
    "register_strategy",
    "register_workload",
    "round_seed",
    "strategy_names",
]

if TYPE_CHECKING:
    from teefl.plan import Plan, default_plan, load_plan, plan_from_dict
    from teefl.rundir import RunDir
    from teefl.strategy import (
        Accumulator,
        RoundConfig,
        Strategy,
        StrategyOptions,
        register_strategy,
        strategy_names,
    )
    from teefl.workload.api import Party, RoundInfo, Workload, WorkloadOptions, round_seed


def register_workload(name: str) -> Any:
    """Decorator: ``@teefl.register_workload("name")`` on a workload class makes ``name`` a
    value of the plan's ``workload.name`` (see docs for the class's methods)."""
    from teefl.workload.registry import WORKLOADS

    return WORKLOADS.register(name)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'teefl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
