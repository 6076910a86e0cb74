"""The transport-neutral handlers: challenge, join, wait_round, download, upload.

Each takes a `transport.base.Peer` and the request message, and answers the reply message or
raises a `transport.base.Refused` (a status name and a reason); the transports
(`server.grpc_adapter`, `server.socket_adapter`) only move bytes and map the errors.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from teefl.security import attest
from teefl.server.checkpointer import Checkpointer
from teefl.server.fairshare import FairShare, Superseded
from teefl.server.identity import Identity
from teefl.server.intake import Intake
from teefl.server.publish import Publisher
from teefl.server.rounds import Rounds
from teefl.server.transfers import Transfer
from teefl.server.upload import Upload
from teefl.transport.base import Cancelled, Peer, Precondition, Refused
from teefl.wire import codec, roundconfig, teefl_pb2

log = logging.getLogger("teefl.aggregator")

#: the aggregator's quotes for Challenges: per collaborator a burst of this many, then one per
#: QUOTE_EVERY_S seconds (and per peer host the same for the whole federation)
QUOTE_BURST = 3
QUOTE_EVERY_S = 10.0


def peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address without the port."""
    rest = peer.split(":", 1)[1] if ":" in peer else peer
    return rest.rsplit(":", 1)[0]


class Download:
    """One download of the open round's model: its slot, header and payload.

    The transport sends ``header`` then ``payload`` (or gRPC's pre-serialized ``chunks``),
    calling ``transfer.touch`` as bytes move, then `sent`; `end` runs in every case, once."""

    def __init__(self, service: Service, name: str, transfer: Transfer, data_plane: bool) -> None:
        self.service, self.name, self.transfer = service, name, transfer
        r, pub = service.rounds, service.publisher
        self.rnd = r.round
        self.payload, digest, crc = pub.payload, pub.digest, pub.crc
        encoding, raw_size = "", 0
        if data_plane and pub.compressed is not None:  # zstd: compressed once per round
            raw_size, encoding = len(self.payload), "zstd"
            self.payload, digest, crc = pub.compressed
        self.chunks = None if data_plane else pub.wire_chunks  # gRPC: serialized once
        self.header = teefl_pb2.Header(
            collaborator=name,
            round=self.rnd,
            total_size=len(self.payload),
            sha256=digest,
            format=codec.FORMAT,
            crc32c=crc,
            encoding=encoding,
            raw_size=raw_size,
        )
        self.ticket: Any = None
        self.t0 = self.t1 = time.monotonic()

    def acquire(self) -> None:
        """A send slot: a bounded number stream at once, one per collaborator."""
        try:
            self.ticket = self.service.download_slots.acquire(self.name, self.transfer.supersede)
        except Superseded as exc:
            raise Cancelled(f"download of {self.name}: {exc}") from None
        self.t1 = time.monotonic()

    def start(self) -> None:
        r = self.service.rounds
        with r.cond:
            self.transfer.touch()  # idle from now on, not from the wait for a slot
            r.sending.add(self.transfer)

    def stop(self) -> None:
        r = self.service.rounds
        with r.cond:
            r.sending.discard(self.transfer)

    def sent(self) -> None:
        """Every byte went: the checkpoint writer counts it, and the download is recorded."""
        self.service.checkpointer.download_served()

    def record(self) -> None:
        self.service.rec.record(
            "serve_download",
            self.t1,
            time.monotonic(),
            round=self.rnd,
            bytes=self.header.total_size,
            collaborator=self.name,
            queued_s=round(self.t1 - self.t0, 6),
        )

    def release(self) -> None:
        if self.ticket is not None:
            self.service.download_slots.release(self.ticket)
            self.ticket = None


