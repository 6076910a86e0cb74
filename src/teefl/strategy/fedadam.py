"""FedAdam: FedOpt with Adam's second moment, v = beta_2 * v + (1 - beta_2) * delta^2."""

from __future__ import annotations

import torch

from teefl.strategy.fedopt import FedOpt, FedOptBeta2Options
from teefl.strategy.registry import register_strategy


@register_strategy("fedadam")
class FedAdam(FedOpt):
    """Options: eta, eta_l, beta_1, beta_2, tau, mean_only (see fedopt.FedOptOptions)."""

    Options = FedOptBeta2Options
    options: FedOptBeta2Options

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        b2 = self.options.beta_2
        v.mul_(b2).addcmul_(delta, delta, value=1 - b2)
