"""FedProx: FedAvg on the server, a proximal term in each collaborator's loss.

The term ``mu/2 * ||w - w_global||^2`` (Li et al., 2020) pulls local training towards the
round's global model, which keeps collaborators with very different data (non-IID) from
drifting apart. The server side is FedAvg unchanged (streaming, one float64 sum); mu reaches the
collaborators in the round's config (`base.PROXIMAL_MU`), and `ProximalTerm` is what a training
loop adds to its loss.
"""

from __future__ import annotations

from pydantic import Field

from teefl.strategy.base import PROXIMAL_MU, RoundConfig, StrategyOptions
from teefl.strategy.fedavg import FedAvg
from teefl.strategy.registry import register_strategy
from teefl.workload.proximal import ProximalTerm, proximal_term

__all__ = ["FedProx", "FedProxOptions", "ProximalTerm", "proximal_term"]


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
