"""FedAvg summed window by window when the round closes (``federation.memory: flat``).

Why: a running float64 sum is two model sizes of a float32 model (four of a bfloat16 one) held
for the whole round. Where every update lives in its file (`teefl.store.paged`), nothing needs to
be summed before the round closes: `result_into` walks the model one window at a time, sums that
window of every update in the order they were accepted -- with `running.add_into`, the running
sum's own operation, so the mean is bit-identical to `RunningFedAvg`'s -- writes the window's mean
into the next payload and gives the updates' pages back. The sum takes `SUM_ELEMENTS` float64
elements, whatever the model's size and the number of updates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from teefl.errors import TeeflError
from teefl.strategy.running import add_into, mean_into, sum_dtype
from teefl.wire import codec
from teefl.wire.checks import WINDOW_BYTES, FlatUpdate, UpdateRejected

#: elements summed at a time: a float64 sum of 8 MiB stays in the CPU's caches through every
#: update's add and the mean; a window's worth (64 MiB) went to memory and back at each step, ~7x
#: slower here (docs/decisions/009-flat-memory.md)
SUM_ELEMENTS = 1 << 20


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
        window = WINDOW_BYTES // 8  # elements read from the files at a time
        for i, (dtype, _, n) in enumerate(self.layout.runs):
            acc_mem = torch.empty(min(SUM_ELEMENTS, n), dtype=sum_dtype(dtype))
            for lo in range(0, n, window):
                hi = min(n, lo + window)
                for update, _ in self.updates:  # this window and the next, from every file
                    update.ahead(i, lo, min(n, hi + window))
                for a in range(lo, hi, SUM_ELEMENTS):  # summed in cache-sized pieces
                    b = min(hi, a + SUM_ELEMENTS)
                    acc = acc_mem[: b - a]
                    for j, (update, samples) in enumerate(self.updates):
                        add_into(acc, update.runs[i][a:b], samples, j == 0)
                    mean_into(acc, self.total_samples, out[i][a:b])
                for update, _ in self.updates:
                    update.done(i, lo, hi)
        self.updates = []  # summed: their maps go

    def result(self) -> dict[str, torch.Tensor]:
        out = {n: torch.empty(r.shape, dtype=r.dtype) for n, r in self.reference.items()}
        self.result_into(out)
        return out
