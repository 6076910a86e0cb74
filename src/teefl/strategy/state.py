"""A strategy's saved state: a JSON-able dict plus named tensors, stored as one safetensors file.

Why not pickle: the state is read back by the aggregator after a restart, from a run directory
that others may have written to; safetensors is a JSON header plus raw little-endian buffers, so
reading it never runs code, and every field is checked before use.

The format (version 1), exactly:

- a standard safetensors file (``safetensors.torch.load`` reads its tensors);
- its tensors are ``StrategyState.tensors`` under their own names (FedOpt: ``m/<tensor name>``
  and ``v/<tensor name>`` for each float tensor of the model), in their own dtypes and shapes;
- its ``__metadata__`` holds one key, ``teefl.strategy``, whose value is the JSON text
  ``{"format": 1, "strategy": <name>, "meta": <meta>}`` (keys sorted, no NaN or infinity):
  ``strategy`` is the registered name of the strategy that saved it, ``meta`` its JSON-able
  dict (FedOpt: ``{"t": <rounds applied>}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from teefl.errors import TeeflError

FORMAT = 1
#: the ``__metadata__`` key that carries the JSON part
META_KEY = "teefl.strategy"


@dataclass
class StrategyState:
    """What a strategy must carry over a restart. ``meta``: JSON-able (str keys; str, int,
    float, bool, None, lists and dicts of them); ``tensors``: CPU tensors."""

    strategy: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode_state(state: StrategyState) -> bytes:
    """``state`` in the format above. Tensors that share memory with another are copied first
    (safetensors refuses them; `FedOpt.state` hands over copies already)."""
    try:
        text = json.dumps(
            {"format": FORMAT, "strategy": state.strategy, "meta": state.meta},
            sort_keys=True,
            allow_nan=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError) as exc:
        raise TeeflError(f"strategy {state.strategy!r}: state is not JSON-able: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        tensors[k] = v
    return st_save(tensors, metadata={META_KEY: text})


def decode_state(
    data: bytes | bytearray | memoryview, source: str = "strategy state"
) -> StrategyState:
    """A state saved by `encode_state`; anything else stops with one `TeeflError` line naming
    ``source`` (the file it came from)."""
    data = bytes(data)
    if len(data) < 8:
        raise TeeflError(f"{source}: not a safetensors file (shorter than its 8-byte header size)")
    hlen = int.from_bytes(data[:8], "little")
    if hlen > len(data) - 8:
        raise TeeflError(f"{source}: not a safetensors file (header of {hlen} bytes does not fit)")
    try:
        header = json.loads(data[8 : 8 + hlen])
        text = header["__metadata__"][META_KEY]
        doc = json.loads(text)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise TeeflError(
            f"{source}: no {META_KEY!r} metadata in its safetensors header (not a strategy state)"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TeeflError(
            f"{source}: state format {doc.get('format') if isinstance(doc, dict) else doc!r}; "
            f"this teefl reads format {FORMAT}"
        )
    name, meta = doc.get("strategy"), doc.get("meta")
    if not isinstance(name, str) or not isinstance(meta, dict):
        raise TeeflError(f"{source}: 'strategy' must be a string and 'meta' an object")
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise TeeflError(f"{source}: malformed tensors: {exc}") from None
    return StrategyState(name, meta, tensors)
