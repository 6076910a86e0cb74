"""Counting what the run directory holds for the open round: after a restart, and after every
round close (the next round's updates acknowledged before a crash)."""

from __future__ import annotations

import logging
from typing import Any

from teefl.server.rounds import Rounds
from teefl.store.rounds import RoundStore
from teefl.wire import codec
from teefl.wire.checks import UpdateRejected, check_update

log = logging.getLogger("teefl.aggregator")


class Replay:
    def __init__(self, plan: Any, rounds: Rounds, store: RoundStore, recorder: Any) -> None:
        self.rounds, self.store, self.rec = rounds, store, recorder
        self.bound = plan.federation.max_samples_per_update
        self.resumed_from: int | None = None  # set by the builder (see `Aggregator`)

    def open_round(self, startup: bool = False) -> int:
        """Count the updates the run directory holds for the open round, once each; returns
        how many. Every bound an update was checked against on arrival is checked again (the
        files may have been edited since): its collaborator, its sample count, its metrics, its
        layout, shapes, dtypes and finiteness; one that fails is dropped and its collaborator
        may send it again (it is not counted)."""
        r, model, bound = self.rounds, self.rounds.model, self.bound
        rnd, n = r.round, 0
        for saved in self.store.load_updates(rnd, drop=self.dropped):
            name, meta = saved.name, saved.meta
            try:
                if name not in r.names:
                    raise UpdateRejected(f"{name!r} is not a collaborator of this plan")
                if bool(meta.get("report")) != r.evaluating:
                    raise UpdateRejected("an evaluation report outside the evaluation pass")
                samples, metrics = meta.get("samples"), meta.get("metrics", {})
                if type(samples) is not int or not 0 < samples <= bound:
                    raise UpdateRejected(f"sample count {samples!r} outside 1..{bound}")
                if not isinstance(metrics, dict) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
                ):
                    raise UpdateRejected("its metrics are not numbers")
                state = None
                if not r.evaluating and not isinstance(saved.payload, bytes):
                    # mapped from its file (federation.memory: flat): checked and summed as it
                    # arrived, a FlatUpdate whose pages are given back as it is read
                    state = model.decode_update(saved.payload)[1]
                elif not r.evaluating:
                    try:
                        state = codec.decode_state(saved.payload)
                    except codec.PayloadError as exc:
                        raise UpdateRejected(str(exc)) from None
                    check_update(model.global_state, state)
            except UpdateRejected as exc:
                log.warning("stored update of %s for round %d not counted: %s", name, rnd, exc)
                self.store.discard_update(rnd, name)
                self.dropped(name, str(exc))
                continue
            if name in r.received:  # cannot be: the round was opened (or resumed) just now
                continue
            if state is not None:
                model.add(state, samples)
            r.received[name] = {"samples": samples, **metrics}
            self.rec.info("update_replayed", collaborator=name, round=rnd)
            n += 1
        if startup and (n or self.resumed_from is not None):
            log.warning(
                "resumed after round %s; %d acknowledged update(s) of round %d replayed",
                self.resumed_from if self.resumed_from is not None else 0,
                n,
                rnd,
            )
        elif n:
            log.warning("%d acknowledged update(s) of round %d replayed from %s", n, rnd, r.run_dir)
        return n

    def dropped(self, name: str, reason: str) -> None:
        """A stored update not counted after all: an event."""
        self.rec.info("update_dropped", collaborator=name, round=self.rounds.round, reason=reason)
