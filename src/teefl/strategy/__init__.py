"""Aggregation strategies as objects: a small protocol (`base`), teefl's own strategies (one
module each), and a registry that also finds strategies of other packages.

See docs/strategies.md. The server's side of the protocol::

    strategy = build_strategy("fedadam", {"eta": 0.01}, where="federation.strategy")
    config = strategy.configure(rnd)               # sent with the round
    acc = strategy.begin(rnd, global_state, layout)
    acc.add(update, samples)                       # per update: a state dict, or a FlatUpdate
                                                   # of acc.layout where that is not None
    acc.result_into(layout.run_views(payload))     # or a dict of tensors
    save(encode_state(strategy.state()))           # with the round's checkpoint
"""

from teefl.strategy.base import (
    LR,
    PROXIMAL_MU,
    Accumulator,
    ConfigValue,
    RoundConfig,
    Strategy,
    StrategyOptions,
    check_round_config,
)
from teefl.strategy.fedadagrad import FedAdagrad
from teefl.strategy.fedadam import FedAdam
from teefl.strategy.fedavg import FedAvg
from teefl.strategy.fedopt import FedOpt
from teefl.strategy.fedprox import FedProx, ProximalTerm, proximal_term
from teefl.strategy.fedyogi import FedYogi
from teefl.strategy.krum import Krum, MultiKrum
from teefl.strategy.median import Median
from teefl.strategy.registry import (
    build_strategy,
    register_strategy,
    resolve_strategy,
    strategy_names,
)
from teefl.strategy.state import StrategyState, decode_state, encode_state
from teefl.strategy.trimmed_mean import TrimmedMean

__all__ = [
    "LR",
    "PROXIMAL_MU",
    "Accumulator",
    "ConfigValue",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "ProximalTerm",
    "RoundConfig",
    "Strategy",
    "StrategyOptions",
    "StrategyState",
    "TrimmedMean",
    "build_strategy",
    "check_round_config",
    "decode_state",
    "encode_state",
    "proximal_term",
    "register_strategy",
    "resolve_strategy",
    "strategy_names",
]
