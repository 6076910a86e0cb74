"""Tensors <-> one safetensors payload <-> a stream of chunks.

Why safetensors: it is a plain header + raw little-endian buffers, so decoding never runs code
(unlike pickle) and the receiver can check names, shapes and dtypes before using anything. Why one
payload per model instead of one message per tensor: per-message cost in gRPC dominates for models
with hundreds of small tensors (MobileNetV3-Small has 244), which is what makes OpenFL's
communication time scale with layer count rather than bytes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import crc32c as _crc32c
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from teefl.errors import TeeflError

FORMAT = "safetensors"

#: safetensors' dtype names (the format's spec) <-> torch dtypes
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("C64", "complex64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_CODES = {dt: code for code, dt in _DTYPES.items()}

#: safetensors refuses headers above 100 MB; so do we (a hostile size must not allocate first)
MAX_HEADER = 100_000_000
_LITTLE = sys.byteorder == "little"


class PayloadError(TeeflError):
    """A payload that is malformed, of the wrong size, or fails its checksum."""


class PagePayload(mmap.mmap):
    """A payload buffer that starts on a page boundary: private anonymous memory, zeroed.

    Why: the aggregator's checkpoint is then written with ``O_DIRECT`` straight from the model's
    memory (`atomic.write_atomic`): the disk reads it by DMA instead of the CPU copying 45 MB
    into the page cache, which on 2 cores slowed the next round's transfers (docs/benchmarks.md).
    A ``bytearray``'s memory starts 16 bytes past a page here, which ``O_DIRECT`` refuses.
    Compares equal to any bytes-like object of the same content, as a ``bytearray`` does.
    """

    __slots__ = ()

    def __new__(cls, size: int) -> PagePayload:
        return super().__new__(cls, -1, size, flags=mmap.MAP_PRIVATE)

    def __eq__(self, other: object) -> bool:
        try:
            return memoryview(self) == other
        except TypeError:
            return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, as a bytearray


#: a writable payload buffer: `PagePayload` (laid out by `Layout`) or ``bytearray``
Buffer = bytearray | PagePayload


class ReceivedPayload(bytearray):
    """A payload buffer that the `Assembler` filled and nobody else holds.

    `decode_state` returns tensors that *share* the memory of such a buffer (no copy), which is
    safe because the buffer is never written again once `Assembler.finish` has returned it; any
    other input is copied once, so the decoded tensors never alias memory a caller may reuse.
    """

    __slots__ = ("_shared",)


def encode_state(state: Mapping[str, torch.Tensor]) -> Buffer:
    """Serialize a state dict into one safetensors payload, copying every tensor exactly once.

    The header is written first and every tensor is copied straight from its (CPU, possibly
    strided) memory into its place in one buffer allocated for the whole payload. Tensors are laid
    out by element size, largest first, so each starts aligned to its element size. The result is
    a standard safetensors file (``safetensors.torch.load`` reads it).
    """
    items: list[tuple[str, torch.Tensor]] = []
    for name, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype not in _CODES or not _LITTLE:
            return bytearray(st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
        items.append((name, t))
    layout = Layout.of_state(dict(items))
    assert layout is not None  # every dtype is known and the host is little-endian (above)
    out = layout.allocate()
    views = layout.tensor_views(out)
    for name, t in items:
        if t.numel():
            views[name].copy_(t)
    return out


class Layout:
    """Where an `encode_state` payload keeps each tensor, known without a payload.

    ``head``: the payload's bytes before the first tensor byte (size, JSON header, padding),
    which fix every tensor's name, dtype, shape and place: a payload that starts with exactly
    these bytes has exactly this layout, with no parsing. ``runs``: (dtype, byte offset, element
    count) of each stretch of consecutive tensors of one dtype (tensors are laid out by element
    size, then name, so a float32 model is one or two runs): whoever only needs the elements --
    a finiteness check, the FedAvg sum -- makes a few calls on runs instead of one per tensor
    (244 for MobileNetV3-Small, each ~5-10 us of Python).
    """

    def __init__(self, head: bytes, entries: list[tuple[str, torch.dtype, list[int], int, int]]):
        self.head = head
        self.entries = entries  # (name, dtype, shape, absolute byte offset, element count)
        self.size = len(head) + sum(n * dt.itemsize for _, dt, _, _, n in entries)
        runs: list[list[Any]] = []
        for _, dtype, _, begin, n in entries:
            if not n:
                continue
            if (
                runs
                and runs[-1][0] == dtype
                and runs[-1][1] + runs[-1][2] * dtype.itemsize == begin
            ):
                runs[-1][2] += n
            else:
                runs.append([dtype, begin, n])
        self.runs: list[tuple[torch.dtype, int, int]] = [(d, b, n) for d, b, n in runs]

    @classmethod
    def of_state(cls, state: Mapping[str, torch.Tensor]) -> Layout | None:
        """The layout `encode_state` gives ``state``; None where it would not lay it out
        itself (an unknown dtype, a big-endian host)."""
        items = [(n, t.detach()) for n, t in state.items()]
        if not _LITTLE or any(t.dtype not in _CODES for _, t in items):
            return None
        items.sort(key=lambda it: (-it[1].element_size(), it[0]))
        header: dict[str, dict[str, object]] = {}
        offset = 0
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            header[name] = {
                "dtype": _CODES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # tensor data starts 8-byte aligned, as safetensors does
        start = 8 + len(head)
        entries = [
            (name, t.dtype, list(t.shape), start + header[name]["data_offsets"][0], t.numel())  # type: ignore[index]
            for name, t in items
        ]
        return cls(len(head).to_bytes(8, "little") + head, entries)

    def allocate(self) -> PagePayload:
        """A payload of this layout: the header written, the tensor bytes still zero."""
        out = PagePayload(self.size)
        out[: len(self.head)] = self.head
        return out

    def matches(self, payload: Any) -> bool:
        """Whether ``payload`` has exactly this layout (its size and its header bytes). The
        header is copied out to compare: memoryview's own comparison goes byte by byte (~24 us
        for MobileNetV3-Small's 23 KB header here, against ~1 us)."""
        if len(payload) != self.size:
            return False
        return bytes(memoryview(payload)[: len(self.head)]) == self.head

    def tensor_views(self, buf: Any) -> dict[str, torch.Tensor]:
        """One view per tensor into ``buf`` (a payload of this layout), in layout order."""
        views: dict[str, torch.Tensor] = {}
        for name, dtype, shape, begin, n in self.entries:
            if n == 0:
                views[name] = torch.empty(shape, dtype=dtype)
            else:
                views[name] = torch.frombuffer(buf, dtype=dtype, count=n, offset=begin).view(shape)
        return views

    def run_views(self, buf: Any) -> list[torch.Tensor]:
        """One flat view per run into ``buf`` (a payload of this layout)."""
        return [torch.frombuffer(buf, dtype=d, count=n, offset=b) for d, b, n in self.runs]