class Service:
    """The aggregator's handlers, shared by every transport."""

    def __init__(
        self,
        plan: Any,
        run_id: str,
        recorder: Any,
        identity: Identity,
        rounds: Rounds,
        intake: Intake,
        publisher: Publisher,
        checkpointer: Checkpointer,
    ) -> None:
        self.plan, self.run_id, self.rec = plan, run_id, recorder
        self.identity, self.rounds, self.intake = identity, rounds, intake
        self.publisher, self.checkpointer = publisher, checkpointer
        self.names = rounds.names
        self.data_plane = plan.network.data_plane  # "socket" or "grpc"
        self.data_port = 0  # the data plane's port once serving (0: gRPC only)
        #: send slots, shared fairly: one download per collaborator at a time
        self.download_slots = FairShare(plan.federation.max_concurrent_downloads)

    # -- enrolment -----------------------------------------------------------------------------
    def challenge(
        self, peer: Peer, request: teefl_pb2.ChallengeRequest
    ) -> teefl_pb2.ChallengeReply:
        ident = self.identity
        name = ident.check(peer, attested=False)
        reply = teefl_pb2.ChallengeReply(
            evidence_required=ident.verifier is not None, plan_sections=ident.sections
        )
        if ident.verifier is not None:
            reply.nonce = ident.nonces.issue(name)
        if request.want_evidence:
            if ident.provider is None:
                raise ident.refuse(
                    peer,
                    "this aggregator's plan does not provide attestation "
                    "(security.attestation.aggregator is off)",
                    "FAILED_PRECONDITION",
                )
            if len(request.nonce) != attest.NONCE_SIZE:
                raise ident.refuse(
                    peer, f"challenge nonce must be {attest.NONCE_SIZE} bytes", "INVALID_ARGUMENT"
                )
            # a quote only for an authenticated caller (above), and not without pause
            wait = ident.quotes.allow(
                (f"name:{name}", QUOTE_BURST, QUOTE_EVERY_S),
                (
                    f"peer:{peer_host(peer.address)}",
                    QUOTE_BURST * len(self.names),
                    QUOTE_EVERY_S / len(self.names),
                ),
            )
            if wait:
                raise ident.refuse(
                    peer,
                    f"rate limit: too many Challenges for evidence from {name}; retry in "
                    f"{wait:.0f} s",
                    "RESOURCE_EXHAUSTED",
                )
            with self.rec.span("attest", collaborator=name, evidence="own"):
                ev = ident.provider.get_evidence(
                    attest.report_data_for(ident.own_spki, request.nonce, ident.binding)
                )
                signature = attest.endorse(
                    ident.endorser, ident.own_spki, request.nonce, ident.binding
                )
            reply.aggregator_evidence.CopyFrom(attest.to_proto(ev))
            reply.workload_digest = ident.workload_digest
            reply.strategy_digest = ident.strategy_digest
            reply.endorsement.certificate = ident.endorsement_pem
            reply.endorsement.signature = signature
        return reply

    def join(self, peer: Peer, request: teefl_pb2.JoinRequest) -> teefl_pb2.JoinReply:
        ident = self.identity
        name = ident.check(peer, attested=False)
        renewal = ident.attested_session(name)  # a re-attestation (or a rejoin) of a member
        # any Join of this name -- whatever its outcome -- ends the earlier session: a refused
        # Join must not leave an earlier attestation, token or connection in place
        ident.revoke(name, "a new Join")
        ident.same_plan(peer, name, dict(request.plan_sections))
        ident.same_workload(peer, name, request.workload_digest)
        cert_pem, cert_sha256, attested = b"", None, None
        if ident.verifier is not None:
            rnd = self.rounds.position(name)[0]
            try:
                cert_pem, cert_sha256, attested = ident.verify_join(
                    peer, name, request, rnd, renewal
                )
            except Refused as exc:
                if renewal:
                    # the evidence of a member of the run no longer verifies: the open round
                    # does not wait for it, the others close it under the quorum rules; a
                    # later accepted Join brings it back. (A refused *first* Join is waited
                    # for until round_timeout, as before: the party may still be starting, or
                    # the refused Join was someone else's with its enrolment key.)
                    self.rounds.exclude(name, exc.reason)
                raise
        session = ident.open_session(name, cert_sha256, attested)
        self.rounds.joined_member(name)
        log.info("%s joined from %s", name, peer.address)
        self.rec.info("joined", collaborator=name, peer=peer.address)
        current, holds, durable = self.rounds.position(name)
        reply = teefl_pb2.JoinReply(
            run_id=self.run_id,
            rounds=self.rounds.total,
            current_round=current,
            nonce=os.urandom(32),
            session_token=session.token,
            session_cert=cert_pem,
            plan_sections=ident.sections,
            holds_update=holds,
            durable_round=durable,
        )
        if self.data_port:
            reply.data_port = self.data_port
        return reply

    # -- rounds --------------------------------------------------------------------------------
    def wait_round(self, peer: Peer, request: teefl_pb2.WaitRequest) -> teefl_pb2.WaitReply:
        name = self.identity.check(peer)
        token, ident = peer.token, self.identity
        w = self.rounds.wait(name, request.after_round, lambda: ident.current(name, token))
        if w.done:
            return teefl_pb2.WaitReply(round=0, done=True, durable_round=w.durable_round)
        if w.round and not ident.admit(name, w.round):
            # its attestation does not cover this round: fresh evidence first (a new Join)
            assert ident.cadence is not None
            log.info(
                "%s: attestation due for round %d (%s): asked to attest again",
                name,
                w.round,
                ident.cadence.describe(),
            )
            self.rec.info("reattest_due", collaborator=name, round=w.round)
            return teefl_pb2.WaitReply(
                round=w.round,
                reattest=True,
                evaluate_only=w.evaluate_only,
                durable_round=w.durable_round,
            )
        if w.round:
            return teefl_pb2.WaitReply(
                round=w.round,
                evaluate_only=w.evaluate_only,
                durable_round=w.durable_round,
                round_config=roundconfig.to_proto(w.config or {}),
            )
        return teefl_pb2.WaitReply(round=0, durable_round=w.durable_round)

    # -- the model -----------------------------------------------------------------------------
    def download(
        self, name: str, rnd: int, cancel: Any, probe: Any = None, data_plane: bool = False
    ) -> Download:
        """The open round's model for ``name`` (already checked), or `Precondition` when round
        ``rnd`` is not open or ``name``'s attestation does not cover it (reattest_every); the
        caller acquires its slot and sends it."""
        r = self.rounds
        self.identity.require_covered(name, rnd)  # its attestation covers the round
        with r.cond:
            if rnd != r.round or r.done:
                raise Precondition(f"round {rnd} is not open (open round: {r.round})")
            transfer = Transfer("download", name, r.round, cancel, probe)
            return Download(self, name, transfer, data_plane)

    # -- updates -------------------------------------------------------------------------------
    def upload(
        self, name: str, h: Any, cancel: Any, probe: Any, token: bytes | None, t0: float
    ) -> Upload:
        """One update of ``name`` (already checked) announced by header ``h``."""
        transfer = Transfer("upload", name, h.round, cancel, probe)
        rnd, ident = h.round, self.identity
        return Upload(
            self.intake, name, h, transfer, token, t0, lambda: ident.require_covered(name, rnd)
        )

    def refuse(self, peer: Peer, reason: str, status: str) -> Refused:
        return self.identity.refuse(peer, reason, status)
