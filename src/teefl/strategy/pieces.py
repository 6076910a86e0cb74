"""The model as a few flat pieces: the payload layout's dtype runs where the layout is known,
else one piece per tensor.

Why: a strategy whose math is element-wise (a median, a server optimiser step, a distance) then
makes a few calls per round instead of one per tensor (244 for MobileNetV3-Small, ~5-10 us of
Python each), and takes a `FlatUpdate`'s runs as they are -- the aggregator's zero-copy path.
Work on a piece is done in `CHUNK`-element stretches, so temporaries (float64 copies, a sort of n
updates) stay small whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from teefl.wire import codec
from teefl.wire.checks import FlatUpdate, UpdateRejected, check_update

#: elements per stretch of element-wise work: 1 Mi float64 = 8 MiB per temporary
CHUNK = 1 << 20


class Pieces:
    """Where each tensor of ``reference`` lies in the pieces: ``members[i]`` lists (name,
    element offset in piece i, element count, shape); ``dtypes[i]``, ``sizes[i]`` the piece's
    dtype and element count. Empty tensors belong to no piece."""

    def __init__(
        self, reference: Mapping[str, torch.Tensor], layout: codec.Layout | None = None
    ) -> None:
        self.reference = reference
        if layout is not None and not layout_fits(layout, reference):
            layout = None  # not the reference's layout: one piece per tensor
        self.layout = layout
        self.dtypes: list[torch.dtype] = []
        self.sizes: list[int] = []
        self.members: list[list[tuple[str, int, int, tuple[int, ...]]]] = []
        if layout is not None:
            bases = {b: i for i, (_, b, _) in enumerate(layout.runs)}
            for dtype, _, n in layout.runs:
                self.dtypes.append(dtype)
                self.sizes.append(n)
                self.members.append([])
            run, pos = -1, 0
            for name, _, shape, begin, n in layout.entries:
                if not n:
                    continue
                if begin in bases:
                    run, pos = bases[begin], 0
                self.members[run].append((name, pos, n, tuple(shape)))
                pos += n
        else:
            for name, t in reference.items():
                if t.numel():
                    self.dtypes.append(t.dtype)
                    self.sizes.append(t.numel())
                    self.members.append([(name, 0, t.numel(), tuple(t.shape))])

    def __len__(self) -> int:
        return len(self.sizes)

    def of(
        self, update: Mapping[str, torch.Tensor] | FlatUpdate, *, checked: bool = False
    ) -> list[torch.Tensor]:
        """``update`` as flat tensors, one per piece: a `FlatUpdate`'s own runs, or views / one
        gathering copy of a state dict's tensors (checked against the reference unless
        ``checked``). The result may share memory with ``update``."""
        if isinstance(update, FlatUpdate):
            if self.layout is None or update.layout.head != self.layout.head:
                raise UpdateRejected("update does not have the global model's layout")
            return list(update.runs)
        if not checked:
            check_update(self.reference, update)
        return self.gather(update)

    def gather(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like the reference as flat pieces (views where a piece is one
        contiguous tensor, else one copy)."""
        out = []
        for members in self.members:
            if len(members) == 1:
                out.append(tensors[members[0][0]].reshape(-1))
            else:
                out.append(torch.cat([tensors[name].reshape(-1) for name, *_ in members]))
        return out

    def owned(
        self, update: Mapping[str, torch.Tensor] | FlatUpdate, *, checked: bool = False
    ) -> list[torch.Tensor]:
        """As `of`, but pieces that own their memory (copied once): an update's runs are views
        into a receive buffer that the server reuses once the update is added."""
        flat = self.of(update, checked=checked)
        if isinstance(update, FlatUpdate):
            return [t.clone() for t in flat]
        return [t.clone() if len(m) == 1 else t for t, m in zip(flat, self.members, strict=True)]

    def targets(self, out: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> list[torch.Tensor]:
        """Flat tensors to write a result into: ``out``'s runs as given, or per piece a view
        of ``out``'s tensor or a scratch tensor that `finish` scatters into ``out``."""
        if isinstance(out, list):
            if self.layout is None or len(out) != len(self):
                raise ValueError("run views given for a result without the model's layout")
            return out
        dst = []
        for dtype, n, members in zip(self.dtypes, self.sizes, self.members, strict=True):
            t = out[members[0][0]] if len(members) == 1 else None
            if t is not None and t.is_contiguous():
                dst.append(t.view(-1))
            else:
                dst.append(torch.empty(n, dtype=dtype))
        return dst

    def finish(
        self, out: Mapping[str, torch.Tensor] | list[torch.Tensor], dst: list[torch.Tensor]
    ) -> None:
        """Scatter `targets`' scratch tensors into ``out`` (nothing to do for views)."""
        if isinstance(out, list):
            return
        for flat, members in zip(dst, self.members, strict=True):
            for name, pos, n, shape in members:
                t = out[name]
                if t.data_ptr() != flat.data_ptr() or len(members) > 1:
                    t.copy_(flat[pos : pos + n].view(shape))

    def ranges_named(self, i: int, names: set[str]) -> list[tuple[int, int]]:
        """Element ranges of piece ``i`` whose tensor's last name component is in ``names``."""
        return [
            (pos, pos + n)
            for name, pos, n, _ in self.members[i]
            if name.rsplit(".", 1)[-1] in names
        ]


def chunks(n: int, size: int | None = None, per: int = 1) -> Iterator[tuple[int, int]]:
    """(begin, end) stretches of ``size`` (default `CHUNK`) elements covering ``range(n)``;
    ``per``: values per element (a stack of n updates), which shortens the stretch as much."""
    size = max(1, (size or CHUNK) // max(1, per))
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def layout_fits(layout: codec.Layout, reference: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``layout`` lays out exactly ``reference``'s names, dtypes and shapes."""
    return {e[0]: (e[1], tuple(e[2])) for e in layout.entries} == {
        k: (v.dtype, tuple(v.shape)) for k, v in reference.items()
    }
