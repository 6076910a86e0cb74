"""The background checkpoint writer, which gives way to moving transfers, and the metrics line.

Why in the background: the fsync'd write of a 45 MB checkpoint took 300-500 ms, during which no
collaborator could start the next round. The next round opens as soon as the new model is
serialized; a crash before the checkpoint is durable loses nothing either, because the round's
acknowledged updates stay on disk until then: a restart resumes from the previous checkpoint and
closes the round again from the same updates (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from teefl.faults import fault
from teefl.rundir import RunDir
from teefl.store.rounds import RoundStore
from teefl.strategy import StrategyState, encode_state
from teefl.wire import codec

log = logging.getLogger("teefl.aggregator")


class Checkpointer:
    """Writes closed rounds' checkpoints in order, in its own thread.

    ``failed(reason)`` is called when a checkpoint cannot be written (the run cannot go on),
    ``durable(rnd)`` once round ``rnd``'s checkpoint is on disk, ``written()`` after every item
    (the evaluation pass's close may be waiting for the queue to drain).
    """

    def __init__(
        self,
        store: RoundStore,
        recorder: Any,
        run_dir: Path,
        rounds: int,
        members: int,
        strategy: str,
        failed: Callable[[str], None],
        durable: Callable[[int], None],
        written: Callable[[], None],
    ) -> None:
        self.store, self.rec, self.run_dir = store, recorder, run_dir
        self.rounds, self.members, self.strategy = rounds, members, strategy
        self._failed, self._durable, self._written = failed, durable, written
        self.t_start = time.monotonic()  # the run's start (set by `Aggregator.serve`)
        self.quiet = threading.Condition()  # guards transfers/served; notified when they change
        self.transfers = 0  # model or update bytes moving right now (the checkpoint yields)
        self.served = 0  # downloads of the open round's model completed so far
        #: checkpoints of closed rounds waiting to be written
        self.queue: queue.Queue[tuple[int, codec.Buffer, bytes, int, StrategyState]] = queue.Queue()
        #: checkpoints queued so far, and of those written (or failed), counted before `written`
        #: is called: their difference is what `pending` says (`Rounds` waits on both)
        self.queued = 0
        self.completed = 0
        threading.Thread(target=self._run, name="checkpoint", daemon=True).start()

    def put(
        self, rnd: int, payload: codec.Buffer, digest: bytes, crc: int, state: StrategyState
    ) -> None:
        """Queue round ``rnd``'s checkpoint with the strategy's state after that round."""
        self.queued += 1
        self.queue.put((rnd, payload, digest, crc, state))

    @property
    def pending(self) -> int:
        """Checkpoints queued or being written: zero from the moment the last one is counted
        `completed` (not only once the queue marks it done, a moment later -- a waiter that
        read the two at different moments would wait for a write that had already happened)."""
        return self.queued - self.completed

    def join(self) -> None:
        self.queue.join()

    # -- transfers the writer gives way to -----------------------------------------------------
    @contextlib.contextmanager
    def moving(self) -> Iterator[None]:
        """Counts a download or an upload whose bytes are moving (see `give_way`)."""
        with self.quiet:
            self.transfers += 1
        try:
            yield
        finally:
            with self.quiet:
                self.transfers -= 1
                self.quiet.notify_all()

    def download_served(self) -> None:
        with self.quiet:
            self.served += 1
            self.quiet.notify_all()

    def new_round(self) -> None:
        self.served = 0

    def expect_downloads(self, members: int) -> None:
        """How many downloads of each new model to give way to: fewer while parties are out
        after a failure report (`Rounds.count_out`) or dropped for their evidence
        (`Rounds.exclude`) -- they download nothing, and waiting for them would hold every
        slice of every checkpoint for `give_way`'s 2 s."""
        with self.quiet:
            self.members = members
            self.quiet.notify_all()

    def give_way(self) -> None:
        """Between two slices of a background checkpoint: wait while a model or an update is on
        the move (for at most 2 s, so a checkpoint is never starved for good): the writes'
        page-cache copies and writeback slow the next round's transfers (docs/benchmarks.md)."""
        with self.quiet:  # no polling: a thread waking every few ms costs the others the GIL
            self.quiet.wait_for(
                lambda: not self.transfers and self.served >= self.members, timeout=2.0
            )

    # -- the writer ----------------------------------------------------------------------------
    def write(
        self,
        rnd: int,
        payload: codec.Buffer,
        digest: bytes,
        crc: int,
        strategy_state: StrategyState | None = None,
    ) -> None:
        """One checkpoint, written in slices that give way to transfers, with the strategy's
        state after its round (a stateless strategy's empty state is only named in the resume
        pointer)."""

        def pause() -> None:
            fault("checkpoint", rnd)  # crash tests: killed mid-write, the checkpoint not durable
            self.give_way()

        with self.rec.span("checkpoint", round=rnd) as s:
            st = strategy_state or StrategyState(self.strategy)
            self.store.save_checkpoint(
                rnd,
                payload,
                final=rnd == self.rounds,
                sha256=digest or None,
                crc32c=crc,
                pause=pause,
                strategy=st.strategy,
                strategy_state=encode_state(st) if st.meta or st.tensors else None,
            )
            s["bytes"] = len(payload)
        fault("durable", rnd)  # crash tests: the checkpoint and its strategy state are durable
        if rnd == self.rounds:
            self.rec.record("run", self.t_start, time.monotonic())
            self.rec.info("final_model_written", path=str(self.store.final_path()))
        # only now: until its checkpoint is durable, a restart rebuilds the round from these
        # (after the final round no round reuses their files: the spares go too)
        self.store.drop_updates(rnd, last=rnd == self.rounds)
        RunDir(self.run_dir).update(rounds_completed=rnd)  # where a crash leaves the run
        self._durable(rnd)  # collaborators may drop their copies of this round's updates now

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                self._write_item(item)
            finally:
                item = None  # no reference to the written payload waits here for the next one
                self.completed += 1
                self.queue.task_done()
                self._written()

    def _write_item(self, item: tuple[int, codec.Buffer, bytes, int, StrategyState]) -> None:
        rnd, payload, digest, crc, state = item
        try:
            self.write(rnd, payload, digest, crc, state)
        except Exception as exc:  # a checkpoint that cannot be written fails the run
            log.error("checkpoint of round %d failed: %s", rnd, exc)
            self._failed(f"checkpoint of round {rnd} could not be written: {exc}")


def write_metrics(
    run_dir: Path,
    label: int | str,
    received: dict[str, dict[str, Any]],
    failed: dict[str, dict[str, str]] | None = None,
) -> None:
    """Append a round's metrics line: each member's numbers and their sample-weighted mean,
    and (``failed``, when any) the members counted out by a failure report: phase and summary.
    A round closed again after a restart finds its line removed by `RoundStore.clean_up`."""
    total = sum(m["samples"] for m in received.values()) or 1
    keys = sorted({k for m in received.values() for k in m if k != "samples"})
    weighted = {
        k: sum(m.get(k, 0.0) * m["samples"] for m in received.values()) / total for k in keys
    }
    line: dict[str, Any] = {"round": label, "collaborators": received, "weighted": weighted}
    if failed:
        line["failed"] = failed
    RunDir(run_dir).append_metrics(line)
