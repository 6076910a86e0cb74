"""Slots shared fairly between the members of a federation (upload and download slots).

Why: the aggregator bounds what it does at once (``max_inflight_updates`` receive slots,
``max_concurrent_downloads`` send slots) so its memory stays bounded whatever the federation's
size. Shared first come, first served, one member -- buggy or hostile -- could take every slot
with transfers that never move (4 stalled uploads held every other upload's GO until
``idle_timeout`` cut them; 4 readers that stopped reading held every download). Here each member
holds or waits for at most ``per_member`` slots at once: a legitimate collaborator never has more
than one upload or download in flight, so the others always find the rest of the slots.

A member's newer request *supersedes* its oldest when it would exceed its share: an older
waiting request is woken with `Superseded`, an older holder is cancelled (its connection cut or
its RPC cancelled) and its slot is granted to the newer one as soon as it is given back. Why the
newer wins rather than the older: a collaborator that lost its connection and came back has its
old transfer still registered here until the dead connection is noticed; the request it makes
now is the one it waits for. Only the member itself can supersede its own requests, so nobody
else is hurt by it. Waiting requests are granted in arrival order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Superseded(Exception):
    """A newer request of the same member took this waiting request's place."""


class Ticket:
    """One member's request for a slot: waiting, then holding, until released."""

    __slots__ = ("cancel", "held", "member", "superseded")

    def __init__(self, member: str, cancel: Callable[[], None]) -> None:
        self.member, self.cancel = member, cancel
        self.held = False
        self.superseded = False


class FairShare:
    """``capacity`` slots; each member holds or waits for at most ``per_member`` of them."""

    def __init__(self, capacity: int, per_member: int = 1) -> None:
        if capacity < 1 or per_member < 1:
            raise ValueError("capacity and per_member must be at least 1")
        self.capacity, self.per_member = capacity, per_member
        self._cond = threading.Condition()
        self._queue: list[Ticket] = []  # waiting, in arrival order
        self._live: dict[str, list[Ticket]] = {}  # a member's requests not superseded, oldest first
        self._held: dict[str, int] = {}  # slots a member holds (superseded holders included)
        self.held = 0  # slots held in all
        self.peak = 0

    def acquire(self, member: str, cancel: Callable[[], None]) -> Ticket:
        """Wait for a slot; ``cancel()`` cuts this request's transfer if a newer request of the
        same member supersedes it while it holds the slot. Raises `Superseded` if that happens
        while it waits."""
        ticket = Ticket(member, cancel)
        cancels: list[Callable[[], None]] = []
        with self._cond:
            live = self._live.setdefault(member, [])
            live.append(ticket)
            while len(live) > self.per_member:
                old = live.pop(0)
                old.superseded = True
                if old.held:
                    cancels.append(old.cancel)  # it gives its slot back once it has unwound
                else:
                    self._queue.remove(old)
            self._queue.append(ticket)
            self._grant()
        for cut in cancels:  # outside the lock: a cancel may take locks of its own
            cut()
        with self._cond:
            self._cond.wait_for(lambda: ticket.held or ticket.superseded)
            if ticket.held:
                return ticket
            raise Superseded(f"superseded by a newer request of {member}")

    def release(self, ticket: Ticket) -> None:
        """Give the slot back (idempotent; a ticket that never got its slot is forgotten)."""
        with self._cond:
            live = self._live.get(ticket.member, [])
            if ticket in live:
                live.remove(ticket)
            if not live:
                self._live.pop(ticket.member, None)
            if ticket in self._queue:
                self._queue.remove(ticket)
                ticket.superseded = True
            if ticket.held:
                ticket.held = False
                self.held -= 1
                left = self._held[ticket.member] - 1
                if left:
                    self._held[ticket.member] = left
                else:
                    del self._held[ticket.member]
            self._grant()

    def holders(self, member: str) -> int:
        with self._cond:
            return self._held.get(member, 0)

    def _grant(self) -> None:
        """Grant waiting requests in arrival order while slots are free and the member is under
        its share (a superseded holder still counts until it gives its slot back)."""
        for ticket in list(self._queue):
            if self.held >= self.capacity:
                break
            if self._held.get(ticket.member, 0) >= self.per_member:
                continue
            self._queue.remove(ticket)
            ticket.held = True
            self._held[ticket.member] = self._held.get(ticket.member, 0) + 1
            self.held += 1
            self.peak = max(self.peak, self.held)
        self._cond.notify_all()  # the granted, and the superseded waiters, wake up
