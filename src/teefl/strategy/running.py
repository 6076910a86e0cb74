"""FedAvg as a running weighted sum.

Why a running sum: the aggregator adds each update the moment it is checked, so its memory holds
one accumulator (float64, for an order-independent result to float32 precision) plus the updates in
flight -- not one copy per collaborator. Floating-point tensors (weights, BatchNorm running
statistics) are averaged weighted by sample count; integer tensors such as BatchNorm's
``num_batches_tracked`` are counters, not parameters: they are taken as is (the largest value
reported, which is the same for every collaborator that ran the same number of steps).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from teefl.errors import TeeflError
from teefl.wire import codec
from teefl.wire.checks import WINDOW_BYTES, FlatUpdate, UpdateRejected, check_update


class RunningFedAvg:
    """Accumulates sample-weighted updates of one round; `result` gives the new global model.

    ``layout``: the global model's payload layout; the sums are then kept per run of it, so an
    update with that layout (a `FlatUpdate`) is added with a few calls instead of one per tensor
    and the mean written into the next payload the same way. Per-tensor adds still work (the
    per-tensor sums are views of the same memory). The first update is written into the sums
    instead of added to zeros: one pass over the model less per round.
    """

    def __init__(
        self,
        reference: Mapping[str, torch.Tensor],
        layout: codec.Layout | None = None,
        reuse: RunningFedAvg | None = None,
    ) -> None:
        """``reuse``: a finished aggregator of the same layout whose sum memory this one takes
        over (its pages are mapped already; fresh sums fault, docs/decisions/006)."""
        self.reference = reference
        self.sums: dict[str, torch.Tensor] = {}
        self.total_samples = 0
        self.count = 0
        if layout is not None and {e[0]: (e[1], tuple(e[2])) for e in layout.entries} != {
            k: (v.dtype, tuple(v.shape)) for k, v in reference.items()
        }:
            layout = None  # not the reference's layout: per-tensor sums
        self.layout = layout
        self.run_sums: list[torch.Tensor] = []
        if layout is not None:
            if reuse is not None and reuse.layout is not None and reuse.layout.head == layout.head:
                self.run_sums = reuse.run_sums
                reuse.run_sums, reuse.sums, reuse.count = [], {}, 0  # it cannot be used again
            else:
                self.run_sums = [torch.empty(n, dtype=sum_dtype(d)) for d, _, n in layout.runs]
            bases = {b: i for i, (_, b, _) in enumerate(layout.runs)}
            run, pos = -1, 0
            for name, dtype, shape, begin, n in layout.entries:
                if not n:
                    self.sums[name] = torch.empty(shape, dtype=sum_dtype(dtype))
                    continue
                if begin in bases:
                    run, pos = bases[begin], 0
                self.sums[name] = self.run_sums[run][pos : pos + n].view(shape)
                pos += n
        else:
            for name, ref in reference.items():
                self.sums[name] = torch.empty(ref.shape, dtype=sum_dtype(ref.dtype))

    def add(
        self,
        update: Mapping[str, torch.Tensor] | FlatUpdate,
        num_samples: int,
        *,
        checked: bool = False,
    ) -> None:
        """Check then add one update in place; a rejected update leaves the sum untouched.

        ``checked=True``: the caller has just run `check_update` on this very update (the
        aggregator does, before storing it), so the check is not paid twice on the upload path;
        a `FlatUpdate` is checked by its layout (and its caller's `FlatUpdate.finite`).
        """
        if num_samples <= 0:
            raise UpdateRejected(f"sample count must be positive, got {num_samples}")
        if isinstance(update, FlatUpdate):
            if self.layout is None or update.layout.head != self.layout.head:
                raise UpdateRejected("update does not have the global model's layout")
            if update.release is not None:  # it lives in its file: window by window
                self._add_windows(update, num_samples)
                return
            pairs = list(zip(self.run_sums, update.runs, strict=True))
        else:
            if not checked:
                check_update(self.reference, update)
            pairs = [(acc, update[name]) for name, acc in self.sums.items() if acc.numel()]
        first = self.count == 0
        for acc, t in pairs:
            add_into(acc, t, num_samples, first)
        self.total_samples += num_samples
        self.count += 1

    def _add_windows(self, update: FlatUpdate, num_samples: int) -> None:
        """Add an update that lives in its file, giving back each window's memory once added."""
        first = self.count == 0
        for i, lo, hi, t in update.windows(WINDOW_BYTES):
            add_into(self.run_sums[i][lo:hi], t, num_samples, first)
        self.total_samples += num_samples
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        out = {n: torch.empty(ref.shape, dtype=ref.dtype) for n, ref in self.reference.items()}
        self.result_into(out)
        return out

    def result_into(self, out: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> None:
        """Write the weighted mean into ``out`` -- tensors shaped like the reference, or the
        runs of a payload of this layout (`codec.Layout.run_views`) -- in one pass per tensor
        or run: the float64 sum is divided and rounded to the model's dtype on the way."""
        if self.count == 0:
            raise TeeflError("no update was accepted in this round")
        if isinstance(out, list):
            pairs = list(zip(self.run_sums, out, strict=True))
        else:
            pairs = [(acc, out[name]) for name, acc in self.sums.items() if acc.numel()]
        for acc, dst in pairs:
            mean_into(acc, self.total_samples, dst)


def mean_into(acc: torch.Tensor, total_samples: int, dst: torch.Tensor) -> None:
    """A sum (or a window of it) divided by the samples and rounded once into ``dst``'s dtype;
    counters are copied: the running and the windowed sum's last step, bit for bit."""
    if acc.is_floating_point():
        torch.div(acc, total_samples, out=dst)
    else:
        dst.copy_(acc)


def add_into(acc: torch.Tensor, t: torch.Tensor, num_samples: int, first: bool) -> None:
    """One update's tensor (or a window of it) into its sum: FedAvg's one operation, shared by
    the running sum and the windowed one (`teefl.strategy.windowed`), bit for bit."""
    if first:
        acc.copy_(t)  # widened exactly; then scaled in float64, as the add would
        if acc.is_floating_point() and num_samples != 1:
            acc.mul_(num_samples)
    elif acc.is_floating_point():
        acc.add_(t, alpha=num_samples)
    else:
        torch.maximum(acc, t, out=acc)


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 sums for every float dtype (precision over many updates); integers (counters
    such as BatchNorm's) keep their dtype and aggregate by maximum."""
    return torch.float64 if dtype.is_floating_point else dtype


class CoordinateRobust:
    """Coordinate-wise median or trimmed mean of the round's updates (unweighted).

    Why offer them: one malicious collaborator can move a weighted mean arbitrarily far, but not a
    median. The price: every update of the round is kept in memory (N model copies), and sample
    counts no longer weigh the result.
    """

    def __init__(
        self, reference: Mapping[str, torch.Tensor], method: str, trim_ratio: float = 0.1
    ) -> None:
        if method not in ("median", "trimmed_mean"):
            raise ValueError(f"unknown robust aggregation {method!r}")
        self.reference, self.method, self.trim_ratio = reference, method, trim_ratio
        self.updates: list[dict[str, torch.Tensor]] = []
        self.total_samples = 0
        self.count = 0

    def add(
        self, update: Mapping[str, torch.Tensor], num_samples: int, *, checked: bool = False
    ) -> None:
        if num_samples <= 0:
            raise UpdateRejected(f"sample count must be positive, got {num_samples}")
        if not checked:
            check_update(self.reference, update)
        self.updates.append({k: v.detach().clone() for k, v in update.items()})
        self.total_samples += num_samples
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise TeeflError("no update was accepted in this round")
        out: dict[str, torch.Tensor] = {}
        n = self.count
        k = int(n * self.trim_ratio)
        for name, ref in self.reference.items():
            stack = torch.stack([u[name] for u in self.updates])
            if not ref.is_floating_point():
                out[name] = stack.max(dim=0).values
            elif self.method == "median":
                # mean of the two middle values for an even count: the textbook median
                srt = stack.double().sort(dim=0).values
                out[name] = ((srt[(n - 1) // 2] + srt[n // 2]) / 2).to(ref.dtype)
            else:
                srt = stack.double().sort(dim=0).values
                out[name] = srt[k : n - k].mean(dim=0).to(ref.dtype)
        return out


def make_aggregator(
    reference: Mapping[str, torch.Tensor],
    method: str = "fedavg",
    trim_ratio: float = 0.1,
    layout: codec.Layout | None = None,
    reuse: RunningFedAvg | None = None,
) -> RunningFedAvg | CoordinateRobust:
    """The plan's aggregation rule for one round (``layout``, ``reuse``: see `RunningFedAvg`)."""
    if method == "fedavg":
        return RunningFedAvg(reference, layout, reuse)
    return CoordinateRobust(reference, method, trim_ratio)
