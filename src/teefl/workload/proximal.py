"""FedProx's proximal term ``mu/2 * ||w - w_global||^2`` as a training loop adds it to its loss.

Why in the workload and not in the strategy: it runs in the collaborator's training loop; the
strategy (`teefl.strategy.fedprox`) only sends ``proximal_mu`` with the round's config.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
