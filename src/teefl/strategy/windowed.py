"""FedAvg summed window by window when the round closes (``federation.memory: flat``).

Why: a running float64 sum is two model sizes of a float32 model (four of a bfloat16 one) held
for the whole round. Where every update lives in its file (`teefl.store.paged`), nothing needs to
be summed before the round closes: `result_into` walks the model one window at a time, sums that
window of every update in the order they were accepted -- with `running.add_into`, the running
sum's own operation, so the mean is bit-identical to `RunningFedAvg`'s -- writes the window's mean
into the next payload and gives the updates' pages back. The sum takes one window
(`WINDOW_BYTES` of float64), whatever the model's size and the number of updates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from teefl.errors import TeeflError
from teefl.strategy.running import add_into, mean_into, sum_dtype
from teefl.wire import codec
from teefl.wire.checks import WINDOW_BYTES, FlatUpdate, UpdateRejected


class WindowedFedAvg:
    """One round's FedAvg over updates of the global model's layout, summed at the close."""

    def __init__(self, reference: Mapping[str, torch.Tensor], layout: codec.Layout) -> None:
        self.reference, self.layout = reference, layout
        self.updates: list[tuple[FlatUpdate, int]] = []
        self.total_samples = 0
        self.count = 0

    def add(self, update: object, num_samples: int, *, checked: bool = False) -> None:
        """Take one checked update (its views, not its bytes: they stay in its file)."""
        if num_samples <= 0:
            raise UpdateRejected(f"sample count must be positive, got {num_samples}")
        if not isinstance(update, FlatUpdate) or update.layout.head != self.layout.head:
            raise UpdateRejected(
                "update does not have the global model's layout (federation.memory: flat sums "
                "updates of exactly that layout)"
            )
        self.updates.append((update, num_samples))
        self.total_samples += num_samples
        self.count += 1

    def result_into(self, out: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> None:
        """Write the weighted mean into ``out``: the run views of a payload of this layout, or
        tensors shaped like the reference."""
        if self.count == 0:
            raise TeeflError("no update was accepted in this round")
        if not isinstance(out, list):
            payload = self.layout.allocate()
            self.result_into(self.layout.run_views(payload))
            for name, t in self.layout.tensor_views(payload).items():
                out[name].copy_(t)
            return
        window = WINDOW_BYTES // 8  # elements of a float64 sum
        for i, (dtype, _, n) in enumerate(self.layout.runs):
            acc_mem = torch.empty(min(window, n), dtype=sum_dtype(dtype))
            for lo in range(0, n, window):
                hi = min(n, lo + window)
                acc = acc_mem[: hi - lo]
                for update, _ in self.updates:  # this window and the next, from every file
                    update.ahead(i, lo, min(n, hi + window))
                for j, (update, samples) in enumerate(self.updates):
                    add_into(acc, update.runs[i][lo:hi], samples, j == 0)
                    update.done(i, lo, hi)
                mean_into(acc, self.total_samples, out[i][lo:hi])
        self.updates = []  # summed: their maps go

    def result(self) -> dict[str, torch.Tensor]:
        out = {n: torch.empty(r.shape, dtype=r.dtype) for n, r in self.reference.items()}
        self.result_into(out)
        return out
