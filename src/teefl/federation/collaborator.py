"""A collaborator: joins once, then for each round downloads, validates, trains, validates, uploads.

The channel is opened once and kept for the whole run (one TLS handshake, recorded as
``connect``). The model comes down and the update goes up as one stream each.

Channels (see docs/security.md, "Where each key is born"): the *enrolment* channel carries
Challenge and Join -- under mtls with the certificate the plan's CA issued to this collaborator.
When collaborators must attest, the collaborator makes its TLS key in memory at start-up, binds
its evidence to it at Join, and opens a second channel (and its data-plane socket) with the
session certificate the aggregator issued for that key: only that one may carry model data.
When the aggregator must attest, every channel and the data-plane socket trust exactly the
certificate whose key the aggregator's evidence was verified for (pinned), nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from teefl.client.keeper import Keeper
from teefl.client.resident import ResidentModel
from teefl.errors import TeeflError
from teefl.federation import attest
from teefl.federation.faults import fault
from teefl.measure.events import EventRecorder
from teefl.plan import Plan
from teefl.security import session as session_keys
from teefl.security.tls import ConnectError, split_target
from teefl.transport import framing, socket_client
from teefl.transport.channels import client_certs, open_channel, payload_check
from teefl.wire import assembly, codec, compression, roundconfig, teefl_pb2, teefl_pb2_grpc
from teefl.workload.datasets import load_dataset
from teefl.workload.models import build_model
from teefl.workload.partition import collaborator_data
from teefl.workload.train import configure_threads, evaluate, resolve_device, train_local

log = logging.getLogger("teefl.collaborator")

#: metadata key of the session token (hex) on every call after Join (see aggregator.py)
SESSION_METADATA = "teefl-session"


class _Lost(Exception):
    """Contact with the aggregator was lost (restart, network): rejoin after a backoff."""


class _Stale(Exception):
    """The round closed before our request arrived: carry on with the next round."""


#: what ends a connection to the aggregator rather than the run: a restart or a network fault
#: surfaces as any of these (a reset TCP connection, a TLS record cut off, an early EOF), and
#: each is retried for ``federation.reconnect_timeout``
_LOSS_ERRORS = (_Lost, ConnectionError, TimeoutError, ssl.SSLError, EOFError)


def _flat(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}.{k}": float(v) for k, v in metrics.items() if k != "samples"}


def _aggregator_verifier(plan: Plan) -> Any:
    """The check of the aggregator's evidence (``attest.Verifier`` for role "aggregator")."""
    from teefl.federation import attest

    att = plan.security.attestation
    return attest.Verifier(att, "aggregator") if att.aggregator == "required" else None


