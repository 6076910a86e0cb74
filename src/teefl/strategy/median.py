"""Coordinate-wise median of the round's updates (unweighted).

Why: one malicious collaborator can move a weighted mean arbitrarily far, but not a median
(Yin et al., 2018). Memory: every update of the round is kept (n model copies); sample counts
do not weigh the result. An even count takes the mean of the two middle values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from teefl.strategy.base import Strategy
from teefl.strategy.kept import KeptUpdates
from teefl.strategy.registry import register_strategy
from teefl.wire import codec


class MedianAccumulator(KeptUpdates):
    def combine(self, stack: torch.Tensor) -> torch.Tensor:
        n = stack.shape[0]
        srt = stack.double().sort(dim=0).values
        return (srt[(n - 1) // 2] + srt[n // 2]) / 2


@register_strategy("median")
class Median(Strategy):
    """Coordinate-wise median; no options."""

    keeps_updates = True

    def begin(
        self,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
    ) -> MedianAccumulator:
        return MedianAccumulator(reference, layout)
