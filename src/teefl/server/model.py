"""The global model and the open round's accumulator: the one seam where the strategy plugs in.

Why one place: the aggregation strategy (today `fedavg.make_aggregator`) is chosen, reused and
asked for its mean only here, so a strategy object replaces these few lines and nothing else.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from teefl.errors import TeeflError
from teefl.federation.fedavg import RunningFedAvg, make_aggregator
from teefl.wire import codec
from teefl.wire.checks import FiniteScan, FlatUpdate, UpdateRejected, check_update


class GlobalModel:
    """The global state, its payload layout and the round's accumulator (``fedavg``)."""

    def __init__(self, federation: Any, state: dict[str, torch.Tensor]) -> None:
        self.fed = federation
        self.global_state = state
        self.sum_lock = threading.Lock()  # serializes adds (deferred adds run outside the lock)
        self.layout: codec.Layout | None = None
        self._layout_for: Any = None
        self.fedavg: Any = None
        self.fedavg = self.new_round()

    def new_round(self) -> Any:
        """The accumulator of a new round; a flat FedAvg reuses the finished round's sums."""
        old = self.fedavg
        return make_aggregator(
            self.global_state,
            self.fed.aggregation,
            self.fed.trim_ratio,
            layout=self.model_layout(),
            reuse=old if isinstance(old, RunningFedAvg) else None,
        )

    def reset(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the global state (a resumed checkpoint, or a benchmark's own model)."""
        self.global_state = state
        self.fedavg = None
        self.fedavg = self.new_round()

    def model_layout(self) -> codec.Layout | None:
        """The global model's payload layout, computed again only when the global state was
        replaced by something other than a payload of that layout."""
        if self._layout_for is not self.global_state:
            self.layout = codec.Layout.of_state(self.global_state)
            self._layout_for = self.global_state
        return self.layout

    @property
    def flat_layout(self) -> codec.Layout | None:
        """The layout the accumulator sums in (flat fast path), else None."""
        return self.fedavg.layout if isinstance(self.fedavg, RunningFedAvg) else None

    def add(self, state: Any, samples: int, into: Any = None) -> None:
        """Sum one checked update (into ``into``: the accumulator it was acknowledged for)."""
        with self.sum_lock:
            (self.fedavg if into is None else into).add(state, samples, checked=True)

    def aggregate(self, spare: Any) -> codec.Buffer | None:
        """Close the round's sum into the new global state. Where the sums are kept in the
        model's layout the mean is written straight into ``spare(layout)``, the next download's
        payload (returned); else None and the state is serialized by the publisher."""
        layout = self.flat_layout
        if layout is not None:
            payload = spare(layout)
            self.fedavg.result_into(layout.run_views(payload))
            self.global_state = self._layout_for = layout.tensor_views(payload)
            self.layout = layout
            return payload
        self.global_state = self.fedavg.result()
        return None

    def finite_scan(self, total_size: int, buffer: Any) -> FiniteScan | None:
        """The finiteness check to run while an update of the global model's size arrives."""
        layout = self.flat_layout
        if layout is None or buffer is None or total_size != layout.size:
            return None
        return FiniteScan(layout, buffer)

    def decode_update(
        self, payload: Any, owned: bool = False, scan: FiniteScan | None = None
    ) -> tuple[Any, Any]:
        """The checked update: a `FlatUpdate` where the payload has exactly the global model's
        layout (its header bytes prove names, dtypes and shapes; one finiteness check, or the
        ``scan`` made while it arrived); else decoded and checked tensor by tensor (which also
        names the offending tensor). ``owned``: see `codec.decode_state`."""
        layout = self.flat_layout
        if layout is not None and layout.matches(payload):
            flat = FlatUpdate(layout, payload)
            if (scan is not None and scan.finite()) or flat.finite():
                return payload, flat
        try:
            state = codec.decode_state(payload, owned=owned)
        except codec.PayloadError as exc:
            raise UpdateRejected(str(exc)) from None
        check_update(self.global_state, state)  # before anything is stored or summed
        return payload, state


def resumed_state(
    fresh: dict[str, torch.Tensor], payload: bytes, run_dir: Path
) -> dict[str, torch.Tensor]:
    """The checkpoint a restart resumes from, refused unless it fits the plan's model."""
    try:
        state = codec.decode_state(payload)
        check_update(fresh, state)
    except (codec.PayloadError, UpdateRejected) as exc:
        raise TeeflError(
            f"cannot resume from {run_dir / 'state.json'}: its checkpoint does not fit "
            f"the plan's model ({exc})"
        ) from None
    return state
