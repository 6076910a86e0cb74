"""Coordinate-wise trimmed mean of the round's updates (unweighted).

Per coordinate, the ``int(n * trim_ratio)`` largest and as many smallest values are dropped and
the rest averaged (Yin et al., 2018): robust to that many outliers per side, closer to the mean
than the median. Memory: every update of the round is kept (n model copies).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from teefl.strategy.base import Strategy, StrategyOptions
from teefl.strategy.kept import KeptUpdates
from teefl.strategy.registry import register_strategy
from teefl.wire import codec


class TrimmedMeanOptions(StrategyOptions):
    #: fraction of the values dropped at each end of every coordinate
    trim_ratio: float = Field(0.1, ge=0, lt=0.5)


class TrimmedMeanAccumulator(KeptUpdates):
    def __init__(
        self,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None,
        trim_ratio: float,
    ) -> None:
        super().__init__(reference, layout)
        self.trim_ratio = trim_ratio

    def combine(self, stack: torch.Tensor) -> torch.Tensor:
        n = stack.shape[0]
        k = int(n * self.trim_ratio)
        srt = stack.double().sort(dim=0).values
        return srt[k : n - k].mean(dim=0)


@register_strategy("trimmed_mean")
class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean; option ``trim_ratio`` (default 0.1)."""

    Options = TrimmedMeanOptions
    keeps_updates = True
    options: TrimmedMeanOptions

    def begin(
        self,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
    ) -> TrimmedMeanAccumulator:
        return TrimmedMeanAccumulator(reference, layout, self.options.trim_ratio)
