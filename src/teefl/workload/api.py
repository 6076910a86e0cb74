"""The Workload API: what a user writes so teefl trains THEIR model on THEIR data with THEIR code.

A workload is a plain class -- no base class, checked structurally -- with:

- ``Options`` (optional): a pydantic v2 model; the plan's ``workload.options`` are validated
  against it (unknown keys and bad values stop the run with the key's path) and the instance
  is created as ``Workload(options)``. Without ``Options`` it is created as ``Workload()`` and
  the plan may give no options.
- ``build_model(seed) -> torch.nn.Module``: the initial model, a pure function of ``seed``. Also
  called on the aggregator, which has no data: the model's shape may depend on the options,
  never on a party's files.
- ``load(party) -> data``: this party's data, any object the workload likes (see `Party` for the
  two data modes).
- ``train(model, data, round_info) -> metrics``: train ``model`` in place for one round.
- ``evaluate(model, data) -> metrics``: score ``model`` on the party's held-out data.
- ``trainable_state(model) -> list[str]`` (optional): the names of the state-dict entries that
  travel (to the aggregator and back). Absent or None: the whole state dict. An adapters-only
  workload (LoRA) returns its adapter tensors' names; the frozen base never leaves the party,
  and the aggregator checks each update against the global layout of exactly these names
  (`select_state`, `check_layout`).
- ``describe(data) -> dict`` (optional): a JSON-able summary of the loaded data for the run's
  environment record (sizes, sources); never the data itself.

Metrics are a mapping of names to numbers and must include ``samples`` (an int >= 0): the
weight of the party's update in FedAvg and the count the aggregator reports (`check_metrics`).

This module imports no torch: a plan can be checked, and a digest computed, without it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from teefl.errors import TeeflError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: the methods every workload has (checked when a reference is resolved)
REQUIRED_METHODS: tuple[str, ...] = ("build_model", "load", "train", "evaluate")

DataMode = Literal["auto", "local", "shard"]


class WorkloadOptions(BaseModel):
    """A convenient base for a workload's ``Options``: unknown keys are errors, as in the plan.

    Not required -- any pydantic model works; teefl refuses unknown top-level keys either way.
    """

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Party:
    """Who is loading data, and from where.

    ``index`` is the party's 0-based position among the plan's ``count`` collaborators and
    ``seed`` the plan's seed. ``device`` is a torch device string (``"cpu"``, ``"cuda:0"``).

    Two data modes (`local` says which one applies):

    - **local** (a real federation): ``data_dir`` is this party's own data; the workload loads
      all of it and nothing else (no fallback to a shared location).
    - **shard** (simulation, ``teefl run`` / ``teefl bench`` on one host): every party reads the
      same dataset -- found in ``data_dir`` when given, else wherever the workload looks by
      default -- and keeps shard ``index`` of ``count``, split identically on every party from
      ``seed``.

    ``data_mode="auto"`` (the default) means local when ``data_dir`` is set, else shard. The
    caller passes ``"shard"`` explicitly where ``data_dir`` only says where a shared dataset is
    (today's ``teefl run --data-dir``).
    """

    name: str
    index: int
    count: int
    seed: int = 0
    data_dir: Path | None = None
    device: str = "cpu"
    data_mode: DataMode = "auto"

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"party index {self.index} out of range for {self.count} parties")
        if self.data_mode not in ("auto", "local", "shard"):
            raise ValueError(f"data_mode must be auto, local or shard, not {self.data_mode!r}")
        if self.data_mode == "local" and self.data_dir is None:
            raise ValueError(f"party {self.name}: local data mode needs a data_dir")
        if self.data_dir is not None and not isinstance(self.data_dir, Path):
            object.__setattr__(self, "data_dir", Path(self.data_dir))

    @property
    def local(self) -> bool:
        """True: load ``data_dir`` as this party's own data; False: take a shard of a shared set."""
        if self.data_mode == "auto":
            return self.data_dir is not None
        return self.data_mode == "local"


def round_seed(seed: int, index: int, round: int) -> int:
    """The seed of party ``index``'s training in ``round``: distinct per party and round, the
    same on a rerun. (The formula of teefl's collaborator since its first release: the built-in
    workloads' figures depend on it.)"""
    return seed * 1_000_003 + index * 1009 + round


@dataclass(frozen=True)
class RoundInfo:
    """What a workload's ``train`` learns about the round.

    ``config`` is the strategy's per-round configuration (e.g. FedProx's ``mu``; empty for
    FedAvg), read-only. ``global_state`` is the global model's travelling tensors as received,
    before training changed anything -- for proximal terms; None where the strategy asks for
    none (a copy of the model costs its size in memory).
    """

    round: int
    seed: int
    config: Mapping[str, Any] = field(default_factory=dict)
    global_state: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))


@runtime_checkable
class Workload(Protocol):
    """The structural type of a workload (see the module docstring); exported as teefl.Workload."""

    def build_model(self, seed: int) -> nn.Module: ...

    def load(self, party: Party) -> Any: ...

    def train(self, model: nn.Module, data: Any, round_info: RoundInfo) -> Mapping[str, Any]: ...

    def evaluate(self, model: nn.Module, data: Any) -> Mapping[str, Any]: ...


