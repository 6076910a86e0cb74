"""The strategy protocol: what the aggregator asks of an aggregation rule, and nothing more.

A strategy lives for the whole run and holds what must outlive a round (a server optimiser's
moments); an `Accumulator` lives for one round and takes that round's updates one at a time.
Per round the server calls:

1. ``configure(rnd)`` -> a `RoundConfig` sent to every collaborator with the round (FedProx's
   ``proximal_mu``, a client learning rate), so a new algorithm needs no proto change;
2. ``begin(rnd, reference, layout)`` -> the round's accumulator; ``reference`` is the global
   model the round starts from (updates are checked against it; FedOpt steps from it);
3. ``acc.add(update, samples)`` once per accepted update, as it comes in: a streaming strategy's
   memory is flat in the number of collaborators;
4. ``acc.result_into(out)`` once, writing the new global model into ``out``;
5. ``state()`` saved with the round's checkpoint, ``restore()`` after a restart, so a server
   optimiser resumes exactly where the checkpoint left it.

The fast path: an accumulator whose ``layout`` is not None also takes a
`teefl.wire.checks.FlatUpdate` of that layout (the payload's dtype runs as a few flat
tensors, no decode) and writes its result into the run views of a payload of that layout
(`codec.Layout.run_views`). The server asks ``acc.layout`` -- it never needs to know which
strategy it runs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from teefl.errors import TeeflError
from teefl.strategy.state import StrategyState
from teefl.wire import codec, roundconfig
from teefl.wire.checks import FlatUpdate

#: one value of a round's configuration: what a protobuf map of scalars can carry
ConfigValue = float | int | str | bool
#: the per-round configuration a strategy sends to collaborators with the round
RoundConfig = dict[str, ConfigValue]

#: well-known `RoundConfig` keys (defined with the round config's wire form)
LR, PROXIMAL_MU = roundconfig.LR, roundconfig.PROXIMAL_MU

#: an update as the server hands it over: a state dict, or the payload seen as flat runs
Update = Mapping[str, torch.Tensor] | FlatUpdate


class Accumulator(Protocol):
    """One round's aggregation; `teefl.strategy.running.RunningFedAvg` is one."""

    #: not None: `add` also takes a `FlatUpdate` of this layout, and `result_into` also
    #: writes into ``layout.run_views(payload)``
    layout: codec.Layout | None
    #: updates added so far
    count: int

    def add(self, update: Update, num_samples: int, *, checked: bool = False) -> None:
        """Check, then take one update; a rejected one (`checks.UpdateRejected`) changes
        nothing. ``checked``: the caller has just run `checks.check_update` on this update."""
        ...

    def result_into(self, out: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> None:
        """Write the new global model into ``out``: tensors shaped like the reference, or
        the runs of a payload of ``layout``. Called once per round."""
        ...

    def result(self) -> dict[str, torch.Tensor]:
        """The new global model as fresh tensors (the slow path; tests)."""
        ...


class StrategyOptions(BaseModel):
    """A strategy's options: validated, unknown keys refused (a typo must not fall back to a
    default), immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)


OptionsT = TypeVar("OptionsT", bound=StrategyOptions)


class Strategy(ABC):
    """An aggregation rule (see the module docstring for the protocol).

    Subclasses set ``Options`` (a `StrategyOptions` model) and implement `begin`; a stateful
    one overrides `state` and `restore`. ``name``: the name the state is saved under (set by
    ``register_strategy``; else ``module:qualname``). ``keeps_updates``: whether the round's
    accumulator keeps every update (memory O(n) models instead of O(1)). ``paged``: set by the
    server under ``federation.memory: flat``, where flat updates live in their files and may be
    summed when the round closes instead of as they come (FedAvg does, `strategy.windowed`).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    keeps_updates: ClassVar[bool] = False
    paged: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def __registered__(cls, name: str) -> None:
        """Called by the registry: the state is saved under the first registered name (a
        second name, an alias, must not change where existing states say they belong)."""
        if cls.name == f"{cls.__module__}:{cls.__qualname__}":
            cls.name = name

    def __init__(self, options: StrategyOptions | Mapping[str, Any] | None = None) -> None:
        self.options = self.validate_options(options)

    @classmethod
    def validate_options(
        cls, options: StrategyOptions | Mapping[str, Any] | None, where: str = "options"
    ) -> Any:
        """``options`` as this strategy's `Options`; every problem in one `TeeflError` line
        with the key's path (``where`` + the key, e.g. ``federation.strategy.options.tau``)."""
        if isinstance(options, cls.Options):
            return options
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TeeflError(
                f"strategy {cls.name!r}: {where} must be a mapping of keys, got "
                f"{type(options).__name__}"
            )
        try:
            return cls.Options.model_validate(dict(options))
        except ValidationError as err:
            raise TeeflError(f"strategy {cls.name!r}: " + _format(err, where)) from None

    def configure(self, rnd: int) -> RoundConfig:
        """What collaborators receive with round ``rnd`` (nothing, unless overridden)."""
        return {}

    @abstractmethod
    def begin(
        self,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
    ) -> Accumulator:
        """The accumulator of round ``rnd``, which starts from the global model ``reference``.

        ``layout``: the global model's payload layout (`codec.Layout.of_state(reference)`, which
        the server has at hand); the accumulator then takes flat updates (see the module
        docstring). Ignored where it is not the reference's layout. Beginning a round ends the
        previous round's accumulator: its memory may be reused.
        """

    def state(self) -> StrategyState:
        """What must survive a restart, taken after the round's `result_into` and saved with
        that round's checkpoint (empty for a stateless strategy)."""
        return StrategyState(self.name)

    def restore(self, state: StrategyState) -> None:
        """Continue from ``state`` (saved by `state` of a strategy of the same name)."""
        self._check_name(state)
        if state.meta or state.tensors:
            raise TeeflError(
                f"strategy {self.name!r} keeps no state, but the saved state carries "
                f"{sorted(state.meta)[:3] + sorted(state.tensors)[:3]}"
            )

    def _check_name(self, state: StrategyState) -> None:
        if state.strategy != self.name:
            raise TeeflError(
                f"saved strategy state belongs to {state.strategy!r}, not {self.name!r}: the run "
                "was checkpointed with another strategy"
            )


def check_round_config(config: Mapping[str, Any], strategy: str = "?") -> RoundConfig:
    """``config`` if every key is a non-empty string and every value a finite scalar (what the
    wire carries); else one `TeeflError` line naming the key."""
    out: RoundConfig = {}
    for key, value in config.items():
        if not isinstance(key, str) or not key:
            raise TeeflError(f"strategy {strategy!r}: round config key {key!r} is not a name")
        if not isinstance(value, bool | int | float | str):
            raise TeeflError(
                f"strategy {strategy!r}: round config {key!r} is a {type(value).__name__}; "
                "only bool, int, float and str travel"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise TeeflError(f"strategy {strategy!r}: round config {key!r} is {value}")
        out[key] = value
    return out


def _format(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join([where, *(str(p) for p in e["loc"])])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)
