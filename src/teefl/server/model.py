"""The global model and the open round's accumulator: the one seam where the strategy plugs in.

Why one place: the plan's strategy (docs/strategies.md) is asked for the round's config, the
round's accumulator and its mean only here; the rest of the server sees ``acc.layout`` and never
which strategy it runs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from teefl.errors import TeeflError
from teefl.strategy import RoundConfig, Strategy, check_round_config
from teefl.wire import codec
from teefl.wire.checks import FiniteScan, FlatUpdate, UpdateRejected, check_update


class GlobalModel:
    """The global state, its payload layout, the strategy and the round's accumulator
    (``fedavg``, whatever the strategy) with the config its collaborators train with."""

    def __init__(
        self, strategy: Strategy, state: dict[str, torch.Tensor], rnd: int, evaluating: bool
    ) -> None:
        self.strategy = strategy
        self.round_config: RoundConfig = {}
        self.global_state = state
        self.sum_lock = threading.Lock()  # serializes adds (deferred adds run outside the lock)
        self.layout: codec.Layout | None = None
        self._layout_for: Any = None
        self.fedavg: Any = None
        self.new_round(rnd, evaluating)

    def new_round(self, rnd: int, evaluating: bool) -> None:
        """Begin round ``rnd``: its config (none in the evaluation pass) and its accumulator.
        Beginning a round ends the previous one's accumulator: FedAvg (and FedOpt) take its
        sums over, their pages mapped already."""
        if evaluating:
            self.round_config = {}
        else:
            config = self.strategy.configure(rnd)
            self.round_config = check_round_config(config, self.strategy.name)
        self.fedavg = self.strategy.begin(rnd, self.global_state, self.model_layout())

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
        return self.fedavg.layout

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

    def finite_scan(self, total_size: int) -> FiniteScan | None:
        """The finiteness check to run while an update of the global model's size arrives."""
        layout = self.flat_layout
        if layout is None or total_size != layout.size:
            return None
        return FiniteScan(layout)

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
