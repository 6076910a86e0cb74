"""A collaborator: joins once, then for each round downloads, validates, trains, validates, uploads.

The parts: the `Session` (attest, join, rejoin with backoff, resync after an aggregator restart),
the `Keeper` (updates kept until their round is durable), the `ResidentModel` (the model inside
its wire payload: downloads land in it, uploads send it), a `Trainer` (local training; default
`WorkloadTrainer`) and a transport (`teefl.transport.client`; default the plan's). This module is
only the loop that strings them together.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from teefl.client.keeper import Keeper
from teefl.client.resident import ResidentModel
from teefl.client.session import LOSS_ERRORS, Session
from teefl.client.trainer import Trainer, WorkloadTrainer, flat
from teefl.errors import TeeflError
from teefl.measure.events import EventRecorder
from teefl.plan import Plan
from teefl.security import session as session_keys
from teefl.store.paged import spill
from teefl.transport.channels import payload_check
from teefl.transport.client import (
    ClientTransport,
    GetModel,
    PutUpdate,
    Reattest,
    Report,
    Stale,
    WaitRound,
)
from teefl.transport.grpc_client import GrpcClient
from teefl.wire import codec, compression, roundconfig, teefl_pb2
from teefl.wire.failure import failure_header
from teefl.workload.api import check_layout
from teefl.workload.failure import WorkloadFailure

log = logging.getLogger("teefl.collaborator")


class Collaborator:
    """One party holding a private shard of the data.

    ``trainer``: the local training (default: the plan's workload, `WorkloadTrainer`; its
    ``data_dir``/``data_mode`` as `teefl.workload.api.Party` says);
    ``transport``: how it reaches the aggregator (default: `GrpcClient`, the gRPC control plane
    with the data plane the plan names).
    """

    def __init__(
        self,
        plan: Plan,
        name: str,
        address: str,
        run_dir: Path,
        data_dir: Path | None = None,
        *,
        data_mode: str = "auto",
        trainer: Trainer | None = None,
        transport: ClientTransport | None = None,
    ) -> None:
        if name not in plan.collaborators:
            raise TeeflError(
                f"collaborator {name!r} is not in the plan (plan lists: "
                f"{', '.join(plan.collaborators)})"
            )
        self.plan, self.name, self.address = plan, name, address
        self.run_dir = Path(run_dir)
        self.index = plan.collaborators.index(name)
        self.process = f"collaborator-{name}"
        if trainer is None:
            from teefl.workload.resolve import plan_workload

            trainer = WorkloadTrainer(plan, self.index, plan_workload(plan), data_dir, data_mode)
        self.trainer = trainer
        self.rec: EventRecorder | None = None
        self.check = payload_check(plan)  # the SHA-256 of uploads only where it is checked
        #: the TLS key of this collaborator's model traffic when it must attest: made here, in
        #: memory (in its TEE), never written anywhere; the evidence at Join is bound to it
        att = plan.security.attestation
        key = session_keys.new_key() if att.collaborators == "required" else None
        if transport is None:
            transport = GrpcClient(plan, name, address, key)  # the data plane the plan names
        self.transport = transport
        self.keeper = Keeper()
        if plan.federation.memory == "flat":  # kept updates in files, not beside the model
            self.keeper.copy_out = functools.partial(spill, directory=self.run_dir)
        self.session = Session(plan, name, address, self.run_dir, transport, self.keeper, key)
        #: the model's tensors inside its wire payload (None on a GPU, or for a model whose
        #: tensors cannot be moved there): downloads land in the model, uploads send it as is
        self.resident: ResidentModel | None = None
        self.last = 0  # the last round this collaborator completed

    def run(self) -> str:
        """Take part in the whole run; returns the run id.

        A lost aggregator (restart, network drop) is not fatal: the collaborator rejoins with
        backoff for up to ``federation.reconnect_timeout`` seconds and carries on from the last
        round it completed. The workload's own code raising is: see `_report_failure`.
        """
        t0 = time.monotonic()
        try:
            self.model = self.trainer.setup()
        except WorkloadFailure as exc:  # before joining: nothing to report to, only the log
            _log_failure(exc)
            raise
        workload = getattr(self.trainer, "workload", None)
        self.session.workload_digest = getattr(workload, "digest", "") or ""
        #: the names that travel, where the workload sends a subset (LoRA adapters); else None
        self.travelling: list[str] | None = getattr(self.trainer, "travelling", None)
        self.resident = ResidentModel.bind(self.model, self.travelling)
        self.keeper.resident_payload = self.resident.payload if self.resident else None
        t_data = time.monotonic()
        try:
            self.session.connect(60.0)
            t_conn = time.monotonic()
            renew: Reattest | None = None  # why the next Join renews our attestation
            while True:
                try:
                    reply = self._join(renew, t_conn)
                    self._joined(reply, t0, t_data, t_conn, renew)
                    renew = None
                    assert self.rec is not None
                    self.last = self.session.resync(reply, self.last, self.rec)
                    self._loop(reply.rounds)
                    return reply.run_id
                except Reattest as exc:  # reattest_every: fresh evidence now, no backoff
                    log.info("%s: attesting again before round %d: %s", self.name, exc.round, exc)
                    renew = exc
                    t_conn = time.monotonic()
                except LOSS_ERRORS as exc:  # whatever broke the connection: rejoin
                    # (a renewal cut off, e.g. by the aggregator's quote rate limit, is still
                    # one when it is tried again)
                    self.session.lost(exc, self.rec)
                    t_conn = time.monotonic()
        finally:
            self.session.close()
            if self.rec is not None:
                self.rec.close()

    def _join(self, renew: Reattest | None, t_conn: float) -> teefl_pb2.JoinReply:
        """The session's Join. A re-attestation that fails (our evidence refused, or the
        aggregator's no longer verifying) is recorded as a refused ``attest`` span, and the run
        ends with one line saying so: the aggregator has ended our session, so no model byte
        comes to us and no update of ours is taken."""
        if renew is None:
            return self.session.join()
        try:
            return self.session.join(reattest=renew.round)
        except TeeflError as exc:
            if self.rec is not None:
                self.rec.record(
                    "attest",
                    t_conn,
                    time.monotonic(),
                    round=self._span_round(renew),
                    reattest=True,
                    accepted=False,
                    reason=str(exc),
                )
            raise TeeflError(
                f"{self.name} leaves the run: re-attestation before round {renew.round} "
                f"failed: {exc}"
            ) from None

    def _span_round(self, renew: Reattest) -> int | None:
        """The training round a re-attestation belongs to (None for the evaluation pass)."""
        return renew.round if 0 < renew.round <= self.plan.federation.rounds else None

    def _joined(
        self,
        reply: teefl_pb2.JoinReply,
        t0: float,
        t_data: float,
        t_conn: float,
        renew: Reattest | None = None,
    ) -> None:
        """The Join's events; the first one also opens the event file and writes env."""
        t_join = time.monotonic()
        # with attestation, Join carries the evidence: the whole exchange is `attest`
        phase = "attest" if self.plan.security.attestation.enabled else "join"
        if self.rec is None:
            self.rec = EventRecorder(self.run_dir, reply.run_id, self.process, "collaborator")
            self.rec.record("load_data", t0, t_data, bytes=0, samples=self.trainer.samples)
            self.rec.record("connect", t_data, t_conn)
            self.rec.record(phase, t_conn, t_join)
            self._write_env(reply.run_id)
        elif renew is not None:  # part of the round it renews the attestation for
            self.rec.record(
                phase, t_conn, t_join, round=self._span_round(renew), reattest=True, accepted=True
            )
        else:
            self.rec.record(phase, t_conn, t_join, rejoin=True)
        self.session.joined()
        log.info(
            "%s joined run %s (%d rounds, open round %d)",
            self.name,
            reply.run_id,
            reply.rounds,
            reply.current_round,
        )

    def _write_env(self, run_id: str) -> None:
        described = self.trainer.describe()
        if described is None:
            return
        from teefl.measure.host import environment, tee_record, write_environment

        fields = {"run": run_id, "name": self.name, **described}
        fields["tee"] = tee_record(self.plan.runtime.tee_label)
        write_environment(self.run_dir, self.process, environment("collaborator", fields))

    # -- rounds ------------------------------------------------------------------------------
    def _loop(self, rounds: int) -> None:
        assert self.rec is not None
        rec, handle = self.rec, self.transport.handle
        while True:
            t_wait = time.monotonic()
            while True:
                w = handle(WaitRound(self.last))
                self.keeper.forget(w.durable_round)
                if w.done or w.round:
                    break
            # a wait belongs to the training round it opened; waits for the evaluation pass or
            # the end of the run carry no round so per-round statistics stay per round
            training = bool(w.round) and not w.evaluate_only and not w.done
            rec.record("wait", t_wait, time.monotonic(), round=w.round if training else None)
            if w.done:
                log.info("%s: run complete", self.name)
                return
            r = w.round
            # reattest_every: the aggregator's word on our evidence, ours on its evidence
            if w.reattest:
                raise Reattest("the aggregator asks for fresh evidence", r)
            if self.session.recheck_due(r):
                raise Reattest("the aggregator's evidence is due for a fresh check", r)
            if not w.evaluate_only and self.session.resend(r, rec):
                self.last = r  # a restarted aggregator reopened a round we had sent
                continue
            # the final evaluation pass is not a training round: its spans carry no round number
            phase, span_round = ("final_download", None) if w.evaluate_only else ("download", r)
            try:
                with rec.span(phase, round=span_round) as s:
                    got = handle(GetModel(r, self.resident))
                    if got.state is not None:  # None: it was received straight into the model
                        self._load(got.state)
                    s["bytes"] = got.size
                    del got  # may share the receive buffer, which the next download refills
            except Stale as exc:  # the round closed (quorum) before we asked: wait for the next
                log.warning("%s: %s; waiting for the next round", self.name, exc)
                continue
            try:
                if w.evaluate_only:
                    self._final(r)
                else:
                    self._train_and_upload(r, rounds, roundconfig.from_proto(w.round_config))
            except WorkloadFailure as exc:
                self._report_failure(r, w.evaluate_only, exc)
                raise
            self.last = r

    def _report_failure(self, r: int, evaluate_only: bool, exc: WorkloadFailure) -> None:
        """The workload's code raised in round ``r``: its traceback goes to this party's log,
        a failure report (`teefl.wire.failure`) to the aggregator, and the caller re-raises,
        so the collaborator stops with the one line (exit code 2).

        Why stop rather than carry on with the next round: code that raised once has left
        this party's state unknown -- a half-trained model, a half-read file, a CUDA context
        after an out-of-memory -- and a bug in it (a shape, a missing column) raises again
        in every round, each a report that says nothing new. Its operator has to read the
        traceback; the federation does not need it meanwhile: the aggregator counts this party
        out of the round at once and out of the rest of the run until it joins again (a
        restarted collaborator does), so the others go on under the quorum rules or the run
        stops with this line -- without waiting for the round's timeout.

        A report that cannot be delivered (the aggregator lost, the round already closed) is
        logged; the collaborator stops all the same and the aggregator falls back on the
        round's timeout."""
        _log_failure(exc)
        prefix = f"{exc.party or self.name}: "
        summary = exc.summary.removeprefix(prefix)
        if self.rec is not None:
            self.rec.info("round_failed", round=r, phase=exc.phase, summary=summary)
        header = failure_header(self.name, r, exc.phase, summary, evaluate_only)
        try:
            self.transport.handle(Report(header))
        except (Stale, TeeflError, *LOSS_ERRORS) as err:
            log.warning(
                "%s: the failed round %d could not be reported to the aggregator: %s",
                self.name,
                r,
                err,
            )
            return
        log.info("%s: reported the failed round %d to the aggregator", self.name, r)

    def _final(self, r: int) -> None:
        """The evaluation pass: score the final model, report it (no update)."""
        assert self.rec is not None
        with self.rec.span("final_validate") as s:
            m = self.trainer.evaluate(self.model)
            s["metrics"] = m
        if "accuracy" in m:  # a workload's metrics need only "samples"
            log.info("%s: final model accuracy %.4f", self.name, m["accuracy"])
        header = teefl_pb2.Header(
            collaborator=self.name,
            round=r,
            evaluate_only=True,
            num_samples=m["samples"],
            metrics=flat("final", m),
            format=codec.FORMAT,
        )
        try:
            self.transport.handle(Report(header))
        except Stale as exc:
            log.warning("%s: evaluation report not needed any more (%s)", self.name, exc)

    def _train_and_upload(self, r: int, rounds: int, config: dict[str, Any]) -> None:
        """Train round ``r`` with the strategy's round ``config``, send the update, keep it."""
        assert self.rec is not None
        rec = self.rec
        if config:
            rec.info("round_config", round=r, config=config)
        metrics = self.trainer.train_round(self.model, r, config, rec.span)
        with rec.span("serialize", round=r) as s:
            header, payload = self._update(r, metrics)
            s["bytes"] = len(payload)
        self.keeper.sending(r, header, payload)
        try:
            with rec.span("upload", round=r) as s:
                ack = self.transport.handle(PutUpdate(r, header, payload))
                s["bytes"] = len(payload)
        except Stale as exc:
            self.keeper.refused()
            log.warning(
                "%s: update for round %d refused as stale (%s); joining the next round",
                self.name,
                r,
                exc,
            )
            rec.info("update_stale", round=r, reason=str(exc))
            return
        log.info("%s: round %d/%d uploaded (%s)", self.name, r, rounds, ack.message)
        self.keeper.acked(r, header, payload)  # after the ACK: off the transfer path

    def _update(self, r: int, metrics: dict[str, float]) -> tuple[teefl_pb2.Header, Any]:
        """The update of round ``r``: the model's own memory where it is resident, compressed
        where the plan says so (over the data plane only), and its header."""
        if self.resident is not None and self.resident.intact():
            payload = self.resident.payload  # the model's own memory, sent as it is
        else:
            payload = codec.encode_state(self._state())
        net = self.plan.network
        encoding, raw_size = "", 0
        if net.data_plane == "socket":  # compressed updates travel over the data plane only
            encoding = compression.encoding_of(net.compression)
        if encoding:
            raw_size = len(payload)
            payload = compression.compress(payload, net.compression_level)
        # the SHA-256 only where the aggregator checks it (payload_check sha256)
        digest = codec.sha256(payload) if self.check == "sha256" else b""
        header = teefl_pb2.Header(
            collaborator=self.name,
            round=r,
            total_size=len(payload),
            sha256=digest,
            num_samples=self.trainer.samples,
            metrics=metrics,
            format=codec.FORMAT,
            crc32c=codec.crc32c(payload),
            encoding=encoding,
            raw_size=raw_size,
        )
        return header, payload

    def _state(self) -> dict[str, torch.Tensor]:
        """The tensors that travel (sharing the model's memory): the whole state dict, or the
        workload's subset."""
        state = self.model.state_dict()
        if self.travelling is None:
            return state
        return {n: state[n] for n in self.travelling}

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a received state into the model: ``load_state_dict`` when anything differs (its
        errors name what), else a plain copy per tensor -- 5 ms -> 1 ms for MobileNetV3-Small's
        244 tensors, whose per-tensor bookkeeping in ``load_state_dict`` dominates."""
        own = self.__dict__.get("_own")
        if own is None:  # the model's own tensors (they share its memory), looked up once
            own = self._own = self._state()
        if own.keys() != state.keys() or any(
            own[k].shape != v.shape or own[k].dtype != v.dtype for k, v in state.items()
        ):
            if self.travelling is not None:  # exactly the travelling tensors, or refused
                check_layout(state, own, "the global model")
            self.model.load_state_dict(state)
            return
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)


def _log_failure(exc: WorkloadFailure) -> None:
    """The whole failure into this party's log: the one line, then the user code's traceback
    (the aggregator and `teefl run` only ever see the line)."""
    if exc.traceback:
        log.error("%s\n%s", exc.summary, exc.traceback.rstrip())
    else:
        log.error("%s", exc.summary)
