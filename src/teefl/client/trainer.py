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

from teefl.faults import fault
from teefl.plan import Plan
from teefl.wire import roundconfig
from teefl.workload.datasets import load_dataset
from teefl.workload.models import build_model
from teefl.workload.partition import collaborator_data
from teefl.workload.train import configure_threads, evaluate, resolve_device, train_local
from teefl.workload.vision import dataset_record

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
        """Score the final model on the party's held-out data: ``accuracy`` and ``samples``
        (an int) at least."""
        ...

    def describe(self) -> dict[str, Any] | None:
        """The run's environment record of this party (device, threads, data sizes); None
        writes none."""
        ...


class LocalTrainer:
    """The built-in workload: the plan's dataset and model, this party's shard of the data,
    `teefl.workload.train`'s loops, validated before and after training (the OpenFL order)."""

    def __init__(self, plan: Plan, index: int, data_dir: Path | None = None) -> None:
        self.plan, self.index, self.data_dir = plan, index, data_dir
        self.samples = 0

    def setup(self) -> torch.nn.Module:
        plan = self.plan
        self.threads = configure_threads(plan.training.threads)
        self.device = resolve_device(plan.training.device)
        data = load_dataset(plan.dataset, self.data_dir, seed=plan.seed)
        self.dataset = data
        self.x_train, self.y_train, self.x_test, self.y_test = collaborator_data(
            data, self.index, len(plan.collaborators), plan.partition, plan.dataset, plan.seed
        )
        self.samples = len(self.y_train)
        return build_model(plan.model.name, data.channels, data.classes).to(self.device)

    def train_round(
        self, model: torch.nn.Module, r: int, config: Mapping[str, Any], span: Span
    ) -> dict[str, float]:
        """Validate the global model, train (with the round config's learning rate and FedProx
        mu, checked: the aggregator is a remote party), validate the local model."""
        plan = self.plan
        lr, mu = roundconfig.training_overrides(config)
        with span("validate_global", round=r) as s:
            vg = self.evaluate(model)
            s["metrics"], s["samples"] = vg, vg["samples"]
        fault("train", r)
        with span("train", round=r) as s:
            seed = plan.seed * 1_000_003 + self.index * 1009 + r
            tr = train_local(
                model,
                self.x_train,
                self.y_train,
                plan.training,
                self.device,
                seed,
                lr=lr,
                proximal_mu=mu,
            )
            s["metrics"], s["samples"] = tr, tr["samples"]
        with span("validate_local", round=r) as s:
            vl = self.evaluate(model)
            s["metrics"], s["samples"] = vl, vl["samples"]
        log.info(
            "%s: round %d global acc %.4f -> local acc %.4f",
            plan.collaborators[self.index],
            r,
            vg["accuracy"],
            vl["accuracy"],
        )
        return {**flat("validate_global", vg), **flat("train", tr), **flat("validate_local", vl)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        bs = self.plan.training.batch_size
        return evaluate(model, self.x_test, self.y_test, bs, self.device)

    def describe(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "device": str(self.device),
            "threads": self.threads,
            "dataset": dataset_record(d, len(self.y_train), len(self.y_test)),
        }
