"""An upload or a download in progress, and the idle cut that ends one that moves no byte."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("teefl.aggregator")


class Transfer:
    """An upload or a download in progress, as the idle cut (`Rounds.supervise`) sees it.

    Idle means that no byte moved for ``idle_timeout``, however slowly bytes move: ``probe``
    reads the connection's byte counters from the kernel (`framing.tcp_moved`, data plane
    only), ``touch`` notes progress the transfer reports itself (a piece received or sent, a
    gRPC message); both cost a few attribute stores, no lock.
    """

    __slots__ = ("cancel", "cut", "kind", "last", "moved", "name", "probe", "round")

    def __init__(self, kind: str, name: str, rnd: int, cancel: Any, probe: Any = None) -> None:
        self.kind, self.name, self.round, self.cancel, self.probe = kind, name, rnd, cancel, probe
        self.last = time.monotonic()
        self.moved = probe() if probe is not None else None
        self.cut = False  # cut by the idle cut or superseded: the handler says so, not "broke"

    def touch(self) -> None:
        self.last = time.monotonic()

    def supersede(self) -> None:
        """A newer transfer of the same collaborator takes this one's slot (fairshare.py)."""
        if not self.cut:
            self.cut = True
            log.info(
                "%s of %s for round %d cut: a newer one of %s came",
                self.kind,
                self.name,
                self.round,
                self.name,
            )
            self.cancel()

    def idle_for(self, now: float) -> float:
        if self.probe is not None:
            moved = self.probe()
            if moved is not None and moved != self.moved:
                self.moved, self.last = moved, now
        return now - self.last


def idle_cut(transfer: Transfer, idle: float, recorder: Any) -> None:
    """Say (once) that a transfer moved no byte for ``idle`` seconds and is cut off."""
    if transfer.cut:
        return
    transfer.cut = True
    log.warning(
        "%s of %s for round %d moved no byte for %g s: cut off",
        transfer.kind,
        transfer.name,
        transfer.round,
        idle,
    )
    recorder.info(
        f"{transfer.kind}_idle_cut", collaborator=transfer.name, round=transfer.round, idle_s=idle
    )
