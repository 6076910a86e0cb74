"""The round state machine: the open round, who is in it, quorum, timeout and close.

Why a condition variable and long polls instead of collaborators polling on a timer: a round opens
the instant the last update is accumulated, and every waiting collaborator learns it within the
same millisecond -- idle time shows up as ``wait`` on the collaborator, never as communication.
`Rounds.cond` is THE round lock: every field below is read and written under it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teefl.errors import TeeflError
from teefl.server.checkpointer import Checkpointer, write_metrics
from teefl.server.model import GlobalModel
from teefl.server.publish import Publisher
from teefl.server.transfers import Transfer, idle_cut
from teefl.transport.base import Aborted, Unauthenticated

log = logging.getLogger("teefl.aggregator")

#: a long poll returns after this long with "nothing new", so dead connections surface
WAIT_KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class Waited:
    """What a long poll learnt: the round to take part in (0: nothing new), or the end."""

    round: int = 0
    done: bool = False
    evaluate_only: bool = False
    durable_round: int = 0
    #: the round's config from the strategy, sent with the round (docs/strategies.md)
    config: dict[str, Any] | None = None


class Rounds:
    """Rounds 1..R, then the final evaluation pass (round R+1)."""

    def __init__(
        self,
        plan: Any,
        recorder: Any,
        run_dir: Path,
        model: GlobalModel,
        publisher: Publisher,
        completed: int,
        closed_before: set[int],
    ) -> None:
        fed = plan.federation
        self.rec, self.run_dir, self.model, self.publisher = recorder, run_dir, model, publisher
        self.total = fed.rounds
        self.names = list(plan.collaborators)
        self.idle_timeout, self.round_timeout = fed.idle_timeout, fed.round_timeout
        self.quorum = fed.min_collaborators or len(self.names)
        self.cond = threading.Condition()
        self.round = completed + 1  # the open round; total+1 is the final evaluation pass
        self.done = False
        self.failed: str | None = None
        self.received: dict[str, dict[str, Any]] = {}
        #: parties counted out of the open round by their own failure report (their workload
        #: code raised): name -> (phase, summary); emptied when the round closes
        self.failures: dict[str, tuple[str, str]] = {}
        #: parties that stopped after a failure report: out of every later round too, until
        #: they join again (a collaborator stops after reporting: `Collaborator._report_failure`)
        self.left: set[str] = set()
        self.told_done: set[str] = set()
        self.joined: set[str] = set()
        #: members whose evidence was refused at a re-attestation, with why: a round does
        #: not wait for them; an accepted Join brings a member back
        self.excluded: dict[str, str] = {}
        self.persisting: set[str] = set()  # updates being written to disk, not yet counted
        self.close_pending = False  # every update is in; the round closes after the last ack
        self.inflight: dict[str, Transfer] = {}  # uploads receiving their bytes, by member
        self.sending: set[Transfer] = set()  # downloads in progress
        self.polls: dict[str, object] = {}  # collaborator -> its one long poll
        self.active = self.peak_active = 0  # updates being received right now, and the peak
        self.adding = 0  # acknowledged updates whose deferred add is still running
        #: the last round whose checkpoint is durable: collaborators keep a copy of each update
        #: they sent until they hear that its round is at most this (docs/reliability.md)
        self.durable_round = completed
        self.closed_before = closed_before  # closed by an earlier process: recorded once
        self.round_opened = time.monotonic()
        self.checkpointer: Checkpointer | None = None  # wired by the builder
        #: counts the stored updates of the open round (`intake.Replay.open_round`)
        self.replay: Callable[[], int] = lambda: 0

    @property
    def evaluating(self) -> bool:
        return self.round == self.total + 1

    # -- callbacks of the checkpointer ---------------------------------------------------------
    def fail(self, reason: str) -> None:
        with self.cond:
            self.failed = reason
            self.cond.notify_all()

    def _fail_run(self, reason: str) -> None:
        """End the run with ``reason`` (lock held): every long poll answers it, `supervise`
        raises it, and the ``run_failed`` event lets `teefl run` show this line rather than
        whichever process happened to exit first."""
        self.failed = reason
        self.rec.info("run_failed", round=self.round, reason=reason)
        self.cond.notify_all()

    def made_durable(self, rnd: int) -> None:
        with self.cond:
            self.durable_round = max(self.durable_round, rnd)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # -- members -------------------------------------------------------------------------------
    def joined_member(self, name: str) -> None:
        with self.cond:
            if not self.joined:  # round 1's clock starts when the federation does
                self.round_opened = time.monotonic()
            self.joined.add(name)
            # back after a failure or a refused attestation: in the rounds to come
            dropped = self.excluded.pop(name, None) is not None
            if name in self.left or dropped:
                self.left.discard(name)
                self._expect_downloads()

    # -- who is in the open round --------------------------------------------------------------
    def out(self) -> set[str]:
        """The parties the open round does not wait for: they reported a failure in it, or in
        an earlier round and have not joined since, or their evidence was refused (at a Join or
        a re-attestation) and no Join was accepted since (lock held)."""
        return set(self.failures) | self.left | set(self.excluded)

    def _expect_downloads(self) -> None:
        """The checkpointer gives way to the downloads of the parties still in (lock held)."""
        if self.checkpointer is not None:
            gone = self.left | set(self.excluded)
            self.checkpointer.expect_downloads(len(set(self.names) - gone))

    def complete(self) -> bool:
        """Whether the open round can close now: every party still in has reported -- its
        update (its evaluation report) or its failure -- and the quorum's updates are in (lock
        held). An update acknowledged before its sender was dropped stays counted."""
        everyone = set(self.names) <= set(self.received) | self.out()
        return everyone and len(self.received) >= self.quorum

    def count_out(self, name: str, phase: str, summary: str) -> None:
        """``name`` reported that its own code failed in the open round (checked by
        `Intake.report_failure`; lock held). It is out of this round and of every later one
        until it joins again. The round closes at once when everyone else has reported; the
        run fails now when the parties left cannot make the quorum (``min_collaborators``, or
        everyone without it) -- waiting for the round's timeout could not change that."""
        rnd, line = self.round, f"{name}: {summary}"
        self.failures[name] = (phase, summary)
        self.left.add(name)
        self._expect_downloads()
        log.warning("round %d: %s", rnd, line)
        self.rec.info("round_failed", collaborator=name, round=rnd, phase=phase, summary=summary)
        possible = len(self.names) - len(self.out())
        if possible < self.quorum:
            self._fail_run(
                f"{line}; round {rnd} cannot reach its quorum: {possible} of {self.quorum} "
                "required updates possible"
            )
        elif self.complete():
            self.close_pending = True  # the reporter's answer first, then the close
        self.cond.notify_all()

    def exclude(self, name: str, why: str) -> None:
        """``name``'s evidence was refused: it is dropped from the open round (and the next
        ones, until an accepted Join), and the round closes as soon as every other member's
        update is in and the quorum is met -- not after ``round_timeout``."""
        with self.cond:
            if self.done:
                return
            self.excluded[name] = why
            self._expect_downloads()
            log.warning(
                "%s is dropped from round %d until it attests again: %s", name, self.round, why
            )
            self.rec.info("dropped", collaborator=name, round=self.round, reason=why)
            if not self.close_pending and not self.failed and self.complete():
                self.close_pending = True
        self.close_soon()

    def position(self, name: str) -> tuple[int, bool, int]:
        """(open round, whether ``name``'s update is in it, durable round), read together."""
        with self.cond:
            return self.round, name in self.received, self.durable_round

    def wait(self, name: str, after: int, current: Callable[[], bool]) -> Waited:
        """Long poll. One per collaborator: a newer poll of the same collaborator makes the older
        one return at once with "nothing new" (a poll holds one of the server's worker threads;
        16 polls of one member held every worker and a Join waited 14 s). ``current``: whether
        the caller's session is still its member's latest."""
        me = object()

        def ready() -> bool:
            # a collaborator that already contributed to the open round (e.g. restarted after
            # its upload was acknowledged) waits for the next one: nothing is counted twice
            return (
                bool(self.done or self.failed)
                or (
                    self.round > after
                    and name not in self.received
                    and name not in self.failures  # out of this round: it reported a failure
                )
                or not current()  # its session ended (a newer Join)
            )

        with self.cond:
            if name in self.polls:
                self.cond.notify_all()  # the older poll sees it is not the newest and returns
            self.polls[name] = me
            try:
                self.cond.wait_for(
                    lambda: ready() or self.polls.get(name) is not me, timeout=WAIT_KEEPALIVE_S
                )
            finally:
                if self.polls.get(name) is me:
                    del self.polls[name]
            if not current():
                raise Unauthenticated(f"the session of {name} ended: Join first")
            if self.failed:
                raise Aborted(f"run failed: {self.failed}")
            if self.done:
                self.told_done.add(name)
                self.cond.notify_all()
                return Waited(done=True, durable_round=self.durable_round)
            if ready():
                config = dict(self.model.round_config)
                return Waited(self.round, False, self.evaluating, self.durable_round, config)
            return Waited(durable_round=self.durable_round)

    # -- transfers -----------------------------------------------------------------------------
    def upload_started(self) -> None:
        with self.cond:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def upload_ended(self, name: str, transfer: Transfer) -> None:
        with self.cond:
            self.active -= 1
            if self.inflight.get(name) is transfer:
                del self.inflight[name]

    def forget(self, name: str, transfer: Transfer) -> None:
        with self.cond:
            if self.inflight.get(name) is transfer:
                del self.inflight[name]

    # -- closing -------------------------------------------------------------------------------
    def close_soon(self) -> None:
        """Close the round in its own thread once every update is in: the uploader that
        completed it is answered without waiting for the close."""
        if self.close_pending:
            threading.Thread(target=self.close_pending_round, name="close-round").start()

    def close_pending_round(self) -> None:
        with self.cond:
            if self.close_pending:
                self.close_round()

    def close_round(self) -> None:
        """Called with the lock held once every collaborator's update is in (or a quorum's, on
        timeout). The round it opens may hold updates already: acknowledged before a crash,
        they are counted now (``replay``), and that round is closed too once complete -- round
        by round, as far as the stored updates go."""
        while self._close_open_round():
            self.replay()
            if not self.complete():
                return

    def _checkpointed(self) -> bool:
        """Wait (lock held, freed while waiting) until the checkpoint being written is done;
        False at once where none is queued, or where the run failed."""
        ckpt = self.checkpointer
        assert ckpt is not None
        seen = ckpt.completed  # first: anything still pending after this is counted above it
        if not ckpt.pending or self.failed:
            return False
        self.cond.wait_for(lambda: ckpt.completed > seen or bool(self.failed))
        return not self.failed

    def _close_open_round(self) -> bool:
        """Close the open round (lock held); True when it opened the next one."""
        rnd = self.round
        ckpt = self.checkpointer
        assert ckpt is not None
        # acknowledged updates may still be being summed (deferred adds); while we wait, the
        # lock is free, so another closer may get there first: then there is nothing to do
        self.cond.wait_for(lambda: self.adding == 0 or self.round != rnd or self.done)
        if self.round != rnd or self.done:
            return False
        self.close_pending = False
        dropped = sorted(set(self.excluded) - set(self.received))
        if dropped:
            log.warning(
                "round %d closes with %d of %d updates; dropped (evidence refused): %s",
                rnd,
                len(self.received),
                len(self.names),
                ", ".join(dropped),
            )
            self.rec.info("round_without_dropped", round=rnd, dropped=dropped)
        self.write_metrics(rnd)
        if self.evaluating:
            # the final model is on disk before anyone hears of the end: its write ran in the
            # background during the evaluation pass (waiting frees the lock for the writer)
            self.cond.wait_for(lambda: ckpt.pending == 0 or bool(self.failed))
            if self.failed:
                return False  # `supervise` ends the run with the failure
            self.done = True
            self.rec.info("evaluation_done", round=rnd)
            self.cond.notify_all()
            return False
        pub = self.publisher
        with self.rec.span("aggregate", round=rnd, final=True):
            # the mean is written run by run straight into the next download's payload where
            # the sums are kept in the model's layout (the layout stays the global model's)
            payload = self.model.aggregate(functools.partial(pub.spare, wait=self._checkpointed))
            # a snapshot (copies) taken right after the result, before the next round begins:
            # it is written with this round's checkpoint, in the background
            strategy_state = self.model.strategy.state()
        with self.rec.span("publish", round=rnd) as s:
            previous = pub.publish(self.model.global_state, payload)
            s["bytes"] = len(pub.payload)
        pub.retire(previous)
        del previous, payload
        # the final round's too: the evaluation pass overlaps it, and ends only once it is
        # durable (above); the run's span ends when the final model is on disk
        ckpt.put(rnd, pub.payload, pub.digest, pub.crc, strategy_state)
        if rnd not in self.closed_before:  # closed again after a restart: recorded once
            self.rec.info("round_closed", round=rnd)
        self.round += 1
        ckpt.new_round()
        self.received = {}
        self.failures = {}
        self.model.new_round(self.round, self.evaluating)
        self.round_opened = time.monotonic()
        self.cond.notify_all()
        return True

    def write_metrics(self, rnd: int) -> None:
        """The closing round's metrics line, with the failures reported in it (lock held)."""
        failed = {n: {"phase": p, "summary": s} for n, (p, s) in sorted(self.failures.items())}
        write_metrics(self.run_dir, "final" if self.evaluating else rnd, self.received, failed)

    # -- supervision ---------------------------------------------------------------------------
    def _cut_idle(self, now: float) -> None:
        """Cut every upload and download that moved no byte for ``idle_timeout`` (a dead or
        stalled peer, not a slow one: see `Transfer`); its connection is closed or its RPC
        cancelled, so the peer sees the end, and its slot is given back. Lock held."""
        idle_limit = self.idle_timeout
        for transfer in [*self.inflight.values(), *self.sending]:
            # a data-plane upload's own receive times out after idle_timeout and answers the
            # peer why (intake); this is its backstop, the only cut of everything else
            backstop = transfer.kind == "upload" and transfer.probe is not None
            if transfer.cut or transfer.idle_for(now) <= idle_limit * (2 if backstop else 1):
                continue
            idle_cut(transfer, idle_limit, self.rec)
            transfer.cancel()
            if self.inflight.get(transfer.name) is transfer:
                del self.inflight[transfer.name]
            self.sending.discard(transfer)

    def supervise(self) -> None:
        """Enforce the round timeout: close with a quorum, or fail the run naming who is missing."""
        timeout, quorum = self.round_timeout, self.quorum
        with self.cond:
            while not self.done:
                self.cond.wait(timeout=0.5)
                if self.failed:  # a checkpoint or a deferred add failed: the run cannot go on
                    raise TeeflError(self.failed)
                now = time.monotonic()
                self._cut_idle(now)
                if self.done or self.close_pending or now - self.round_opened <= timeout:
                    continue
                if self.inflight:  # transfers still moving bytes are not killed by the deadline
                    continue
                out = self.out()
                missing = sorted(set(self.names) - set(self.received) - out)
                if len(self.received) >= quorum and (self.received or self.evaluating):
                    log.warning(
                        "round %d closed on timeout with %d of %d updates; missing: %s%s",
                        self.round,
                        len(self.received),
                        len(self.names),
                        ", ".join(missing),
                        f"; failed: {', '.join(sorted(out))}" if out else "",
                    )
                    self.rec.info("round_quorum", round=self.round, missing=missing)
                    self.close_round()
                    continue
                failed = f"; failed: {', '.join(sorted(out))}" if out else ""
                self._fail_run(
                    f"round {self.round} timed out after {timeout:g} s with "
                    f"{len(self.received)} of {quorum} required updates; "
                    f"missing: {', '.join(missing)}{failed}"
                )
                raise TeeflError(self.failed)
            # let every collaborator hear that the run is over (bounded); one that stopped
            # after a failure report will not ask
            deadline = time.monotonic() + 10.0
            # (nor one dropped for its evidence)
            while (
                set(self.names) - self.told_done - self.left - set(self.excluded)
                and time.monotonic() < deadline
            ):
                self.cond.wait(timeout=0.2)