class Spares:
    """Payload buffers of earlier rounds, reused for a new payload once nothing refers to them.

    Why: a fresh buffer costs page faults and zeroing every round (docs/decisions/006). Why it
    is safe: a buffer is handed out again only when this list holds the sole reference to it
    (CPython's reference count: no download still sending it, no checkpoint still to write, no
    tensor view into it).
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.bufs: list[Buffer] = []

    def give(self, buf: Buffer) -> None:
        self.bufs.append(buf)
        del self.bufs[: -self.keep]

    def free(self, layout: Layout) -> Buffer | None:
        """A kept payload of ``layout`` nobody refers to any more, its header written (tensor
        bytes undefined); None where there is none (`Publisher.spare` then waits or allocates)."""
        for i in range(len(self.bufs)):
            # 2: the list's reference and getrefcount's own argument -- nobody else's
            if len(self.bufs[i]) == layout.size and sys.getrefcount(self.bufs[i]) == 2:
                buf = self.bufs.pop(i)
                buf[: len(layout.head)] = layout.head
                return buf
        return None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise PayloadError(f"malformed safetensors payload: duplicate tensor name {k!r}")
        out[k] = v
    return out


def _parse_header(view: memoryview) -> tuple[int, list[tuple[str, torch.dtype, list[int], int]]]:
    """Validate the header against the buffer; returns (data start, [(name, dtype, shape,
    offset)]) with every tensor's byte range inside the buffer, the ranges contiguous and
    non-overlapping, and each range exactly the size its dtype and shape announce."""
    size = len(view)
    if size < 8:
        raise PayloadError("malformed safetensors payload: shorter than its 8-byte header size")
    hlen = int.from_bytes(view[:8], "little")
    if hlen > MAX_HEADER or hlen > size - 8:
        raise PayloadError(f"malformed safetensors payload: header of {hlen} bytes does not fit")
    try:
        header = json.loads(bytes(view[8 : 8 + hlen]), object_pairs_hook=_no_duplicates)
    except RecursionError:  # nested deeper than the parser's recursion limit: not a header
        raise PayloadError("malformed safetensors payload: header nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"malformed safetensors payload: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise PayloadError("malformed safetensors payload: header is not a JSON object")
    start = 8 + hlen
    data_len = size - start
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise PayloadError("malformed safetensors payload: __metadata__ must map strings")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise PayloadError(f"malformed safetensors payload: bad entry for tensor {name!r}")
        dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offs = info["shape"], info["data_offsets"]
        if dtype is None:
            raise PayloadError(f"tensor {name!r}: unsupported dtype {info['dtype']!r}")
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offs, list)
            and len(offs) == 2
            and all(type(o) is int for o in offs)
        ):
            raise PayloadError(f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offs
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_len:
            raise PayloadError(f"tensor {name!r}: data_offsets {offs} outside the payload")
        if end - begin != numel * dtype.itemsize:
            raise PayloadError(
                f"tensor {name!r}: {end - begin} bytes for shape {shape} of {info['dtype']}"
            )
        entries.append((name, dtype, shape, begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    pos = 0
    for name, _, _, begin, end in entries:
        if begin != pos:
            raise PayloadError(
                f"tensor {name!r}: data_offsets overlap or leave a gap (at byte {begin}, "
                f"expected {pos})"
            )
        pos = end
    if pos != data_len:
        raise PayloadError(f"payload carries {data_len - pos} bytes that no tensor describes")
    return start, [(n, dt, sh, b) for n, dt, sh, b, _ in entries]


def decode_state(payload: Any, *, owned: bool = False) -> dict[str, torch.Tensor]:
    """Parse and check a safetensors payload; any malformation becomes a `PayloadError`.

    Zero-copy for a `ReceivedPayload` (the tensors share its memory, see there) and for a
    writable buffer the caller hands over with ``owned=True`` (an `Assembler`'s memory-mapped
    update file); every other input is copied once into a buffer the tensors then own, so they
    never alias caller memory.
    """
    if not _LITTLE:  # torch.frombuffer reads native byte order; safetensors is little-endian
        try:
            return st_load(bytes(payload))
        except Exception as exc:
            raise PayloadError(f"malformed safetensors payload: {exc}") from None
    view = memoryview(payload)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    start, entries = _parse_header(view)
    if isinstance(payload, ReceivedPayload) and not getattr(payload, "_shared", False):
        buf: Any = payload
        payload._shared = True  # a second decode of the same buffer gets its own copy
    elif owned:
        buf = payload
    else:
        buf = bytearray(view)
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin in entries:
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + begin).view(shape)
        out[name] = t
    return out


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli, hardware-accelerated: several times SHA-256's speed; decision 007)."""
    return _crc32c.crc32c(data)


#: what a receiver checks a payload against: nothing (TLS authenticated every record already),
#: its CRC32C (accidental corruption, e.g. over plain TCP), or its SHA-256
CHECKS = ("none", "crc32c", "sha256")


def iter_chunks(payload: bytes | bytearray | memoryview, chunk_size: int) -> Iterator[memoryview]:
    """Slices of the payload without copying it; the transport copies each slice once."""
    view = memoryview(payload)
    for offset in range(0, len(view), chunk_size):
        yield view[offset : offset + chunk_size]
