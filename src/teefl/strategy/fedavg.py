"""FedAvg: the sample-weighted mean of the round's updates, as a running sum.

Memory: one float64 sum of the model (integer counters keep their dtype), whatever the number
of collaborators; each update is added the moment it is accepted. The accumulator is
`teefl.strategy.running.RunningFedAvg` itself -- the aggregator's zero-copy path (flat updates
summed run by run, the mean written run by run into the next payload) -- so results are
bit-identical to teefl's FedAvg before strategies were objects. Under ``federation.memory:
flat`` no sum is held: the round's updates are summed window by window from their files when it
closes (`teefl.strategy.windowed.WindowedFedAvg`), with the same result bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from teefl.strategy.base import Strategy
from teefl.strategy.registry import register_strategy
from teefl.strategy.running import RunningFedAvg
from teefl.strategy.windowed import WindowedFedAvg
from teefl.wire import codec


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Sample-weighted mean (McMahan et al., 2017); no options."""

    _last: RunningFedAvg | None = None

    def begin(
        self,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
    ) -> RunningFedAvg | WindowedFedAvg:
        if self.paged and layout is not None:  # the updates live in their files: no sum held
            return WindowedFedAvg(reference, layout)
        # the finished round's sums are taken over: their pages are mapped already (fresh sums
        # fault, docs/decisions/006-kept-buffers.md)
        self._last = RunningFedAvg(reference, layout, reuse=self._last)
        return self._last
