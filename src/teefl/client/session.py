"""A collaborator's session with the aggregator: attest, join, rejoin after a loss with a
bounded backoff, and line up with the round a (restarted) aggregator has open.

Nothing of the model is requested before the challenge succeeds; the aggregator in turn refuses
every model call from a collaborator whose evidence it has not accepted.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teefl.client.keeper import Keeper
from teefl.errors import TeeflError
from teefl.measure.events import EventRecorder
from teefl.plan import Plan
from teefl.security import attest
from teefl.security import session as session_keys
from teefl.security.reattest import Attested, Cadence
from teefl.security.tls_diagnosis import split_target
from teefl.transport.client import (
    Challenge,
    ClientTransport,
    Connect,
    Disconnect,
    Join,
    Lost,
    Open,
    PutUpdate,
    Stale,
)
from teefl.wire import teefl_pb2

log = logging.getLogger("teefl.collaborator")

#: what ends a connection to the aggregator rather than the run: a restart or a network fault
#: surfaces as any of these (a reset TCP connection, a TLS record cut off, an early EOF), and
#: each is retried for ``federation.reconnect_timeout``
LOSS_ERRORS = (Lost, ConnectionError, TimeoutError, ssl.SSLError, EOFError)


class Backoff:
    """How long to wait before rejoining: 0.5 s doubling to 10 s, and a `TeeflError` once the
    aggregator has been lost for more than ``limit`` seconds."""

    FIRST, MAX = 0.5, 10.0

    def __init__(self, limit: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.clock = limit, clock
        self.since: float | None = None
        self.delay = self.FIRST

    def reset(self) -> None:
        """Contact is back (a Join succeeded)."""
        self.since, self.delay = None, self.FIRST

    def next(self, what: str) -> float:
        """The wait before the next try; raises once the loss lasts longer than ``limit``."""
        now = self.clock()
        if self.since is None:
            self.since = now
        if now - self.since > self.limit:
            raise TeeflError(f"lost the aggregator at {what} for more than {self.limit:g} s")
        delay = self.delay
        self.delay = min(self.delay * 2, self.MAX)
        return delay


class Session:
    """Challenge/attest and Join over ``transport``; ``keeper`` holds what a rejoin may need
    to send again."""

    def __init__(
        self,
        plan: Plan,
        name: str,
        address: str,
        run_dir: Path,
        transport: ClientTransport,
        keeper: Keeper,
        session_key: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan, self.name, self.address, self.run_dir = plan, name, address, Path(run_dir)
        self.transport, self.keeper, self.session_key = transport, keeper, session_key
        self.sleep, self.clock = sleep, clock
        self.backoff = Backoff(plan.federation.reconnect_timeout, clock)
        att = plan.security.attestation
        # an unpinned policy stops us here, at start
        self.verifier = attest.Verifier(att, "aggregator") if att.aggregator == "required" else None
        #: how long our check of the aggregator's evidence lasts (None: the whole session)
        self.cadence = Cadence.of(att) if self.verifier is not None else None
        #: our last accepted check of the aggregator's evidence (its aggregator attestation)
        self.checked: Attested | None = None
        self._renewing = 0  # the round the Join under way re-attests for (0: none)
        #: what this collaborator runs with: compared with the aggregator's at every Join and,
        #: with attestation, bound into the evidence of both
        self.sections = attest.config_sections(plan)
        self.pin: bytes | None = None  # the aggregator's certificate, when it must attest
        self.aggregator_key: bytes | None = None  # its attested TLS key, once checked
        self._verdict: dict[str, Any] | None = None
        #: this party's workload digest, sent at Join (set by the collaborator once its
        #: trainer has resolved the workload; "" for a trainer without one)
        self.workload_digest = ""

    @property
    def binding(self) -> bytes:
        """What our evidence binds: plan, CA, our workload digest (`attest.party_binding`)."""
        return attest.party_binding(self.plan, self.workload_digest)

    def connect(self, patience: float = 60.0) -> None:
        """The first contact: waits up to ``patience`` seconds for the aggregator."""
        self.pin = self.transport.handle(Connect(patience))

    def join(self, reattest: int = 0) -> teefl_pb2.JoinReply:
        """(Reconnect,) attest and join; opens the session's model traffic. ``reattest``: the
        round this Join renews the attestation for (``reattest_every``; 0: a first Join or a
        rejoin after a loss) -- recorded with the verdict."""
        self._renewing = reattest
        self.pin = self.transport.handle(Connect())  # nothing to do unless dropped after a loss
        evidence: dict[str, Any] = {}
        checked_at = None
        if self.plan.security.attestation.enabled:
            evidence = self._attest()
            checked_at = self.clock()
        try:
            reply = self.transport.handle(
                Join(self.sections, workload_digest=self.workload_digest, **evidence)
            )
        except BaseException:
            self.joined()  # the aggregator's evidence was checked all the same: on record
            raise
        differ = attest.differing_sections(self.sections, dict(reply.plan_sections))
        if differ:
            raise TeeflError(
                f"the aggregator's plan differs from {self.name}'s in: {', '.join(differ)} "
                "(every party must use the same plan file and CA certificate); refusing it"
            )
        self.transport.handle(Open(reply, self.aggregator_key))
        self.backoff.reset()
        if self._verdict is not None:  # the aggregator's evidence was checked for this Join
            self._verdict["round"] = reply.current_round
            assert checked_at is not None
            self.checked = Attested(reply.current_round, checked_at)
        return reply

    def recheck_due(self, rnd: int) -> bool:
        """Must the aggregator's evidence be checked again (Challenge and Join) before this
        collaborator takes part in round ``rnd``? (``reattest_every``, `reattest.Cadence`.)"""
        if self.cadence is None or self.checked is None:
            return False
        return not self.cadence.admit(self.checked, rnd, self.clock())

    def joined(self) -> None:
        """After the Join's events are written: the aggregator's verdict, and a log line."""
        if self._verdict is not None:
            attest.write_verdict(self.run_dir, "aggregator", self._verdict)
            self._verdict = None

    def lost(self, exc: BaseException, rec: EventRecorder | None) -> None:
        """Contact broke (``exc``): drop the session, wait the backoff (or give up)."""
        try:
            delay = self.backoff.next(self.address)
        except TeeflError as err:
            raise TeeflError(f"{err} ({exc})") from None
        log.warning("%s: lost the aggregator (%s); rejoining in %.1f s", self.name, exc, delay)
        if rec is not None:
            rec.info("lost_aggregator", reason=str(exc))
        self.transport.handle(Disconnect())
        self.sleep(delay)

    def close(self) -> None:
        self.transport.close()

    # -- after a Join ------------------------------------------------------------------------
    def resync(self, reply: teefl_pb2.JoinReply, last: int, rec: EventRecorder) -> int:
        """Line up with the round the aggregator has open (`Keeper.after_join`), sending a kept
        update again where it lost ours; returns the round now counted as done."""
        plan = self.keeper.after_join(reply, last)
        if plan.resend is not None and self.resend(plan.resend, rec):
            return plan.resend
        return plan.last

    def resend(self, r: int, rec: EventRecorder) -> bool:
        """Send the kept update of round ``r`` again, if there is one: the same bytes."""
        copy = self.keeper.copy(r)
        if copy is None:
            return False
        header, payload = copy
        log.warning("%s: sending our kept update of round %d again", self.name, r)
        try:
            with rec.span("upload", round=r, resent=True) as s:
                self.transport.handle(PutUpdate(r, header, payload))
                s["bytes"] = len(payload)
        except Stale as exc:
            log.warning("%s: round %d closed meanwhile (%s)", self.name, r, exc)
        self.keeper.acked(r, header, payload)
        return True

    # -- attestation -------------------------------------------------------------------------
    def _attest(self) -> dict[str, Any]:
        """Challenge: check the aggregator's evidence and endorsement (if required), bind ours
        to its nonce; returns the evidence fields of our Join."""
        att = self.plan.security.attestation
        my_nonce = os.urandom(attest.NONCE_SIZE)
        want = att.aggregator == "required"
        reply = self.transport.handle(Challenge(my_nonce, want))
        if want:
            self._check_aggregator(reply, my_nonce)
        if not reply.evidence_required:
            return {}
        if self.session_key is None:
            raise TeeflError(
                "the aggregator requires collaborators' attestation, but this plan says "
                "security.attestation.collaborators: off"
            )
        spki = session_keys.spki_of(self.session_key)
        evidence = attest.make_provider(att).get_evidence(
            attest.report_data_for(spki, reply.nonce, self.binding)
        )
        return {"evidence": attest.to_proto(evidence), "nonce": reply.nonce, "session_key": spki}

    def _check_aggregator(self, reply: teefl_pb2.ChallengeReply, my_nonce: bytes) -> None:
        tls = self.plan.security.tls
        assert tls.ca is not None and self.pin is not None
        record: dict[str, Any] = {
            "collaborator": self.name,  # every collaborator of a run writes this file
            "address": self.address,
            "t_wall": time.time(),
            "round": self._renewing or None,  # the Join's open round, once it is known
            "reattest": bool(self._renewing),
            "nonce": my_nonce.hex(),
        }
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
            code = self._aggregator_code(reply)
            record.update(code)
            # our plan and CA, its claimed code digests: an aggregator running with another
            # plan or CA, or with other code than it claims, fails here
            binding = attest.party_binding(self.plan, reply.workload_digest, reply.strategy_digest)
            assert self.verifier is not None
            verdict = self.verifier.verify(
                attest.from_proto(reply.aggregator_evidence), spki, my_nonce, binding
            )
            endorsed = attest.verify_endorsement(
                reply.endorsement.certificate,
                reply.endorsement.signature,
                spki,
                my_nonce,
                binding,
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
        self._verdict = record
        self.aggregator_key = spki

    def _aggregator_code(self, reply: teefl_pb2.ChallengeReply) -> dict[str, Any]:
        """Refuse an aggregator whose workload digest is neither ours nor in the plan's
        workload.allowed_digests, or whose strategy code differs from the plan's strategy as
        found here; returns what was checked, for the verdict file. (Its evidence, verified
        next, proves that it runs the code it claims.)"""
        theirs = reply.workload_digest
        allowed = sorted({self.workload_digest, *self.plan.workload.allowed_digests} - {""})
        if allowed and theirs not in allowed:
            raise attest.AttestationError(
                f"the aggregator runs workload digest {theirs or '(none sent)'}, which this "
                f"collaborator's policy does not allow (its own {self.workload_digest or '-'}; "
                "workload.allowed_digests lists the others)"
            )
        checked = {"workload_digest": theirs, "strategy_digest": reply.strategy_digest}
        from teefl.strategy.registry import strategy_digest

        try:
            ours = strategy_digest(self.plan.federation.strategy.name)
        except TeeflError as exc:  # the strategy's code is not installed here: not compared
            checked["strategy_checked"] = f"no: {exc}"
            return checked
        if reply.strategy_digest != ours:
            raise attest.AttestationError(
                f"the aggregator runs strategy {self.plan.federation.strategy.name!r} with "
                f"code digest {reply.strategy_digest or '(teefl built-in)'}, this collaborator "
                f"has {ours or '(teefl built-in)'}"
            )
        checked["strategy_checked"] = "yes"
        return checked

    def _revoked(self) -> frozenset[int]:
        """The CA's revocation list, when the plan names one (checked against the endorsement)."""
        tls = self.plan.security.tls
        if tls.crl is None or tls.ca is None:
            return frozenset()
        from teefl.security import crl

        return crl.load_crl(tls.crl, tls.ca)