class Collaborator:
    """One party holding a private shard of the data."""

    def __init__(
        self, plan: Plan, name: str, address: str, run_dir: Path, data_dir: Path | None = None
    ) -> None:
        if name not in plan.collaborators:
            raise TeeflError(
                f"collaborator {name!r} is not in the plan (plan lists: "
                f"{', '.join(plan.collaborators)})"
            )
        self.plan, self.name, self.address = plan, name, address
        self.run_dir, self.data_dir = Path(run_dir), data_dir
        self.index = plan.collaborators.index(name)
        self.process = f"collaborator-{name}"
        self.rec: EventRecorder | None = None
        self._aggregator_verdict: dict[str, Any] | None = None
        self._aggregator_spki: bytes | None = None  # its attested TLS key, when we checked it
        self._verifier = _aggregator_verifier(plan)  # an unpinned policy stops us here, at start
        #: what this collaborator runs with: compared with the aggregator's at every Join and,
        #: with attestation, bound into the evidence of both
        self.sections = attest.config_sections(plan)
        self.binding = attest.config_binding(plan)
        att = plan.security.attestation
        #: the TLS key of this collaborator's model traffic when it must attest: made here, in
        #: memory (in its TEE), never written anywhere; the evidence at Join is bound to it
        self.session_key = session_keys.new_key() if att.collaborators == "required" else None
        self._session_key_pem = (
            session_keys.key_pem(self.session_key) if self.session_key is not None else None
        )
        self.session_cert: bytes | None = None  # issued for it at the latest Join
        #: the aggregator's own certificate (PEM) when it must attest: every channel and the
        #: data plane trust exactly this certificate
        self.pin: bytes | None = None
        self.enrol: grpc.Channel | None = None  # Challenge and Join
        self.session_channel: grpc.Channel | None = None  # model traffic, attested session
        self.stub: teefl_pb2_grpc.FederationStub | None = None  # the model traffic's stub
        self._md: tuple[tuple[str, str], ...] = ()  # the session token, on every call
        self.data: Any = None  # the data-plane socket (None: model and updates over gRPC)
        self.check = payload_check(plan)  # what downloads are checked against
        #: the data plane's receive buffer, kept from round to round: faulting in 45 fresh MB
        #: costs ~30 ms here, more than receiving into memory already mapped. The tensors decoded
        #: from it live only until `load_state_dict` has copied them into the model.
        self._rx: bytearray | None = None
        #: the model's tensors inside its wire payload (None on a GPU, or for a model whose
        #: tensors cannot be moved there): downloads land in the model, uploads send it as is
        self.resident: ResidentModel | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        plan = self.plan
        self.threads = configure_threads(plan.training.threads)
        self.device = resolve_device(plan.training.device)
        data = load_dataset(plan.dataset, self.data_dir, seed=plan.seed)
        self.dataset = data
        self.x_train, self.y_train, self.x_test, self.y_test = collaborator_data(
            data, self.index, len(plan.collaborators), plan.partition, plan.dataset, plan.seed
        )
        self.model = build_model(plan.model.name, data.channels, data.classes).to(self.device)

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a received state into the model: ``load_state_dict`` when anything differs (its
        errors name what), else a plain copy per tensor -- 5 ms -> 1 ms for MobileNetV3-Small's
        244 tensors, whose per-tensor bookkeeping in ``load_state_dict`` dominates."""
        own = self.__dict__.get("_own")
        if own is None:  # the model's own tensors (they share its memory), looked up once
            own = self._own = self.model.state_dict()
        if own.keys() != state.keys() or any(
            own[k].shape != v.shape or own[k].dtype != v.dtype for k, v in state.items()
        ):
            self.model.load_state_dict(state)
            return
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def run(self) -> str:
        """Take part in the whole run; returns the run id.

        A lost aggregator (restart, network drop) is not fatal: the collaborator rejoins with
        backoff for up to ``federation.reconnect_timeout`` seconds and carries on from the last
        round it completed.
        """
        t0 = time.monotonic()
        self._prepare()
        self.resident = ResidentModel.bind(self.model)
        t_data = time.monotonic()
        self._connect(timeout=60.0)
        t_conn = time.monotonic()
        self.last = 0  # the last round this collaborator completed
        #: updates sent and acknowledged, kept until their round's checkpoint is durable
        self.keeper = Keeper(self.resident.payload if self.resident is not None else None)
        lost_since: float | None = None
        backoff = 0.5
        try:
            while True:
                try:
                    if self.enrol is None:  # dropped after a loss (a pinned aggregator)
                        self._reconnect()
                    run_id, rounds, joined = self._join(t0, t_data, t_conn)
                    lost_since, backoff = None, 0.5
                    assert self.stub is not None
                    self._resync(self.stub, joined)
                    self._loop(self.stub, rounds)
                    return run_id
                except _LOSS_ERRORS as exc:  # whatever broke the connection: rejoin
                    now = time.monotonic()
                    lost_since = lost_since or now
                    limit = self.plan.federation.reconnect_timeout
                    if now - lost_since > limit:
                        raise TeeflError(
                            f"lost the aggregator at {self.address} for more than {limit:g} s "
                            f"({exc})"
                        ) from None
                    log.warning(
                        "%s: lost the aggregator (%s); rejoining in %.1f s", self.name, exc, backoff
                    )
                    if self.rec is not None:
                        self.rec.info("lost_aggregator", reason=str(exc))
                    self._close_data()
                    self._close_session()
                    if self.pin is not None:  # a restarted aggregator has a new key: fetch,
                        self._close_enrol()  # verify and pin it again
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    t_conn = time.monotonic()
        finally:
            self._close_data()
            self._close_session()
            self._close_enrol()
            if self.rec is not None:
                self.rec.close()

    # -- channels ----------------------------------------------------------------------------
    def _connect(self, timeout: float) -> None:
        """The enrolment channel; with the aggregator's attestation required, pinned to the
        certificate it presents now (checked at Challenge, before anything else is asked)."""
        if self.plan.security.attestation.aggregator == "required":
            self.pin = self._fetch_pin(timeout)
        self.enrol = open_channel(self.plan, self.name, self.address, timeout, pin=self.pin)
        self.stub = teefl_pb2_grpc.FederationStub(self.enrol)

    def _fetch_pin(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return attest.fetch_server_certificate(self.address, timeout=5.0)
            except ConnectionError as exc:
                if time.monotonic() >= deadline:
                    raise TeeflError(str(exc)) from None
                time.sleep(0.5)

    def _reconnect(self) -> None:
        """`_connect` after a loss: anything that may pass by waiting is a `_Lost`."""
        try:
            if self.plan.security.attestation.aggregator == "required":
                try:
                    self.pin = attest.fetch_server_certificate(self.address, timeout=5.0)
                except ConnectionError as exc:
                    raise _Lost(str(exc)) from None
            self.enrol = open_channel(self.plan, self.name, self.address, 10.0, pin=self.pin)
            self.stub = teefl_pb2_grpc.FederationStub(self.enrol)
        except ConnectError as exc:
            if not exc.retryable:
                raise
            raise _Lost(str(exc)) from None

    def _close_enrol(self) -> None:
        if self.enrol is not None:
            self.enrol.close()
            self.enrol = None

    def _close_session(self) -> None:
        if self.session_channel is not None:
            self.session_channel.close()
            self.session_channel = None

    def _open_session(self, reply: teefl_pb2.JoinReply) -> None:
        """The channel for model traffic: the enrolment channel itself, or -- when this
        collaborator must attest -- a new one with the session certificate just issued for
        its in-memory key (the aggregator refuses model calls over any other certificate)."""
        self._close_session()
        if self.session_key is None:
            assert self.enrol is not None
            self.stub = teefl_pb2_grpc.FederationStub(self.enrol)
            return
        from cryptography import x509

        from teefl.security import pki

        pem = bytes(reply.session_cert)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise TeeflError("the aggregator's Join reply carries no session certificate") from None
        if session_keys.spki_of(cert) != session_keys.spki_of(self.session_key) or (
            pki.common_name(cert) != self.name
        ):
            raise TeeflError("the session certificate is not for this collaborator's key")
        self.session_cert = pem
        assert self._session_key_pem is not None
        try:
            self.session_channel = open_channel(
                self.plan,
                self.name,
                self.address,
                30.0,
                pin=self.pin,
                client=(pem, self._session_key_pem),
            )
        except ConnectError as exc:
            if not exc.retryable:
                raise
            raise _Lost(str(exc)) from None
        self.stub = teefl_pb2_grpc.FederationStub(self.session_channel)

    def _close_data(self) -> None:
        if self.data is not None:
            with contextlib.suppress(OSError):
                self.data.close()
            self.data = None

    def _open_data(self, reply: teefl_pb2.JoinReply) -> None:
        """The data-plane connection (see framing.py) when the plan says
        ``network.data_plane: socket``: a reply that offers none is refused, not taken as a
        reason to move model data over another path (a downgrade the plan did not ask for)."""
        self._close_data()
        if self.plan.network.data_plane != "socket":
            return
        if not reply.data_port:
            raise TeeflError(
                "the aggregator's Join reply offers no data plane, but the plan says "
                "network.data_plane: socket; refusing to move model data over another path"
            )
        host, _ = split_target(self.address)
        tls = None
        certs = client_certs(self.plan, self.name)
        if certs is not None:
            chain: tuple[bytes, bytes] | tuple[Path, Path] | None = None
            if self.session_key is not None:
                assert self.session_cert is not None and self._session_key_pem is not None
                chain = (self.session_cert, self._session_key_pem)
            elif certs.cert is not None and certs.key is not None:
                chain = (certs.cert, certs.key)
            roots = self.pin if self.pin is not None else certs.ca.read_bytes()
            tls = session_keys.client_ssl_context(roots, chain, pinned=self.pin is not None)
        try:
            self.data = socket_client.connect(
                host, reply.data_port, self.name, reply.session_token, tls, self._aggregator_spki
            )
        except framing.Closed as exc:
            raise _Lost(str(exc)) from None
        except framing.RemoteError as exc:
            raise self._status(exc.code, exc.message) from None

    def _join(
        self, t0: float, t_data: float, t_conn: float
    ) -> tuple[str, int, teefl_pb2.JoinReply]:
        """(Attest and) join; the first time also opens the event file and writes env."""
        assert self.enrol is not None
        enrol = teefl_pb2_grpc.FederationStub(self.enrol)
        self._md = ()
        request = teefl_pb2.JoinRequest(collaborator=self.name, plan_sections=self.sections)
        att = self.plan.security.attestation
        if att.enabled:
            self._attest(enrol, request)
        reply = self._call(enrol.Join, request)
        differ = attest.differing_sections(self.sections, dict(reply.plan_sections))
        if differ:
            raise TeeflError(
                f"the aggregator's plan differs from {self.name}'s in: {', '.join(differ)} "
                "(every party must use the same plan file and CA certificate); refusing it"
            )
        self._md = ((SESSION_METADATA, bytes(reply.session_token).hex()),)
        self._open_session(reply)
        self._open_data(reply)
        t_join = time.monotonic()
        # with attestation, Join carries the evidence: the whole exchange is `attest`
        phase = "attest" if att.enabled else "join"
        if self.rec is None:
            self.rec = EventRecorder(self.run_dir, reply.run_id, self.process, "collaborator")
            self.rec.record("load_data", t0, t_data, bytes=0, samples=len(self.y_train))
            self.rec.record("connect", t_data, t_conn)
            self.rec.record(phase, t_conn, t_join)
            self._write_env(reply.run_id)
        else:
            self.rec.record(phase, t_conn, t_join, rejoin=True)
        if self._aggregator_verdict is not None:
            attest.write_verdict(self.run_dir, "aggregator", self._aggregator_verdict)
            self._aggregator_verdict = None
        log.info(
            "%s joined run %s (%d rounds, open round %d)",
            self.name,
            reply.run_id,
            reply.rounds,
            reply.current_round,
        )
        return reply.run_id, reply.rounds, reply

    def _resync(self, stub, reply: teefl_pb2.JoinReply) -> None:
        """After a Join: line up with the round the aggregator has open (see `Keeper`)."""
        plan = self.keeper.after_join(reply, self.last)
        self.last = plan.last
        if plan.resend is not None:
            self._resend(stub, plan.resend)

    def _resend(self, stub, r: int) -> bool:
        """Send the kept update of round ``r`` again, if there is one (see `_resync`)."""
        copy = self.keeper.copy(r)
        if copy is None:
            return False
        header, payload = copy
        log.warning("%s: sending our kept update of round %d again", self.name, r)
        assert self.rec is not None
        try:
            with self.rec.span("upload", round=r, resent=True) as s:
                self._upload(stub, header, payload, r)
                s["bytes"] = len(payload)
        except _Stale as exc:
            log.warning("%s: round %d closed meanwhile (%s)", self.name, r, exc)
        self.keeper.acked(r, header, payload)
        self.last = r
        return True

    def _attest(self, stub, request: teefl_pb2.JoinRequest) -> None:
        """Challenge: check the aggregator's evidence and endorsement (if required), bind ours
        to its nonce.

        Nothing of the model is requested before this succeeds; the aggregator in turn refuses
        every model call from a collaborator whose evidence it has not accepted.
        """
        att = self.plan.security.attestation
        my_nonce = os.urandom(attest.NONCE_SIZE)
        want = att.aggregator == "required"
        reply = self._call(
            stub.Challenge,
            teefl_pb2.ChallengeRequest(collaborator=self.name, nonce=my_nonce, want_evidence=want),
        )
        if want:
            tls = self.plan.security.tls
            assert tls.ca is not None and self.pin is not None
            record: dict[str, Any] = {"address": self.address, "t_wall": time.time()}
            try:
                differ = attest.differing_sections(self.sections, dict(reply.plan_sections))
                if differ:
                    raise attest.AttestationError(
                        f"the aggregator's plan differs from this collaborator's in: "
                        f"{', '.join(differ)} (every party must use the same plan file and CA)"
                    )
                if not reply.HasField("aggregator_evidence"):
                    raise attest.AttestationError("the aggregator sent no evidence")
                spki = attest.spki_of_pem(self.pin)
                # the binding is ours: an aggregator running with another plan or CA fails here
                assert self._verifier is not None
                verdict = self._verifier.verify(
                    attest.from_proto(reply.aggregator_evidence), spki, my_nonce, self.binding
                )
                endorsed = attest.verify_endorsement(
                    reply.endorsement.certificate,
                    reply.endorsement.signature,
                    spki,
                    my_nonce,
                    self.binding,
                    ca=tls.ca,
                    host=split_target(self.address)[0],
                    revoked=self._revoked(),
                )
            except TeeflError as exc:
                record.update(accepted=False, reason=str(exc))
                attest.write_verdict(self.run_dir, "aggregator", record)
                raise TeeflError(f"aggregator attestation failed: {exc}") from None
            record.update(
                accepted=True,
                verdict=verdict.to_dict(),
                tls_key=attest.fingerprint(spki),
                endorsed_by=f"serial {endorsed.serial_number:x}",
            )
            self._aggregator_verdict = record
            self._aggregator_spki = spki
        if reply.evidence_required:
            if self.session_key is None:
                raise TeeflError(
                    "the aggregator requires collaborators' attestation, but this plan says "
                    "security.attestation.collaborators: off"
                )
            spki = session_keys.spki_of(self.session_key)
            evidence = attest.make_provider(att).get_evidence(
                attest.report_data_for(spki, reply.nonce, self.binding)
            )
            request.evidence.CopyFrom(attest.to_proto(evidence))
            request.nonce = reply.nonce
            request.session_key = spki

    def _revoked(self) -> frozenset[int]:
        """The CA's revocation list, when the plan names one (checked against the endorsement)."""
        tls = self.plan.security.tls
        if tls.crl is None or tls.ca is None:
            return frozenset()
        from teefl.security import pki

        return pki.load_crl(tls.crl, tls.ca)

    def _write_env(self, run_id: str) -> None:
        from teefl.measure.host import environment, tee_record, write_environment

        d = self.dataset
        write_environment(
            self.run_dir,
            self.process,
            environment(
                "collaborator",
                {
                    "run": run_id,
                    "name": self.name,
                    "device": str(self.device),
                    "threads": self.threads,
                    "tee": tee_record(self.plan.runtime.tee_label),
                    "dataset": {
                        "name": d.name,
                        "source": d.source,
                        "train_samples": len(d.y_train),
                        "test_samples": len(d.y_test),
                        "shape": list(d.x_train.shape[1:]),
                        "classes": d.classes,
                        "size_bytes": int(d.x_train.numel() + d.x_test.numel()),
                        "shard_train": len(self.y_train),
                        "shard_test": len(self.y_test),
                    },
                },
            ),
        )

    def _call(self, method, request, **kw):
        try:
            return method(request, metadata=self._md, **kw)
        except grpc.RpcError as exc:
            raise self._classify(exc) from None

    def _classify(self, exc: grpc.RpcError) -> Exception:
        """Lost contact -> rejoin; a closed round -> next round; anything else is fatal."""
        return self._status(exc.code(), exc.details() or "")

    def _status(self, code: grpc.StatusCode | str, details: str) -> Exception:
        """`_classify` for a status code or its name (the data plane sends names)."""
        if isinstance(code, str):
            code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNKNOWN,
        ):
            return _Lost(f"{code.name}: {details}")
        if code == grpc.StatusCode.PERMISSION_DENIED and "has not passed attestation" in details:
            return _Lost("the aggregator no longer knows our attestation (restarted?)")
        if code == grpc.StatusCode.UNAUTHENTICATED and "Join first" in details:
            return _Lost(f"our session ended ({details})")  # restarted aggregator, or a newer Join
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details:
            return _Lost(details)
        if code == grpc.StatusCode.FAILED_PRECONDITION and (
            "not open" in details or "stale" in details
        ):
            return _Stale(details)
        return TeeflError(f"aggregator refused {self.name}: {details}")

    # -- rounds ------------------------------------------------------------------------------
    def _loop(self, stub: teefl_pb2_grpc.FederationStub, rounds: int) -> None:
        assert self.rec is not None
        rec = self.rec
        while True:
            last = self.last
            t_wait = time.monotonic()
            while True:
                w = self._call(
                    stub.WaitRound, teefl_pb2.WaitRequest(collaborator=self.name, after_round=last)
                )
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
            if not w.evaluate_only and self._resend(stub, r):
                continue  # a restarted aggregator reopened a round we had sent: the same bytes
            # the final evaluation pass is not a training round: its spans carry no round number
            phase, span_round = ("final_download", None) if w.evaluate_only else ("download", r)
            try:
                with rec.span(phase, round=span_round) as s:
                    state, s["bytes"] = self._download(stub, r)
                    if state is not None:  # None: it was received straight into the model
                        self._load(state)
                    del state  # may share the receive buffer, which the next download refills
            except _Stale as exc:  # the round closed (quorum) before we asked: wait for the next
                log.warning("%s: %s; waiting for the next round", self.name, exc)
                continue
            if w.evaluate_only:
                with rec.span("final_validate") as s:
                    m = evaluate(
                        self.model,
                        self.x_test,
                        self.y_test,
                        self.plan.training.batch_size,
                        self.device,
                    )
                    s["metrics"] = m
                log.info("%s: final model accuracy %.4f", self.name, m["accuracy"])
                header = teefl_pb2.Header(
                    collaborator=self.name,
                    round=r,
                    evaluate_only=True,
                    num_samples=m["samples"],
                    metrics=_flat("final", m),
                    format=codec.FORMAT,
                )
                try:
                    self._call(stub.PutUpdate, iter([teefl_pb2.Chunk(header=header)]))
                except _Stale as exc:
                    log.warning("%s: evaluation report not needed any more (%s)", self.name, exc)
                self.last = r
                continue
            metrics = self._round(r, roundconfig.from_proto(w.round_config))
            with rec.span("serialize", round=r) as s:
                if self.resident is not None and self.resident.intact():
                    payload = self.resident.payload  # the model's own memory, sent as it is
                else:
                    payload = codec.encode_state(self.model.state_dict())
                net = self.plan.network
                encoding, raw_size = "", 0
                if self.data is not None:  # compressed updates travel over the data plane only
                    encoding = compression.encoding_of(net.compression)
                if encoding:
                    raw_size = len(payload)
                    payload = compression.compress(payload, net.compression_level)
                # the SHA-256 only where the aggregator checks it (payload_check sha256)
                digest = codec.sha256(payload) if self.check == "sha256" else b""
                crc = codec.crc32c(payload)
                s["bytes"] = len(payload)
            header = teefl_pb2.Header(
                collaborator=self.name,
                round=r,
                total_size=len(payload),
                sha256=digest,
                num_samples=len(self.y_train),
                metrics=metrics,
                format=codec.FORMAT,
                crc32c=crc,
                encoding=encoding,
                raw_size=raw_size,
            )
            self.keeper.sending(r, header, payload)
            try:
                with rec.span("upload", round=r) as s:
                    ack = self._upload(stub, header, payload, r)
                    s["bytes"] = len(payload)
            except _Stale as exc:
                self.keeper.refused()
                log.warning(
                    "%s: update for round %d refused as stale (%s); joining the next round",
                    self.name,
                    r,
                    exc,
                )
                rec.info("update_stale", round=r, reason=str(exc))
                self.last = r
                continue
            log.info("%s: round %d/%d uploaded (%s)", self.name, r, rounds, ack.message)
            self.keeper.acked(r, header, payload)  # after the ACK: off the transfer path
            self.last = r

    def _round(self, r: int, config: dict[str, Any] | None = None) -> dict[str, float]:
        """Validate the global model, train, validate the local model (the OpenFL order).
        ``config``: the strategy's round config (`roundconfig`); empty: train as the plan says."""
        assert self.rec is not None
        rec, plan = self.rec, self.plan
        bs = plan.training.batch_size
        lr, mu = roundconfig.training_overrides(config or {})
        if config:
            rec.info("round_config", round=r, config=config)
        with rec.span("validate_global", round=r) as s:
            vg = evaluate(self.model, self.x_test, self.y_test, bs, self.device)
            s["metrics"], s["samples"] = vg, vg["samples"]
        fault("train", r)
        with rec.span("train", round=r) as s:
            seed = plan.seed * 1_000_003 + self.index * 1009 + r
            tr = train_local(
                self.model,
                self.x_train,
                self.y_train,
                plan.training,
                self.device,
                seed,
                lr=lr,
                proximal_mu=mu,
            )
            s["metrics"], s["samples"] = tr, tr["samples"]
        with rec.span("validate_local", round=r) as s:
            vl = evaluate(self.model, self.x_test, self.y_test, bs, self.device)
            s["metrics"], s["samples"] = vl, vl["samples"]
        log.info(
            "%s: round %d global acc %.4f -> local acc %.4f",
            self.name,
            r,
            vg["accuracy"],
            vl["accuracy"],
        )
        return {**_flat("validate_global", vg), **_flat("train", tr), **_flat("validate_local", vl)}

    def _upload(self, stub, header: teefl_pb2.Header, payload, r: int) -> teefl_pb2.UpdateAck:
        """Send one update and wait for its acknowledgement.

        The header goes first; the data follows only once the aggregator has given this upload
        a receive slot (it says so in the call's initial metadata). Without that, every upload
        queued behind the aggregator's bound would park up to a whole HTTP/2 window of data in
        the aggregator's memory, and its memory would grow with the number of collaborators.
        """
        if self.data is not None:
            return self._upload_data(header, payload, r)
        started = threading.Event()
        holder: list[Any] = []
        call = stub.PutUpdate.future(
            self._upload_stream(header, payload, r, started, holder), metadata=self._md
        )
        holder.append(call)
        started.set()
        try:
            return call.result()
        except grpc.RpcError as exc:
            raise self._classify(exc) from None

    def _upload_stream(
        self,
        header: teefl_pb2.Header,
        payload,
        r: int,
        started: threading.Event,
        holder: list[Any],
    ) -> Iterator[Any]:
        """The update's messages; ``holder[0]`` is the call, set before ``started`` is."""
        yield teefl_pb2.Chunk(header=header)
        started.wait()
        holder[0].initial_metadata()  # returns once a slot is ours (or the call has ended)
        if not holder[0].is_active():
            return
        offset = 0
        for piece in codec.iter_chunks(payload, self.plan.network.chunk_size):
            yield teefl_pb2.Chunk(data=bytes(piece), offset=offset)
            offset += len(piece)
            fault("upload", r)

    def _upload_data(self, header: teefl_pb2.Header, payload, r: int) -> teefl_pb2.UpdateAck:
        """The same over the data plane: PUT header, wait for GO, the payload, wait for ACK."""
        sock = self.data
        try:
            framing.send_frame(sock, framing.PUT, header.SerializeToString())
            kind, body = framing.recv_frame(sock)
            if kind == framing.ERROR:
                framing.raise_error(body)
            if kind == framing.ACK:  # already counted (e.g. we restarted after its ack)
                return teefl_pb2.UpdateAck.FromString(body)
            if kind != framing.GO:
                raise framing.Closed(f"unexpected frame {kind} instead of GO")
            framing.send_payload(sock, payload, tick=lambda: fault("upload", r))
            return teefl_pb2.UpdateAck.FromString(framing.expect(sock, framing.ACK))
        except framing.RemoteError as exc:
            raise self._status(exc.code, exc.message) from None
        except (framing.Closed, OSError) as exc:
            raise _Lost(f"data plane: {exc}") from None

    def _download_data(self, r: int) -> tuple[dict[str, torch.Tensor] | None, int]:
        """The round's model over the data plane, received straight into its final buffer:
        the model itself when the payload's header is exactly the model's layout (then the
        state returned is None: nothing is left to load), else a kept receive buffer."""
        sock = self.data
        request = teefl_pb2.ModelRequest(collaborator=self.name, round=r)
        resident = self.resident
        into_model = False
        try:
            framing.send_frame(sock, framing.GET, request.SerializeToString())
            h = teefl_pb2.Header.FromString(framing.expect(sock, framing.MODEL))
            if h.encoding:
                return self._download_frame(h, r)
            head = b""
            if resident is not None and h.total_size == len(resident.payload):
                # the header first: only a byte-identical layout may be written into the model
                # (a broken connection after it leaves the model half-overwritten, which is
                # harmless: the model is used only after a complete, checked download)
                head = bytearray(len(resident.head))
                framing.recv_exact(sock, memoryview(head))
                into_model = head == resident.head and resident.intact()
            if into_model:
                buffer = resident.payload
            else:
                if self._rx is None or len(self._rx) != h.total_size:
                    self._rx = bytearray(h.total_size)
                buffer = self._rx
            asm = assembly.Assembler.for_header(h, 1 << 40, self.check, buffer=buffer)
            asm.add(head)
            try:
                asm.receive(framing.reader(sock), framing.STEP, lambda: fault("download", r))
            except codec.PayloadError as exc:  # the connection ended mid-payload
                raise framing.Closed(str(exc)) from None
        except framing.RemoteError as exc:
            raise self._status(exc.code, exc.message) from None
        except (framing.Closed, OSError) as exc:
            raise _Lost(f"data plane: {exc}") from None
        payload = asm.finish()  # a checksum mismatch here is corruption: fatal, not a retry
        if into_model:
            return None, h.total_size
        return codec.decode_state(payload, owned=True), h.total_size

    def _download_frame(self, h, r: int) -> tuple[dict[str, torch.Tensor] | None, int]:
        """A compressed model (``network.compression``): the frame, checked against the header,
        then decompressed into the model where its layout is the model's."""
        want = compression.encoding_of(self.plan.network.compression)
        if h.encoding != want:
            raise TeeflError(
                f"the aggregator sent the model as {h.encoding!r}; this plan's "
                f"network.compression is {self.plan.network.compression!r}"
            )
        asm = assembly.Assembler.for_header(h, 1 << 40, self.check)
        try:
            asm.receive(framing.reader(self.data), framing.STEP, lambda: fault("download", r))
        except codec.PayloadError as exc:  # the connection ended mid-payload
            raise framing.Closed(str(exc)) from None
        # a checksum mismatch or a malformed frame here is corruption: fatal, not a retry
        raw = compression.decompress(asm.finish(), h.raw_size, 1 << 40)
        resident = self.resident
        if (
            resident is not None
            and len(raw) == len(resident.payload)
            and raw[: len(resident.head)] == resident.head
            and resident.intact()
        ):
            memoryview(resident.payload)[:] = raw
            return None, h.total_size
        return codec.decode_state(raw), h.total_size

    def _download(self, stub, r: int) -> tuple[dict[str, torch.Tensor] | None, int]:
        if self.data is not None:
            return self._download_data(r)
        stream = stub.GetModel(
            teefl_pb2.ModelRequest(collaborator=self.name, round=r), metadata=self._md
        )
        try:
            first = next(stream)
            if not first.HasField("header"):
                raise TeeflError("model stream did not start with a header")
            h = first.header
            asm = assembly.Assembler.for_header(h, 1 << 40, self.check)
            for chunk in stream:
                if chunk.offset != asm.filled:
                    raise TeeflError(f"model stream out of order at offset {chunk.offset}")
                asm.add(chunk.data)
                fault("download", r)
            payload = asm.finish()
        except grpc.RpcError as exc:
            raise self._classify(exc) from None
        return codec.decode_state(payload), h.total_size
