"""FedProx: FedAvg on the server, a proximal term in each collaborator's loss.

The term ``mu/2 * ||w - w_global||^2`` (Li et al., 2020) pulls local training towards the
round's global model, which keeps collaborators with very different data (non-IID) from
drifting apart. The server side is FedAvg unchanged (streaming, one float64 sum); mu reaches the
collaborators in the round's config (`base.PROXIMAL_MU`), and `ProximalTerm` is what a training
loop adds to its loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field
from torch import nn

from teefl.strategy.base import PROXIMAL_MU, RoundConfig, StrategyOptions
from teefl.strategy.fedavg import FedAvg
from teefl.strategy.registry import register_strategy


class FedProxOptions(StrategyOptions):
    #: weight of the proximal term; 0 makes FedProx plain FedAvg
    mu: float = Field(0.01, ge=0, allow_inf_nan=False)


@register_strategy("fedprox")
class FedProx(FedAvg):
    """FedAvg plus ``proximal_mu`` in every round's config; option ``mu`` (default 0.01)."""

    Options = FedProxOptions
    options: FedProxOptions

    def configure(self, rnd: int) -> RoundConfig:
        return {PROXIMAL_MU: self.options.mu}


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """``mu/2 * sum ||w - w_global||^2`` over paired tensors, differentiable in ``params``
    (its gradient is ``mu * (w - w_global)``)."""
    total: torch.Tensor | None = None
    for w, g in zip(params, global_params, strict=True):
        sq = (w - g).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros(())
    return total * (mu / 2)


class ProximalTerm:
    """The proximal term of one round, for a training loop::

        prox = ProximalTerm(model, config.get("proximal_mu", 0.0))  # before local training
        loss = loss_fn(model(x), y) + prox(model)                     # every step

    Takes a copy of ``model``'s trainable parameters when built (the global model the round
    started from: build it before the first step) -- one model copy, and nothing at all for
    ``mu == 0``, where the term is a constant 0.
    """

    def __init__(self, model: nn.Module, mu: float) -> None:
        if not mu >= 0:
            raise ValueError(f"proximal mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.anchor = [params[n].detach().clone() for n in self.names] if self.mu else []

    def __call__(self, model: nn.Module) -> torch.Tensor:
        if not self.mu:
            return torch.zeros(())
        params = dict(model.named_parameters())
        return proximal_term((params[n] for n in self.names), self.anchor, self.mu)
