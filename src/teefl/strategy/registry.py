"""The strategy registry: ``@register_strategy("name")``, a ``module:attr`` reference, or an
entry point of group ``teefl.strategies`` (see `teefl.registry` for the lookup order).

A third-party package makes its strategy available by name with, in its pyproject.toml::

    [project.entry-points."teefl.strategies"]
    mystrategy = "mypkg.strategies:MyStrategy"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from teefl.registry import Registry
from teefl.strategy.base import Strategy, StrategyOptions

GROUP = "teefl.strategies"

#: the modules that register teefl's own strategies (imported on the first lookup)
BUILTINS = (
    "teefl.strategy.fedavg",
    "teefl.strategy.median",
    "teefl.strategy.trimmed_mean",
    "teefl.strategy.fedprox",
    "teefl.strategy.fedadam",
    "teefl.strategy.fedyogi",
    "teefl.strategy.fedadagrad",
    "teefl.strategy.krum",
)


def _is_strategy(obj: object) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, Strategy)
        and not getattr(obj, "__abstractmethods__", None)
    )


STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy",
    GROUP,
    _is_strategy,
    "a teefl strategy (a concrete subclass of teefl.strategy.Strategy)",
    BUILTINS,
)

#: ``@register_strategy("name")`` on a `Strategy` subclass registers it under ``name``
register_strategy = STRATEGIES.register


def resolve_strategy(ref: str, where: str | None = None) -> type[Strategy]:
    """The strategy class ``ref`` names (a registered name, ``module:attr``, an entry point)."""
    return STRATEGIES.resolve(ref, where)


def build_strategy(
    ref: str,
    options: StrategyOptions | Mapping[str, Any] | None = None,
    where: str = "strategy",
) -> Strategy:
    """The strategy ``ref`` names, built with ``options`` (validated by its ``Options``).

    ``where``: the plan key the reference sits under (e.g. ``federation.strategy``); errors name
    it, and bad options are named as ``<where>.options.<key>``.
    """
    cls = resolve_strategy(ref, where)
    return cls(cls.validate_options(options, f"{where}.options"))


def strategy_names() -> list[str]:
    """Every strategy name a lookup finds (built-in, registered, entry points)."""
    return STRATEGIES.names()


#: where a plan names its strategy (errors name this key)
PLAN_KEY = "federation.strategy"


def plan_strategy(spec: Any) -> Strategy:
    """The strategy a plan's ``federation.strategy`` section (`teefl.plan.StrategySpec`) names,
    built with its options; every problem is one `TeeflError` line naming the key."""
    return build_strategy(spec.name, spec.options, where=PLAN_KEY)


def strategy_digest(ref: str) -> str:
    """SHA-256 (hex) of the code of strategy ``ref``, computed like a workload digest
    (`teefl.workload.digest`): "" for a strategy in teefl itself, which teefl's version (inside
    every workload digest) already names. The aggregator binds it into its evidence so that a
    collaborator can tell which aggregation code it would send its update to."""
    from teefl.workload.digest import digest_target

    target = STRATEGIES.target(ref, where=PLAN_KEY)
    if target.module == "teefl" or target.module.startswith("teefl."):
        return ""
    return digest_target(target)


def check_plan_strategy(spec: Any) -> None:
    """Resolve and build the plan's strategy once, before any party starts, so that an unknown
    name or a bad option stops the run with one line instead of in the aggregator's log.

    The default (``fedavg`` without options) needs no check, and importing the registry
    imports torch: a plain FedAvg plan starts without that cost."""
    if spec.name == "fedavg" and not spec.options:
        return
    plan_strategy(spec)
