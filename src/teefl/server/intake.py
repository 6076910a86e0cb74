"""What every update shares: receive slots and memory, the checks, the store-count-add step.

One update in transit is an `upload.Upload`, which calls in here: `Intake.open_update` (the checks
that need no payload byte), `Intake.accept` (stored, counted, and the add, possibly deferred until
after the acknowledgement).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from teefl.faults import fault
from teefl.server import receivers
from teefl.server.fairshare import FairShare
from teefl.server.rounds import Rounds
from teefl.server.transfers import Transfer
from teefl.store.files import BufferPool
from teefl.store.rounds import RoundStore
from teefl.store.staging import StagingArea
from teefl.wire import codec, compression, teefl_pb2
from teefl.wire.checks import UpdateRejected
from teefl.wire.failure import checked_failure

log = logging.getLogger("teefl.aggregator")


class StaleUpdate(UpdateRejected):
    """An update for a round that is closed (or not open yet): refused, never counted."""

    stale = True


class SessionEnded(StaleUpdate):
    """An update whose session a newer Join of its collaborator ended: never counted."""


class Intake:
    """What every upload shares: slots, receive memory, the store and the accept step."""

    def __init__(
        self,
        plan: Any,
        rounds: Rounds,
        store: RoundStore,
        recorder: Any,
        check: str,
        staging: StagingArea | None,
        is_current: Any,
    ) -> None:
        fed = plan.federation
        self.plan, self.rounds, self.store, self.rec, self.check = (
            plan,
            rounds,
            store,
            recorder,
            check,
        )
        self.model, self.publisher = rounds.model, rounds.publisher
        self.staging = staging  # shared-memory receive slots (staging.py), or None
        self.is_current = is_current  # (name, token) -> is it the member's latest session?
        self.max_samples = fed.max_samples_per_update
        #: ``federation.memory: flat``: updates received into their mapped files (receivers.py)
        self.flat = fed.memory == "flat"
        self.compression = plan.network.compression
        #: receive slots, shared fairly: one upload per collaborator at a time (fairshare.py)
        self.slots = FairShare(fed.max_inflight_updates)
        self.rx_pool = BufferPool(fed.max_inflight_updates)  # data-plane update buffers

    # -- checks --------------------------------------------------------------------------------
    def open_update(self, name: str, h: Any, transfer: Transfer) -> teefl_pb2.UpdateAck | None:
        """Checks before any payload byte is taken; a duplicate is answered at once (the ack).
        From here the upload is in flight: watched by the idle cut."""
        r = self.rounds
        with r.cond:
            if h.round != r.round or r.done:
                raise StaleUpdate(f"round {h.round} is not open (open round: {r.round})")
            if name in r.received:
                return teefl_pb2.UpdateAck(
                    accepted=True, round=h.round, message="duplicate: already counted once"
                )
            evaluating = r.evaluating
            transfer.touch()
            r.inflight[name] = transfer
        if h.evaluate_only != evaluating:
            raise UpdateRejected("metrics-only report outside the evaluation pass, or vice versa")
        bound = self.max_samples
        if not 0 < int(h.num_samples) <= bound:
            raise UpdateRejected(f"sample count {int(h.num_samples)} outside 1..{bound}")
        if not evaluating and h.format != codec.FORMAT:
            raise UpdateRejected(f"unsupported payload format {h.format!r}")
        return None

    def encoding_of(self, h: Any) -> str:
        """The update's wire encoding, refused unless the plan's compression is that one."""
        want = compression.encoding_of(self.compression)
        if h.encoding != want:
            raise UpdateRejected(
                f"update encoding {h.encoding or 'none'!r}, the plan's network.compression is "
                f"{self.compression!r}"
            )
        if want and h.raw_size > self.publisher.update_limit:  # before anything is received
            raise UpdateRejected(
                f"announced payload of {h.raw_size} bytes exceeds limit "
                f"{self.publisher.update_limit}"
            )
        return want

    def decompressed(self, frame: Any, h: Any) -> tuple[codec.ReceivedPayload, bytes, int]:
        """A received zstd frame (checked against the header's digest) -> the payload in a
        buffer of its own, and the digests it is stored with (computed here)."""
        try:
            raw = compression.decompress(frame, h.raw_size, self.publisher.update_limit)
        except codec.PayloadError as exc:
            raise UpdateRejected(str(exc)) from None
        sha = codec.sha256(raw) if self.check == "sha256" else b""
        return codec.ReceivedPayload(raw), sha, codec.crc32c(raw)

    def report_rejected(self, name: str, rnd: int, exc: UpdateRejected) -> None:
        stale = isinstance(exc, StaleUpdate)
        log.warning(
            "%s update of %s for round %d: %s", "stale" if stale else "rejected", name, rnd, exc
        )
        self.rec.info(
            "update_stale" if stale else "update_rejected",
            collaborator=name,
            round=rnd,
            reason=str(exc),
        )

    def digests(self, sha256: bytes | None, crc: int | None) -> tuple[dict[str, Any], bool]:
        """What an update is stored with, and whether it was checked on arrival: the digest
        that was verified, else (over TLS) the sender's claim -- the CRC32C, faster to replay."""
        if self.check == "sha256":
            return {"sha256": sha256}, True
        if self.check == "crc32c":
            return {"crc32c": crc}, True
        return ({"crc32c": crc} if crc is not None else {"sha256": sha256 or None}), False

    # -- failure reports -----------------------------------------------------------------------
    def report_failure(self, name: str, h: Any, token: bytes | None) -> teefl_pb2.UpdateAck:
        """A failure report of ``name`` (already authenticated, as an update's sender is): its
        form (`checked_failure`: no payload, bounded text), then under the round lock the
        checks an update passes -- the session still its member's latest, the round open, the
        evaluation pass as the header says -- and ``name`` is counted out of the round
        (`Rounds.count_out`). A second report of the same round is a duplicate; a report for a
        round that already holds the party's update (or is receiving it) is refused."""
        phase, summary = checked_failure(h)
        r, rnd = self.rounds, h.round
        with r.cond:
            if token is not None and not self.is_current(name, token):
                raise SessionEnded(f"the session of {name} ended (a newer Join): not counted")
            if rnd != r.round or r.done:
                raise StaleUpdate(f"round {rnd} is not open (open round: {r.round})")
            if h.evaluate_only != r.evaluating:
                raise UpdateRejected(
                    "failure report of the evaluation pass outside it, or vice versa"
                )
            if name in r.failures:
                return teefl_pb2.UpdateAck(
                    accepted=True, round=rnd, message="duplicate: already counted once"
                )
            if name in r.received or name in r.persisting or name in r.inflight:
                raise UpdateRejected(
                    f"round {rnd} holds (or is receiving) an update of {name}: a failure "
                    "report cannot replace it"
                )
            r.count_out(name, phase, summary)
        return teefl_pb2.UpdateAck(accepted=True, round=rnd, message="failure recorded")

    # -- store, count, add ---------------------------------------------------------------------
    def accept(
        self,
        name: str,
        rnd: int,
        state: Any,
        samples: int,
        metrics: dict[str, float],
        payload: Any,
        t0: float,
        digest: bytes | None = None,
        defer_add: bool = False,
        receiver: receivers.MemoryReceiver | None = None,
        crc: int | None = None,
        token: bytes | None = None,
    ) -> tuple[teefl_pb2.UpdateAck, Any]:
        """Store, count and (unless deferred) add one checked update; returns (ack, add).

        ``defer_add``: the add is returned as ``add`` for the caller to run *after* it has sent
        the acknowledgement (the data plane can; a unary gRPC answer cannot). The update is
        stored and counted first, so a crash after the ack still loses nothing, and the round
        does not close before every deferred add has run (`Rounds.close_round`). ``receiver``:
        where it was received (it stores it, `receivers.choose`). ``token``: the session it came
        in on; an update of a session that a newer Join ended meanwhile is not counted.
        """
        r = self.rounds
        receiver = receiver or receivers.MemoryReceiver()
        with r.cond:
            if token is not None and not self.is_current(name, token):
                raise SessionEnded(f"the session of {name} ended (a newer Join): not counted")
            if rnd != r.round:
                raise StaleUpdate(f"round {rnd} closed while the update was in transit")
            if name in r.received or name in r.persisting:
                dup = teefl_pb2.UpdateAck(
                    accepted=True, round=rnd, message="duplicate: already counted once"
                )
                return dup, None
            r.persisting.add(name)
        add = None
        pending = None  # a staged update still to be moved into the run directory
        try:
            if payload is not None:
                # stored before the acknowledgement: a crash after the ack loses nothing
                with self.rec.span("persist_update", round=rnd, collaborator=name) as s:
                    meta = {"samples": samples, "metrics": metrics}
                    digests, verified = self.digests(digest, crc)
                    pending = receiver.commit(
                        self.store, rnd, name, payload, meta, digests, verified
                    )
                    s["bytes"] = len(payload)
            elif state is None:  # an evaluation report: a restart must not wait for it again
                self.store.save_report(rnd, name, {"samples": samples, "metrics": metrics})
            with r.cond:
                if rnd != r.round:
                    if pending is not None:  # back to a free slot before its name is gone
                        pending.slot.unlink()
                    self.store.discard_update(rnd, name)
                    raise StaleUpdate(f"round {rnd} closed while the update was in transit")
                if state is not None and defer_add:
                    r.adding += 1
                    add = self._deferred_add(rnd, name, state, samples, pending)
                    pending = None
                elif state is not None:
                    ta = time.monotonic()
                    self.model.add(state, samples)  # checked in `GlobalModel.decode_update`
                    self.rec.record("aggregate", ta, time.monotonic(), round=rnd, collaborator=name)
                r.received[name] = {"samples": samples, **metrics}
                self.rec.record(
                    "receive_update",
                    t0,
                    time.monotonic(),
                    round=rnd,
                    bytes=len(payload or b""),
                    collaborator=name,
                )
                self.rec.info("update_accepted", collaborator=name, round=rnd)
                log.info("round %d: update from %s (%d samples)", rnd, name, samples)
                if r.complete():
                    # closed right after this acknowledgement is sent: the update is already
                    # stored, and the uploader's time is not spent on our checkpoint
                    r.close_pending = True
                return teefl_pb2.UpdateAck(accepted=True, round=rnd, message="accepted"), add
        finally:
            with r.cond:
                r.persisting.discard(name)

    def _deferred_add(self, rnd: int, name: str, state: Any, samples: int, staged: Any = None):
        """The add, to run after the ACK. Called with the round lock held; the add itself runs
        under ``sum_lock`` only: holding the round lock for its ~50 ms (ResNet-18) stalled every
        other upload's receive loop and every long poll. The round cannot close (and replace the
        accumulator) while ``adding`` counts it. ``staged``: a `StagedUpdate` moved into the run
        directory after the add -- so before the round closes, and long before its checkpoint
        lets the round's updates go."""
        r, model = self.rounds, self.model
        fedavg = model.fedavg

        def add() -> None:
            what = "FedAvg add"
            fault("acked", rnd)  # crash tests: acknowledged and stored, not summed yet
            try:
                with model.sum_lock:
                    ta = time.monotonic()
                    fedavg.add(state, samples, checked=True)
                self.rec.record("aggregate", ta, time.monotonic(), round=rnd, collaborator=name)
                if staged is not None:
                    fault("settle", rnd)  # crash tests: acknowledged, only in shared memory
                    what = "storing"
                    with self.rec.span("settle_update", round=rnd, collaborator=name) as s:
                        staged.settle()
                        s["bytes"] = staged.slot.size
            except BaseException as exc:  # a counted update missing from the sum: fail loudly
                with r.cond:
                    r.failed = f"{what} of {name}'s update for round {rnd} failed: {exc}"
                raise
            finally:
                with r.cond:
                    r.adding -= 1
                    r.cond.notify_all()

        return add
