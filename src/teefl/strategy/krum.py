"""Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017).

Each update's score is the sum of its squared L2 distances (over every float element) to its
``n - f - 2`` nearest other updates; Krum returns the update with the lowest score, Multi-Krum
the plain (unweighted: a Byzantine party could claim any sample count) mean of the ``m``
lowest-scoring ones. With ``f`` Byzantine updates among ``n >= 2f + 3``, the chosen ones lie
close to a majority of honest updates. Integer tensors (counters) take the largest value among
the chosen updates, so Krum's result is exactly the chosen update.

Memory -- unlike FedAvg's, not flat in the number of collaborators: the round keeps all n
updates (n model copies, in the model's dtype) plus the n x n distances, and each add costs
O(n) model-sized distance computations (O(n^2) over the round), done as the update comes in so
the round's close only sorts scores. Ties go to the update added first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from teefl.errors import TeeflError
from teefl.strategy.base import Strategy, StrategyOptions
from teefl.strategy.kept import KeptUpdates
from teefl.strategy.pieces import chunks
from teefl.strategy.registry import register_strategy
from teefl.wire import codec


class KrumOptions(StrategyOptions):
    #: the number of Byzantine (arbitrarily wrong) updates to tolerate per round
    f: int = Field(0, ge=0)


class MultiKrumOptions(KrumOptions):
    #: how many of the best-scored updates are averaged; None: n - f
    m: int | None = Field(None, ge=1)


class KrumAccumulator(KeptUpdates):
    """Keeps the updates and their pairwise squared distances (float64, computed in `keep`)."""

    def __init__(
        self,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None,
        f: int,
        m: int | None,
    ) -> None:
        super().__init__(reference, layout)
        self.f, self.m = f, m
        self.dist: list[list[float]] = []

    def keep(self, kept: list[torch.Tensor]) -> None:
        row = [self._distance(kept, other) for other in self.updates]
        for r, d in zip(self.dist, row, strict=True):
            r.append(d)
        self.dist.append([*row, 0.0])

    def _distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        total = 0.0
        for x, y in zip(a, b, strict=True):
            if not x.is_floating_point():
                continue
            for lo, hi in chunks(x.numel()):
                total += float((x[lo:hi].double() - y[lo:hi].double()).square().sum())
        return total

    def scores(self) -> list[float]:
        """Each update's Krum score: the sum of its n - f - 2 smallest distances to others."""
        n, k = self.count, self.count - self.f - 2
        return [sum(sorted(self.dist[i][j] for j in range(n) if j != i)[:k]) for i in range(n)]

    def select(self) -> list[int]:
        n = self.count
        if n < 2 * self.f + 3:
            raise TeeflError(
                f"krum: {n} update(s) this round; tolerating f={self.f} Byzantine update(s) "
                f"takes at least 2f+3 = {2 * self.f + 3}"
            )
        want = n - self.f if self.m is None else min(self.m, n - self.f)
        scores = self.scores()
        return sorted(range(n), key=lambda i: (scores[i], i))[:want]

    def combine(self, stack: torch.Tensor) -> torch.Tensor:
        return stack.double().mean(dim=0)


@register_strategy("krum")
class Krum(Strategy):
    """The single best-scored update; option ``f`` (Byzantine updates tolerated, default 0)."""

    Options = KrumOptions
    keeps_updates = True
    options: KrumOptions

    def begin(
        self,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
    ) -> KrumAccumulator:
        return KrumAccumulator(reference, layout, self.options.f, 1)


@register_strategy("multi_krum")
class MultiKrum(Strategy):
    """The mean of the ``m`` best-scored updates (at most n - f; default n - f); option ``f``."""

    Options = MultiKrumOptions
    keeps_updates = True
    options: MultiKrumOptions

    def begin(
        self,
        rnd: int,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
    ) -> KrumAccumulator:
        return KrumAccumulator(reference, layout, self.options.f, self.options.m)
