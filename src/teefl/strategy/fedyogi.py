"""FedYogi: FedOpt with Yogi's second moment,
v = v - (1 - beta_2) * delta^2 * sign(v - delta^2): v grows towards delta^2 as Adam's would,
but shrinks only additively, so a few small deltas do not blow the step up (Zaheer et al.)."""

from __future__ import annotations

import torch

from teefl.strategy.fedopt import FedOpt, FedOptBeta2Options
from teefl.strategy.registry import register_strategy


@register_strategy("fedyogi")
class FedYogi(FedOpt):
    """Options: eta, eta_l, beta_1, beta_2, tau, mean_only (see fedopt.FedOptOptions)."""

    Options = FedOptBeta2Options
    options: FedOptBeta2Options

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        d2 = delta.square()
        v.addcmul_(d2, torch.sign(v - d2), value=-(1 - self.options.beta_2))
