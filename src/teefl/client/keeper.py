"""The collaborator's side of end-to-end durability (docs/reliability.md, "End-to-end
durability"): an acknowledged update is kept until its round's checkpoint is durable, and the
update being sent is remembered until it is acknowledged. After an aggregator restart that lost
one (a host restart empties its staging), its Join reply says so and the same bytes go again.

Pure bookkeeping, no I/O: what to send again is decided here (`Keeper.after_join`), the sending
is the session's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from teefl.wire import teefl_pb2


@dataclass(frozen=True)
class Resync:
    """What a Join reply asks of the collaborator: ``last`` is the round it now counts as done
    (WaitRound asks for the round after it); ``resend`` the round whose kept update goes again
    (None: nothing to send)."""

    last: int
    resend: int | None = None


class Keeper:
    """``kept``: round -> (header, payload) of updates acknowledged but not yet durable;
    ``pending``: (round, header, payload) of the upload under way, sent again after a loss."""

    def __init__(self, resident_payload: Any = None, copy: Any = bytes) -> None:
        #: the resident model's memory (`ResidentModel.payload`), overwritten by every download:
        #: a payload that is this memory is copied when kept -- by ``copy`` (``bytes``: in
        #: memory; `teefl.store.paged.spill` under ``federation.memory: flat``: into a file)
        self.resident_payload = resident_payload
        self.copy_out = copy
        self.kept: dict[int, tuple[teefl_pb2.Header, Any]] = {}
        self.pending: tuple[int, teefl_pb2.Header, Any] | None = None

    def sending(self, r: int, header: teefl_pb2.Header, payload: Any) -> None:
        """An upload of round ``r`` starts: its bytes go again if it breaks off."""
        self.pending = (r, header, payload)

    def refused(self) -> None:
        """The upload under way was refused as stale: nothing of it is needed any more."""
        self.pending = None

    def acked(self, r: int, header: teefl_pb2.Header, payload: Any) -> None:
        """Keep the acknowledged update of round ``r``. The model's own memory is copied -- the
        next download overwrites it; other payloads are fresh buffers of their own and kept as
        they are. Called after the ACK: off the transfer path."""
        resident = self.resident_payload
        if resident is not None and payload is resident:
            payload = self.copy_out(payload)
        self.kept[r] = (header, payload)
        self.pending = None

    def forget(self, durable_round: int) -> None:
        """Drop the kept copies of rounds whose checkpoint is durable: no restart needs them."""
        for r in [r for r in self.kept if r <= durable_round]:
            del self.kept[r]

    def copy(self, r: int) -> tuple[teefl_pb2.Header, Any] | None:
        """The kept (header, payload) of round ``r``, if any."""
        return self.kept.get(r)

    def after_join(self, reply: teefl_pb2.JoinReply, last: int) -> Resync:
        """Line up with the round a (re)joined aggregator has open.

        A restarted aggregator may be back at a round this collaborator already contributed to
        (its acknowledged update lost with the host's staging, or the round's close not
        durable). If it does not hold our update for that round, the kept copy -- or the one
        whose upload broke off -- is sent again, bit for bit; without a copy the round is done
        again (training is seeded by round, so it gives the same update). The evaluation pass
        (round ``rounds + 1``) is never answered from a kept update."""
        self.forget(reply.durable_round)
        r, rounds = reply.current_round, reply.rounds
        if reply.holds_update:
            self.pending = None
            return Resync(last=r)
        if self.pending is not None and self.pending[0] == r and r not in self.kept:
            self.kept[r] = self.pending[1:]  # its upload broke off: the same bytes again
        if 0 < r <= rounds and r in self.kept:
            return Resync(last=last, resend=r)
        # nothing to send for the open round: take part in it (again, if we had)
        return Resync(last=min(last, r - 1))
