"""A round's configuration on the wire (``WaitReply.round_config``) and its check on arrival.

Why typed values (a ``ConfigValue`` oneof) instead of strings: ``lr: 0.01`` must arrive as the
float the strategy returned, and an integer or a flag as such, so that the collaborator trains
with exactly what the server's `strategy.configure` said -- bit for bit, as a restarted
aggregator's replay expects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from teefl.errors import TeeflError
from teefl.wire import teefl_pb2

#: well-known round-config keys that teefl's training loop understands: the client's learning
#: rate for the round, and FedProx's proximal weight mu (`teefl.workload.proximal`)
LR = "lr"
PROXIMAL_MU = "proximal_mu"


def to_proto(config: Mapping[str, Any]) -> dict[str, teefl_pb2.ConfigValue]:
    """``config`` (checked by `strategy.check_round_config`) as the proto map's values."""
    out: dict[str, teefl_pb2.ConfigValue] = {}
    for key, value in config.items():
        if isinstance(value, bool):
            out[key] = teefl_pb2.ConfigValue(flag=value)
        elif isinstance(value, int):
            out[key] = teefl_pb2.ConfigValue(integer=value)
        elif isinstance(value, float):
            out[key] = teefl_pb2.ConfigValue(number=value)
        else:
            out[key] = teefl_pb2.ConfigValue(text=str(value))
    return out


def from_proto(entries: Mapping[str, teefl_pb2.ConfigValue]) -> dict[str, Any]:
    """The received map as plain values; a value with none of the oneof's fields set is left
    out (sent by a newer aggregator with a kind this teefl does not know)."""
    out: dict[str, Any] = {}
    for key, msg in entries.items():
        kind = msg.WhichOneof("value")
        if kind is not None:
            out[key] = getattr(msg, kind)
    return out


def training_overrides(config: Mapping[str, Any]) -> tuple[float | None, float]:
    """(learning rate or None, proximal mu) from a received round config, checked: the
    aggregator is a remote party, and a NaN or negative value must not reach the optimiser.
    Other keys are ignored (a strategy may send what only its own workload reads)."""
    lr, mu = config.get(LR), config.get(PROXIMAL_MU, 0.0)
    if lr is not None and not (_number(lr) and lr > 0):
        raise TeeflError(f"the aggregator's round config sets {LR}={lr!r}: not a positive number")
    if not (_number(mu) and mu >= 0):
        raise TeeflError(
            f"the aggregator's round config sets {PROXIMAL_MU}={mu!r}: not a number >= 0"
        )
    return (None if lr is None else float(lr)), float(mu)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
