"""``noop``: a workload that trains nothing -- the received model goes back unchanged.

Why: the transfer benchmarks (comm_limit, scale, vs_flower) measure teefl's real round loop with
the training taken out, so the figures are communication alone. As a registered workload the
benchmarks choose it in the plan instead of subclassing the collaborator and patching its
module. The payload is any of the vision models, or a stack of square linear layers of a chosen
size (the benchmarks' synthetic payloads: ``linear_stack`` 12 x 2048 = 201 MB in 24 tensors,
1 x 1240 = 6.2 MB in 2), or a small MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from teefl.workload.api import Party, RoundInfo


class NoOpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: a vision model (``small_cnn``, ``resnet18``, ``mobilenet_v3_small``), ``linear_stack``
    #: (``layers`` x Linear(width, width)) or ``mlp`` (Flatten, Linear(inputs, hidden), ReLU,
    #: Linear(hidden, classes))
    model: Literal["small_cnn", "resnet18", "mobilenet_v3_small", "linear_stack", "mlp"] = (
        "small_cnn"
    )
    channels: int = Field(3, ge=1)
    classes: int = Field(10, ge=2)
    layers: int = Field(1, ge=1)
    width: int = Field(1240, ge=1)
    inputs: int = Field(3 * 32 * 32, ge=1)
    hidden: int = Field(16, ge=1)
    #: the sample count each party reports (the weight of its update in FedAvg)
    samples: int = Field(16, ge=1)


@dataclass(frozen=True)
class NoOpData:
    samples: int


class NoOp:
    """Returns the model unchanged; ``evaluate`` reports the sample count only."""

    Options = NoOpOptions

    def __init__(self, options: NoOpOptions) -> None:
        self.options = options

    def build_model(self, seed: int) -> nn.Module:
        o = self.options
        if o.model in ("small_cnn", "resnet18", "mobilenet_v3_small"):
            from teefl.workload.models import build_model

            return build_model(o.model, o.channels, o.classes, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if o.model == "linear_stack":
                return nn.Sequential(*[nn.Linear(o.width, o.width) for _ in range(o.layers)])
            head = [nn.Linear(o.inputs, o.hidden), nn.ReLU(), nn.Linear(o.hidden, o.classes)]
            return nn.Sequential(nn.Flatten(), *head)

    def load(self, party: Party) -> NoOpData:
        return NoOpData(self.options.samples)

    def train(self, model: nn.Module, data: NoOpData, info: RoundInfo) -> dict[str, Any]:
        return {"samples": data.samples}

    def evaluate(self, model: nn.Module, data: NoOpData) -> dict[str, Any]:
        return {"samples": data.samples}