def workload_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a workload class (a short clause), or None when it is one."""
    if not isinstance(obj, type):
        if all(hasattr(obj, m) for m in REQUIRED_METHODS):
            return "it is an instance; reference its class"
        return "it is no class"
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        return f"it lacks {', '.join(missing)}"
    options = getattr(obj, "Options", None)
    if options is not None and not (isinstance(options, type) and issubclass(options, BaseModel)):
        return "its Options is not a pydantic model (subclass pydantic.BaseModel)"
    return None


# -- metrics -----------------------------------------------------------------------------------
def check_metrics(metrics: Any, what: str) -> dict[str, float | int]:
    """``metrics`` as a plain dict: ``samples`` an int >= 0, every other value a real number
    (a 0-d tensor or numpy scalar is converted). ``what`` names the call (``"train"``) in the
    error."""
    if not isinstance(metrics, Mapping):
        raise TeeflError(
            f"{what} returned {type(metrics).__name__}, not a mapping of metrics "
            "(e.g. {'loss': 0.3, 'samples': 120})"
        )
    if "samples" not in metrics:
        raise TeeflError(
            f"{what} returned metrics without 'samples' (got keys: "
            f"{', '.join(map(str, metrics)) or 'none'}); 'samples' is the number of examples "
            "used, the weight of this party's update"
        )
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TeeflError(f"{what} returned a metric named {key!r}; names are strings")
        if hasattr(value, "item") and callable(value.item):
            try:
                value = value.item()  # 0-d tensor / numpy scalar
            except (ValueError, RuntimeError):
                raise TeeflError(f"{what} returned metric {key!r} that is not a scalar") from None
        if key == "samples":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise TeeflError(f"{what} returned samples={value!r}; it must be an int >= 0")
            out[key] = int(value)
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TeeflError(f"{what} returned metric {key!r} = {value!r}; metrics must be numbers")
        else:
            out[key] = float(value)
    return out


# -- which tensors travel ----------------------------------------------------------------------
def travelling_names(workload: Any, model: nn.Module) -> list[str]:
    """The state-dict names that travel for ``model``: the workload's ``trainable_state`` when
    it has one (checked: non-empty, no duplicates, every name in the state dict), else all of
    them, in state-dict order either way."""
    state = model.state_dict()
    chooser = getattr(workload, "trainable_state", None)
    chosen = chooser(model) if callable(chooser) else None
    if chosen is None:
        return list(state)
    names = list(chosen)
    if not names:
        raise TeeflError("trainable_state returned no names: at least one tensor must travel")
    bad = [n for n in names if not isinstance(n, str) or n not in state]
    if bad:
        raise TeeflError(
            f"trainable_state names {len(bad)} tensors the model's state dict lacks: "
            f"{', '.join(map(repr, bad[:5]))}{' ...' if len(bad) > 5 else ''}"
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TeeflError(f"trainable_state names {', '.join(dup[:5])} more than once")
    wanted = set(names)
    return [n for n in state if n in wanted]


def select_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The travelling part of ``model``'s state dict (tensors share the model's memory)."""
    state = model.state_dict()
    return {n: state[n] for n in names}


def layout_of(state: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a state (tensors, or anything with ``dtype`` and ``shape``)."""
    return {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in state.items()}


def check_layout(
    received: Mapping[str, Any], expected: Mapping[str, Any], who: str = "update"
) -> None:
    """Refuse a received state whose names, dtypes or shapes differ from the global layout.

    Both sides are name -> tensor (or -> (dtype, shape) as `layout_of` gives). The aggregator
    calls this with the global travelling state as ``expected``: an update must carry exactly
    those tensors -- a subset would leave the missing ones out of the average, a superset would
    smuggle tensors (a frozen base) the federation did not agree to move. The error names up to
    five problems.
    """

    def norm(m: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
        if all(isinstance(v, tuple) and len(v) == 2 for v in m.values()):
            return {n: (str(v[0]).removeprefix("torch."), tuple(v[1])) for n, v in m.items()}
        return layout_of(m)

    got, want = norm(received), norm(expected)
    problems = [f"lacks {n}" for n in want if n not in got]
    problems += [f"has unexpected {n}" for n in got if n not in want]
    for n, (dtype, shape) in want.items():
        if n in got and got[n] != (dtype, shape):
            g_dtype, g_shape = got[n]
            if g_dtype != dtype:
                problems.append(f"{n} is {g_dtype}, not {dtype}")
            else:
                problems.append(f"{n} has shape {list(g_shape)}, not {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise TeeflError(
            f"{who} does not match the global layout ({len(want)} tensors): "
            f"{'; '.join(problems[:5])}{more}"
        )


def load_travelling(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a received travelling state into ``model``; tensors it does not name (a frozen
    base) keep their values. Every name must be one of the model's (else nothing is changed)."""
    own = model.state_dict()
    unknown = [n for n in state if n not in own]
    if unknown:
        raise TeeflError(
            f"received tensors the model lacks: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}"
        )
    check_layout(state, {n: own[n] for n in state}, "received state")
    import torch

    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t)
