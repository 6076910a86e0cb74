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


class UpdateRejected(TeeflError):
    """An update that does not fit the global model; it never touches the running sum."""


def check_update(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes must match the global model exactly; values must be finite."""
    missing = reference.keys() - update.keys()
    extra = update.keys() - reference.keys()
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {sorted(missing)[:3]}")
        if extra:
            parts.append(f"unknown tensors {sorted(extra)[:3]}")
        raise UpdateRejected("update does not match the model: " + ", ".join(parts))
    floats: list[tuple[str, torch.Tensor]] = []
    for name, ref in reference.items():
        t = update[name]
        if t.dtype != ref.dtype:
            raise UpdateRejected(f"tensor {name}: dtype {t.dtype} instead of {ref.dtype}")
        if t.shape != ref.shape:
            raise UpdateRejected(
                f"tensor {name}: shape {tuple(t.shape)} instead of {tuple(ref.shape)}"
            )
        if t.is_floating_point() and t.numel():
            floats.append((name, t))
    if not _sums_finite([t for _, t in floats]):
        for name, t in floats:  # which one: the exact check, only on this rare path
            if not _all_finite(t):
                raise UpdateRejected(f"tensor {name}: contains NaN or Inf")


def _sums_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor's sum is finite, with one host synchronisation per dtype.

    Asking ``bool(isfinite(t.sum()))`` per tensor costs ~10 us of Python and a sync each: 2.8 ms
    for MobileNetV3-Small's 210 float tensors, against 1.1 ms for this. A False here proves
    nothing by itself (finite values may overflow a sum); the caller then checks exactly.
    """
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.sum())
    return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in groups.values())


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite, without a bool tensor the size of the model.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves every
    element finite -- one streaming reduction, ~10x faster than ``isfinite(t).all()`` on a
    ResNet-18 update here. Only a non-finite sum (a bad value, or finite values whose sum
    overflows) pays for the exact element-wise check.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


class RunningFedAvg:
    """Accumulates sample-weighted updates of one round; `result` gives the new global model."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self.reference = reference
        self.sums: dict[str, torch.Tensor] = {}
        self.total_samples = 0
        self.count = 0
        for name, ref in reference.items():
            if ref.is_floating_point():
                self.sums[name] = torch.zeros(ref.shape, dtype=torch.float64)
            else:
                self.sums[name] = torch.full(ref.shape, torch.iinfo(ref.dtype).min, dtype=ref.dtype)

    def add(
        self, update: Mapping[str, torch.Tensor], num_samples: int, *, checked: bool = False
    ) -> None:
        """Check then add one update in place; a rejected update leaves the sum untouched.

        ``checked=True``: the caller has just run `check_update` on this very update (the
        aggregator does, before storing it), so the check is not paid twice on the upload path.
        """
        if num_samples <= 0:
            raise UpdateRejected(f"sample count must be positive, got {num_samples}")
        if not checked:
            check_update(self.reference, update)
        for name, acc in self.sums.items():
            t = update[name]
            if acc.is_floating_point():
                acc.add_(t, alpha=num_samples)
            else:
                torch.maximum(acc, t, out=acc)
        self.total_samples += num_samples
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        out = {n: torch.empty(ref.shape, dtype=ref.dtype) for n, ref in self.reference.items()}
        self.result_into(out)
        return out

    def result_into(self, out: Mapping[str, torch.Tensor]) -> None:
        """Write the weighted mean into ``out`` (tensors shaped like the reference), in one pass
        per tensor: the float64 sum is divided and rounded to the model's dtype on the way."""
        if self.count == 0:
            raise TeeflError("no update was accepted in this round")
        for name, acc in self.sums.items():
            if acc.is_floating_point():
                torch.div(acc, self.total_samples, out=out[name])
            else:
                out[name].copy_(acc)


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
    reference: Mapping[str, torch.Tensor], method: str = "fedavg", trim_ratio: float = 0.1
) -> RunningFedAvg | CoordinateRobust:
    """The plan's aggregation rule for one round."""
    if method == "fedavg":
        return RunningFedAvg(reference)
    return CoordinateRobust(reference, method, trim_ratio)
