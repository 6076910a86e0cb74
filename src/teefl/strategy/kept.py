"""An accumulator that keeps every update of the round: the base of the robust strategies.

Why they keep them: a median, a trimmed mean or Krum's distances need all n values of a
coordinate at once, so memory is n model copies (in the model's dtype) instead of FedAvg's one
float64 sum. The updates are kept as flat pieces (`pieces.Pieces`), copied out of the receive
buffer once; the result is computed piece by piece in stretches of `pieces.CHUNK` / n coordinates,
so the temporaries (a float64 stack of n values per coordinate, its sort) stay at ~30 MiB.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from teefl.errors import TeeflError
from teefl.strategy.base import Update
from teefl.strategy.pieces import Pieces, chunks
from teefl.wire import codec
from teefl.wire.checks import UpdateRejected


class KeptUpdates:
    """Keeps each added update; subclasses say how a stretch of n values becomes one
    (`combine`). Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) take
    the largest value, as FedAvg does."""

    def __init__(
        self, reference: Mapping[str, torch.Tensor], layout: codec.Layout | None = None
    ) -> None:
        self.reference = reference
        self.pieces = Pieces(reference, layout)
        self.layout = self.pieces.layout
        self.updates: list[list[torch.Tensor]] = []
        self.samples: list[int] = []
        self.total_samples = 0
        self.count = 0

    def add(self, update: Update, num_samples: int, *, checked: bool = False) -> None:
        if num_samples <= 0:
            raise UpdateRejected(f"sample count must be positive, got {num_samples}")
        kept = self.pieces.owned(update, checked=checked)
        self.keep(kept)
        self.updates.append(kept)
        self.samples.append(num_samples)
        self.total_samples += num_samples
        self.count += 1

    def keep(self, kept: list[torch.Tensor]) -> None:
        """Hook: called with each new update's pieces before it joins ``updates``."""

    def result(self) -> dict[str, torch.Tensor]:
        out = {n: torch.empty(ref.shape, dtype=ref.dtype) for n, ref in self.reference.items()}
        self.result_into(out)
        return out

    def result_into(self, out: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> None:
        if self.count == 0:
            raise TeeflError("no update was accepted in this round")
        chosen = self.select()
        dst = self.pieces.targets(out)
        for i, target in enumerate(dst):
            for lo, hi in chunks(self.pieces.sizes[i], per=len(chosen)):
                stack = torch.stack([self.updates[j][i][lo:hi] for j in chosen])
                if stack.is_floating_point():
                    target[lo:hi].copy_(self.combine(stack))
                else:
                    target[lo:hi].copy_(stack.max(dim=0).values)
        self.pieces.finish(out, dst)

    def select(self) -> list[int]:
        """The updates the result is made of (all of them, unless overridden)."""
        return list(range(self.count))

    def combine(self, stack: torch.Tensor) -> torch.Tensor:
        """One value per column of ``stack`` (n updates x a stretch of float elements), in
        float64; rounded to the model's dtype by the caller."""
        raise NotImplementedError
