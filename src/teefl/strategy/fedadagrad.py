"""FedAdagrad: FedOpt with Adagrad's second moment, v = v + delta^2 (no decay: the step of a
coordinate shrinks as its squared deltas add up)."""

from __future__ import annotations

import torch
from pydantic import Field

from teefl.strategy.fedopt import FedOpt, FedOptOptions
from teefl.strategy.registry import register_strategy


class FedAdagradOptions(FedOptOptions):
    #: first-moment decay; 0 (the default) steps along this round's delta alone
    beta_1: float = Field(0.0, ge=0, lt=1)


@register_strategy("fedadagrad")
class FedAdagrad(FedOpt):
    """Options: eta, eta_l, beta_1 (default 0), tau, mean_only (see fedopt.FedOptOptions)."""

    Options = FedAdagradOptions
    options: FedAdagradOptions

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        v.addcmul_(delta, delta)
