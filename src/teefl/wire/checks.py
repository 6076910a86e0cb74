"""Checks an update passes before it counts: names, shapes, dtypes, finiteness.

Why a scan while receiving (`FiniteScan`): a NaN or Inf in one update would poison the global
model for everyone; the sums are computed on pieces still in the CPU cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from teefl.errors import TeeflError
from teefl.wire import codec


class UpdateRejected(TeeflError):
    """An update that does not fit the global model; it never touches the running sum."""

    #: refused for its timing (a closed round), not its content: transports answer
    #: FAILED_PRECONDITION ("stale") instead of INVALID_ARGUMENT (`server.intake.StaleUpdate`)
    stale = False


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

    Why per dtype: a sync per tensor costs more than the sums (docs/decisions/007). A False proves
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


#: bytes of an update summed at once where it lives in its file (`FlatUpdate.windows`)
WINDOW_BYTES = 64 << 20
#: bytes of such an update checked for finiteness at once (the float64 sum converts them first)
CHECK_BYTES = 4 << 20


class FlatUpdate:
    """An update whose payload has exactly the global model's `codec.Layout`, seen as that
    layout's runs (a few flat tensors instead of one per tensor), for `RunningFedAvg.add`."""

    def __init__(self, layout: codec.Layout, payload: Any) -> None:
        self.layout, self.runs = layout, layout.run_views(payload)
        #: ``release(start, end)``: gives back the memory behind a byte range of a payload that
        #: lives in its file (`teefl.store.paged.MappedPayload.release_pages`), else None
        self.release = getattr(payload, "release_pages", None)
        #: ``read_ahead(start, end)``: starts reading a byte range of such a payload from its
        #: file (`teefl.store.paged.MappedPayload.read_ahead`), else None
        self.read_ahead = getattr(payload, "read_ahead", None)

    def finite(self) -> bool:
        """Whether every float element is finite (cheap; False proves nothing, see
        `_sums_finite`: the caller then checks tensor by tensor). A payload in its file is
        summed window by window, each window's pages given back after its sum."""
        if self.release is None:
            return _sums_finite([t for t in self.runs if t.is_floating_point()])
        sums = [  # float64: no overflow of a float16 window's sum (a temporary of 4x the window)
            t.sum(dtype=torch.float64)
            for _, _, _, t in self.windows(CHECK_BYTES)
            if t.is_floating_point()
        ]
        return not sums or bool(torch.isfinite(torch.stack(sums)).all())

    def windows(self, nbytes: int) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """``(run, lo, hi, view)``: the runs as views of elements ``lo:hi`` of at most
        ``nbytes`` each, in order; the memory behind each is given back (`done`) once the next
        is asked for."""
        for i, run in enumerate(self.runs):
            step = max(1, nbytes // run.element_size())
            for lo in range(0, run.numel(), step):
                hi = min(run.numel(), lo + step)
                self.ahead(i, lo, min(run.numel(), hi + step))
                yield i, lo, hi, run[lo:hi]
                self.done(i, lo, hi)

    def _bytes(self, run: int, lo: int, hi: int) -> tuple[int, int]:
        _, begin, _ = self.layout.runs[run]
        size = self.runs[run].element_size()
        return begin + lo * size, begin + hi * size

    def ahead(self, run: int, lo: int, hi: int) -> None:
        """Elements ``lo:hi`` of run ``run`` are read next: where the payload lives in its file,
        the kernel starts reading them now, in large requests, instead of one small read per
        page fault as they are touched (a no-op for a payload in memory)."""
        if self.read_ahead is not None:
            self.read_ahead(*self._bytes(run, lo, hi))

    def done(self, run: int, lo: int, hi: int) -> None:
        """Elements ``lo:hi`` of run ``run`` were read: where the payload lives in its file,
        the memory behind them goes back (a no-op for a payload in memory)."""
        if self.release is not None:
            self.release(*self._bytes(run, lo, hi))


class FiniteScan:
    """The finiteness check of an update of a known layout, made piece by piece while it is
    received (an `assembly.Assembler` sink): each piece's float elements are summed right after
    the receive loop wrote and checksummed them, while they are still in the CPU cache.

    Why: checked after the last byte, the same sums read the whole update back from memory on
    the acknowledgement's critical path (docs/decisions/007); on a link slower than the CPU the
    pieces are summed while the next ones are still on the wire, for nothing. Summed
    with NumPy, which never spreads a sum over threads: torch's intra-op threads, woken for
    every piece while the sender holds the other core, made ResNet-18's upload 2.6x slower.
    As `FlatUpdate.finite`: every partial sum finite proves every element finite; a False (or
    a scan that did not see every float byte exactly once, in element-aligned pieces) proves
    nothing, and the caller then checks the whole update the usual way. bfloat16, which NumPy
    lacks, is checked exactly instead: an element is finite unless its 8 exponent bits are all
    set (read as uint16; their largest masked value is 0x7F80 only then). The masked bits go
    into one scratch array kept for the whole update, never into fresh arrays per piece, which
    made concurrent uploads wait on this check (docs/decisions/009-flat-memory.md).
    """

    def __init__(self, layout: codec.Layout) -> None:
        self.runs = [
            (b, b + n * d.itemsize, _NUMPY.get(d)) for d, b, n in layout.runs if d.is_floating_point
        ]
        self.expected = sum(e - b for b, e, _ in self.runs)
        self.seen = 0
        self.complete = all(dt is not None for _, _, dt in self.runs)
        self.sums: list[float] = []
        self._bits: np.ndarray | None = None  # bfloat16's masked exponents, reused per piece

    def __call__(self, piece: memoryview, offset: int) -> None:
        if not self.complete:
            return
        end = offset + len(piece)
        for begin, stop, dtype in self.runs:
            lo, hi = max(begin, offset), min(stop, end)
            if lo >= hi:
                continue
            if (lo - begin) % dtype.itemsize or (hi - lo) % dtype.itemsize:
                self.complete = False  # an element split between pieces: not summed here
                return
            n = (hi - lo) // dtype.itemsize
            values = np.frombuffer(piece, dtype, n, lo - offset)
            if dtype == _BF16_BITS:
                if self._bits is None or len(self._bits) < n:
                    self._bits = np.empty(n, _BF16_BITS)
                exponents = np.bitwise_and(values, 0x7F80, out=self._bits[:n])
                bad = int(exponents.max()) == 0x7F80
                self.sums.append(math.inf if bad else 0.0)
            else:
                with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN are the answer
                    self.sums.append(float(values.sum()))
            self.seen += hi - lo

    def finite(self) -> bool:
        """True only where every float element was summed and every sum is finite."""
        if not self.complete or self.seen != self.expected:
            return False
        return all(math.isfinite(x) for x in self.sums)


#: the float dtypes `FiniteScan` sums with NumPy, as little-endian NumPy dtypes
_BF16_BITS = np.dtype("<u2")  # bfloat16, seen as its bits
_NUMPY = {
    torch.float16: np.dtype("<f2"),
    torch.float32: np.dtype("<f4"),
    torch.float64: np.dtype("<f8"),
    torch.bfloat16: _BF16_BITS,
}
