"""The training seam: what the collaborator's loop asks of local training, and the default.

Why a seam: the loop (download, train, upload) is the same whatever trains the model; the
benchmarks measure that loop with training replaced by nothing, and the workload API (issue 16)
plugs user code in here. A trainer is any object with the methods of `Trainer`; the loop never
looks inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from teefl.errors import TeeflError
from teefl.faults import fault
from teefl.plan import Plan
from teefl.wire import roundconfig
from teefl.workload.train import configure_threads, resolve_device

log = logging.getLogger("teefl.collaborator")

#: ``span(phase, round=r)``: a timed span of the run's events (`EventRecorder.span`); the dict
#: it yields takes the span's fields (``metrics``, ``samples``)
Span = Callable[..., AbstractContextManager[dict[str, Any]]]


def flat(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics`` as the update header's flat ``prefix.name`` numbers (``samples`` left out)."""
    return {f"{prefix}.{k}": float(v) for k, v in metrics.items() if k != "samples"}


class Trainer(Protocol):
    """Local training as the collaborator's loop sees it."""

    #: the number of training examples: the weight of this party's updates
    samples: int

    def setup(self) -> torch.nn.Module:
        """Load the data and build the model (once, before the collaborator connects). The
        model's tensors may be moved into its wire payload afterwards (`ResidentModel`):
        training must update them in place."""
        ...

    def train_round(
        self, model: torch.nn.Module, r: int, config: Mapping[str, Any], span: Span
    ) -> dict[str, float]:
        """Train ``model`` in place for round ``r``; returns the update's metrics (flat names
        to numbers). ``config``: the strategy's round config as received (`roundconfig`;
        empty: train as the plan says). ``span`` times the steps worth seeing in the events."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Score the final model on the party's held-out data: ``samples`` (an int) at least,
        ``accuracy`` where it has one."""
        ...

    def describe(self) -> dict[str, Any] | None:
        """The run's environment record of this party (device, threads, data sizes); None
        writes none."""
        ...


class WorkloadTrainer:
    """Any `teefl.workload.api.Workload` behind the Trainer seam (issue 16).

    The loop is LocalTrainer's -- validate the global model, train, validate the local one,
    each a span of the run's events -- with the workload's ``load``, ``train`` and ``evaluate``
    in place of the built-in loops. ``train`` gets a `RoundInfo`: the round, the party's round
    seed (`round_seed`, the formula LocalTrainer used), the strategy's round config as
    received (checked first: the aggregator is a remote party), and the global state before
    training when the config carries a proximal weight (a copy costs the model's size).

    ``data_dir``/``data_mode``: see `teefl.workload.api.Party` (``teefl collaborator
    --data-dir`` is the party's own data; ``teefl run`` passes a shared dataset's folder with
    data_mode "shard"). An exception in the workload's code is a `WorkloadFailure` (its
    traceback for this party's log); the collaborator reports the failed round.
    """

    def __init__(
        self,
        plan: Plan,
        index: int,
        workload: Any,
        data_dir: Path | None = None,
        data_mode: str = "auto",
    ) -> None:
        self.plan, self.index, self.workload = plan, index, workload
        self.name = plan.collaborators[index]
        if data_dir is None and plan.workload.data_root is not None and data_mode != "shard":
            data_dir, data_mode = plan.workload.data_root / self.name, "local"
        self.data_dir, self.data_mode = data_dir, data_mode
        self.samples = 0
        self.travelling: list[str] | None = None

    def setup(self) -> torch.nn.Module:
        from teefl.workload.api import Party

        plan = self.plan
        self.threads = configure_threads(plan.training.threads)
        self.device = resolve_device(plan.training.device)
        party = Party(
            self.name,
            self.index,
            len(plan.collaborators),
            plan.seed,
            self.data_dir,
            str(self.device),
            self.data_mode,  # type: ignore[arg-type]
        )
        self.data = self.workload.load(party)
        self.described = self.workload.describe(self.data)
        self.samples = int(self.described.get("shard_train", self.described.get("samples", 0)))
        model = self.workload.build_model(plan.seed)
        names = self.workload.travelling(model)
        #: the state-dict names that travel when the workload chose a subset (its
        #: trainable_state, e.g. LoRA adapters); None: the whole state dict. The rest (a frozen
        #: base) is the same on every party -- build_model(seed) -- and never leaves it.
        self.travelling = names if len(names) != len(model.state_dict()) else None
        return model.to(self.device)

    def train_round(
        self, model: torch.nn.Module, r: int, config: Mapping[str, Any], span: Span
    ) -> dict[str, float]:
        from teefl.workload.api import RoundInfo, round_seed

        plan = self.plan
        _lr, mu = roundconfig.training_overrides(config)  # refused here if out of range
        with span("validate_global", round=r) as s:
            vg = self.workload.evaluate(model, self.data, self.name, r)
            s["metrics"], s["samples"] = vg, vg["samples"]
        fault("train", r)
        global_state = None
        if mu:
            state = model.state_dict()
            names = self.travelling or list(state)
            global_state = {k: state[k].detach().clone() for k in names}
        info = RoundInfo(r, round_seed(plan.seed, self.index, r), dict(config), global_state)
        with span("train", round=r) as s:
            tr = self.workload.train(model, self.data, info, self.name)
            s["metrics"], s["samples"] = tr, tr["samples"]
        self.samples = int(tr["samples"])
        with span("validate_local", round=r) as s:
            vl = self.workload.evaluate(model, self.data, self.name, r)
            s["metrics"], s["samples"] = vl, vl["samples"]
        if "accuracy" in vg and "accuracy" in vl:
            log.info(
                "%s: round %d global acc %.4f -> local acc %.4f",
                self.name,
                r,
                vg["accuracy"],
                vl["accuracy"],
            )
        return {**flat("validate_global", vg), **flat("train", tr), **flat("validate_local", vl)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        return self.workload.evaluate(model, self.data, self.name)

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "threads": self.threads,
            "workload": {"name": self.workload.ref, "digest": self.workload.digest},
            # where this party's data came from (a host-local path; "shard": a shared
            # dataset's share, "local": the party's own, "auto": the workload's default)
            "data": {
                "dir": str(self.data_dir) if self.data_dir is not None else None,
                "mode": self.data_mode,
            },
            "dataset": self.described,
        }


class LocalTrainer(WorkloadTrainer):
    """The plan's ``vision`` workload (its model, dataset, partition and training sections) on
    this party's shard of the shared dataset: the collaborator's training before workloads
    existed, kept as a name for callers that hold a plan and an index."""

    def __init__(self, plan: Plan, index: int, data_dir: Path | None = None) -> None:
        from teefl.workload.resolve import plan_workload

        if not plan.workload.is_vision:
            raise TeeflError(f"LocalTrainer trains the vision workload, not {plan.workload.name}")
        super().__init__(plan, index, plan_workload(plan), data_dir, "shard")
