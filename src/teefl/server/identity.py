"""Who may act as which collaborator: ONE peer check for every transport, and the sessions.

The check (`Identity.check`) is the same for a gRPC call and a data connection: the transport
(TLS 1.3, under mtls a client certificate whose CN is the claimed name and a plan member, CA:false,
clientAuth, not revoked), then -- after enrolment -- the token of the member's latest successful
Join and, with collaborators' attestation, exactly the session certificate issued at that Join
(docs/security.md).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from teefl.errors import TeeflError
from teefl.plan import Plan, plan_digest
from teefl.security import attest, certificates, crl, plan_pki
from teefl.security import session as session_keys
from teefl.security.peer_identity import (
    REQUIRED_TLS_VERSION,
    IdentityError,
    check_client_certificate,
)
from teefl.security.reattest import Attested, Cadence
from teefl.security.session import SessionCA
from teefl.transport.base import REATTEST_DUE, Peer, Refused
from teefl.wire import peerinput

log = logging.getLogger("teefl.aggregator")


@dataclass(eq=False)
class Session:
    """A collaborator's latest successful Join: what every later call and data connection of
    that name must present, and what a newer Join cancels."""

    name: str
    token: bytes  # 32 random bytes: metadata `teefl-session` and the data plane's HELLO
    #: SHA-256 of the session certificate's DER (collaborators' attestation), else None
    cert_sha256: bytes | None = None
    calls: set[Any] = field(default_factory=set)  # handles of its calls in flight
    conns: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # its data connections
    #: the attestation accepted at that Join (collaborators' attestation), else None
    attested: Attested | None = None


class Identity:
    """Keys, certificates, sessions and the peer check of the aggregator (docs/security.md).

    With ``attestation.aggregator: required`` the TLS key is made here, in memory, and the server
    certificate is self-signed for it; the provisioned key only endorses it. With
    ``attestation.collaborators: required`` an in-memory session CA is made here: the only issuer
    of certificates that may carry a collaborator's model traffic.
    """

    def __init__(
        self,
        plan: Plan,
        run_dir: Path,
        recorder: Any,
        ended: Callable[[], None],
        workload_digest: str = "",
        strategy_digest: str = "",
    ):
        self.plan, self.run_dir, self.rec, self._ended = plan, run_dir, recorder, ended
        #: the aggregator's own workload digest; a collaborator must send it, or one of the
        #: plan's workload.allowed_digests
        self.workload_digest = workload_digest
        #: the code digest of the plan's strategy ("" for one built into teefl)
        self.strategy_digest = strategy_digest
        self.allowed_digests = frozenset(plan.workload.allowed_digests)
        self.names = list(plan.collaborators)
        att, tls = plan.security.attestation, plan.security.tls
        self.transport = transport = plan.security.transport or "none"
        self.sessions: dict[str, Session] = {}  # collaborator -> its latest successful Join
        self.lock = threading.Lock()  # guards `sessions` (never held while waiting)
        self.conn_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.nonces = attest.NonceBook()
        self.sections = attest.config_sections(plan)
        #: what our own evidence and endorsement bind: the plan, CA and our code digests
        self.binding = attest.party_binding(plan, workload_digest, strategy_digest)
        #: refusals of peers, logged and recorded at a bounded rate (peerinput.py)
        self.refusals = peerinput.RefusalLog(log, recorder)
        log.info(
            "plan fingerprint %s (configuration binding %s)",
            plan_digest(plan).hex(),
            self.binding.hex(),
        )
        self.verifier = (
            attest.Verifier(att, "collaborator") if att.collaborators == "required" else None
        )
        self.session_ca = SessionCA() if self.verifier is not None else None
        #: how long a collaborator's accepted attestation lasts (None: the whole session)
        self.cadence = Cadence.of(att) if self.verifier is not None else None
        self.clock = time.monotonic  # what attestations are timed by (tests move it)
        self.revoked: frozenset[int] = frozenset()
        if transport != "none" and tls.crl is not None:
            assert tls.ca is not None  # require_transport
            self.revoked = crl.load_crl(tls.crl, tls.ca)
        self.quotes = attest.RateLimiter()
        self.provider: Any = None
        #: the TLS certificate and key this aggregator serves with: PEM bytes made in memory
        #: (attested aggregator) or the provisioned files
        self.tls_chain: tuple[bytes, bytes] | tuple[Path, Path] | None = None
        if transport == "none":
            return
        if att.aggregator == "required":
            assert tls.ca is not None and tls.server_cert is not None and tls.server_key is not None
            # the provisioned identity: checked now, used only to endorse the in-memory key
            certificates.check_certificate(
                tls.server_cert, ca_path=tls.ca, key_path=tls.server_key, purpose="server"
            )
            self.endorser = certificates.load_private_key(tls.server_key)
            self.endorsement_pem = tls.server_cert.read_bytes()
            key = session_keys.new_key()
            self.tls_chain = (
                session_keys.self_signed_server(key, plan_pki.plan_hosts(plan)),
                session_keys.key_pem(key),
            )
            self.own_spki = session_keys.spki_of(key)
            self.provider = attest.make_provider(att)
        elif tls.server_cert is not None and tls.server_key is not None:
            self.tls_chain = (tls.server_cert, tls.server_key)

    def client_roots(self) -> bytes | None:
        """The issuers a client certificate may come from (mtls): the plan's CA (enrolment, or
        everything without collaborators' attestation) and the in-memory session CA."""
        if self.transport != "mtls":
            return None
        ca = self.plan.security.tls.ca
        if ca is None:
            raise TeeflError("transport mtls needs security.tls.ca to verify collaborators")
        roots = certificates.load_certificate(ca).public_bytes(Encoding.PEM)
        if self.session_ca is not None:
            roots += self.session_ca.pem
        return roots

    # -- refusals ------------------------------------------------------------------------------
    def refuse(self, peer: Peer, reason: str, status: str = "PERMISSION_DENIED") -> Refused:
        """Log a refusal at a bounded rate; returns the error to raise. The name and the reason
        may carry what an unauthenticated peer claimed: shown truncated and escaped."""
        name = peer.name
        if name and not peerinput.valid_name(name):
            reason = reason.replace(name, peerinput.shown(name))
        self.refusals.refused(
            peer.kind, peer.address, reason, collaborator=peerinput.name_for_log(name)
        )
        return Refused(reason, status)

    # -- sessions ------------------------------------------------------------------------------
    def current(self, name: str, token: bytes | None) -> bool:
        """Is ``token`` the session token of ``name``'s latest successful Join?"""
        session = self.sessions.get(name)
        return (
            session is not None and token is not None and hmac.compare_digest(session.token, token)
        )

    def revoke(self, name: str, why: str) -> None:
        """End ``name``'s session: its token and certificate stop working, its calls in flight
        are cancelled and its data connections cut (nothing half-received is counted)."""
        with self.lock:
            old = self.sessions.pop(name, None)
            calls, conns = (list(old.calls), list(old.conns)) if old is not None else ([], [])
        if old is None:
            return
        for handle in calls:
            handle.cancel()
        for conn in conns:
            conn.cancel()
        self._ended()  # its long polls end
        log.info("session of %s ended: %s", name, why)
        self.rec.info("session_ended", collaborator=name, reason=why)

    def open_session(
        self, name: str, cert_sha256: bytes | None = None, attested: Attested | None = None
    ) -> Session:
        session = Session(name, os.urandom(32), cert_sha256, attested=attested)
        with self.lock:
            self.sessions[name] = session
        return session

    def attested_session(self, name: str) -> bool:
        """Whether ``name`` holds a session whose evidence was accepted (a Join now renews it)."""
        with self.lock:
            session = self.sessions.get(name)
        return session is not None and session.attested is not None

    # -- re-attestation (security.attestation.reattest_every) ----------------------------------
    def admit(self, name: str, rnd: int) -> bool:
        """May ``name`` be handed round ``rnd``? False when its attestation does not cover that
        round: it must Challenge and Join again first. Admitting it counts the round as begun
        under this attestation (`reattest.Cadence.admit`), so the round's model and update are
        not refused later however long it trains."""
        if self.cadence is None:
            return True
        with self.lock:
            session = self.sessions.get(name)
            if session is None or session.attested is None:
                return True  # no session: every model call is refused by `check` anyway
            return self.cadence.admit(session.attested, rnd, self.clock())

    def require_covered(self, name: str, rnd: int) -> None:
        """Refuse the model or the update of round ``rnd`` to ``name`` when its attestation does
        not cover that round (a collaborator that ignored WaitRound's ``reattest``)."""
        if self.cadence is None:
            return
        with self.lock:
            session = self.sessions.get(name)
            last = session.attested if session is not None else None
            due = last is not None and self.cadence.due(last, rnd, self.clock())
        if due:
            assert last is not None
            raise Refused(
                f"{REATTEST_DUE}: the attestation of {name} (accepted in round {last.round}) "
                f"does not cover round {rnd} (security.attestation.reattest_every: "
                f"{self.cadence.describe()}); Challenge and Join again with fresh evidence",
                "FAILED_PRECONDITION",
            )

    # -- the peer check ------------------------------------------------------------------------
    def _transport_identity(self, peer: Peer) -> str:
        """The name the transport lets this peer act as (`peer_identity.authorize`,
        transport-neutral)."""
        name = peer.name
        if self.transport in ("tls", "mtls") and peer.tls_version != REQUIRED_TLS_VERSION:
            raise Refused(
                f"connection uses {peer.tls_version or 'no TLS'}; teefl requires "
                f"{REQUIRED_TLS_VERSION}",
                "UNAUTHENTICATED",
            )
        if self.transport != "mtls":
            if name not in self.names:
                raise Refused(f"'{name}' is not a collaborator of this plan")
            return name
        cn = peer.cn
        if cn is None:
            raise Refused(
                "no verified client certificate: transport mtls requires one", "UNAUTHENTICATED"
            )
        if cn != name:
            raise Refused(
                f"certificate CN '{cn}' does not match claimed collaborator name '{name}'"
            )
        if cn not in self.names:
            raise Refused(f"certificate CN '{cn}' is not a collaborator of this plan")
        return cn

    def check(self, peer: Peer, attested: bool = True) -> str:
        """Who this peer may act as, or `Refused` (logged).

        ``attested=False``: an enrolment call (Challenge, Join): the transport's identity only
        (under mtls the plan-CA certificate with CN = name, clientAuth, CA:false, not revoked).
        Otherwise, in every mode, the token of the member's latest successful Join, and under
        mtls a certificate that may carry model traffic (with collaborators' attestation:
        exactly the session certificate of that Join). The call or connection is remembered
        with the session, so a later Join of that name cancels it.
        """
        try:
            name = self._transport_identity(peer)
            issuer = self.session_ca.subject_der if self.session_ca is not None else None
            if not attested:
                if self.transport == "mtls":
                    check_client_certificate(
                        peer.cert, name, enrol=True, session_issuer=issuer, revoked=self.revoked
                    )
                return name
            with self.lock:
                session = self.sessions.get(name)
            if not self.current(name, peer.token):
                raise Refused(
                    f"no current session for {name} (token missing or outdated): Join first",
                    "UNAUTHENTICATED",
                )
            assert session is not None
            if self.transport == "mtls":
                check_client_certificate(
                    peer.cert,
                    name,
                    enrol=False,
                    session_issuer=issuer,
                    session_cert_sha256=session.cert_sha256,
                    revoked=self.revoked,
                )
            with self.lock:
                if self.sessions.get(name) is not session:  # a newer Join came in meanwhile
                    raise Refused(f"the session of {name} ended: Join first", "UNAUTHENTICATED")
                if peer.connection:
                    session.conns.add(peer.handle)
                    self.conn_tokens[peer.handle] = peer.token
                elif peer.handle is not None:
                    session.calls.add(peer.handle)
            if not peer.connection and peer.handle is not None:
                handle = peer.handle
                if peer.on_end is None or not peer.on_end(lambda: session.calls.discard(handle)):
                    session.calls.discard(handle)  # the call already ended
        except IdentityError as exc:
            raise self.refuse(peer, str(exc), exc.code.name) from None
        except Refused as exc:
            raise self.refuse(peer, exc.reason, exc.status) from None
        return name

    # -- enrolment -----------------------------------------------------------------------------
    def same_plan(self, peer: Peer, name: str, theirs: dict[str, str]) -> None:
        """Refuse a collaborator whose plan (or CA) differs from ours, naming where."""
        if not theirs:
            raise self.refuse(
                peer,
                f"{name} sent no plan fingerprint: every party must run the same teefl version",
                "FAILED_PRECONDITION",
            )
        differ = attest.differing_sections(self.sections, theirs)
        if differ:
            raise self.refuse(
                peer,
                f"the plan of {name} differs from the aggregator's in: {', '.join(differ)} "
                "(every party must use the same plan file and CA certificate)",
                "FAILED_PRECONDITION",
            )

    def same_workload(self, peer: Peer, name: str, theirs: str) -> None:
        """Refuse a collaborator whose workload code differs from ours (its digest neither ours
        nor in the plan's workload.allowed_digests), naming both digests."""
        if not self.workload_digest or theirs == self.workload_digest:
            return
        if theirs and theirs in self.allowed_digests:
            return
        raise self.refuse(
            peer,
            f"the workload code of {name} differs from the aggregator's: {name} runs digest "
            f"{theirs or '(none sent)'}, the aggregator {self.workload_digest} (the same "
            "workload files and teefl version on every party, or list the digest in the "
            "plan's workload.allowed_digests)",
            "FAILED_PRECONDITION",
        )

    def verify_join(
        self, peer: Peer, name: str, request: Any, rnd: int = 0, renewal: bool = False
    ) -> tuple[bytes, bytes, Attested]:
        """Check a collaborator's evidence, bound to the key it made in memory (its TEE) and to
        our nonce and configuration; refuse (and record why) if it fails. ``rnd``: the open
        round; ``renewal``: the Join replaces a session whose evidence was accepted (a
        re-attestation). Returns the session certificate issued for that key (PEM, SHA-256 of
        its DER) and the accepted attestation."""
        assert self.verifier is not None and self.session_ca is not None
        t0 = time.monotonic()
        record: dict[str, Any] = {
            "collaborator": name,
            "peer": peer.address,
            "t_wall": time.time(),
            "round": rnd,
            "reattest": renewal,
            "nonce": bytes(request.nonce).hex(),
        }
        span = {"collaborator": name, **({"round": rnd, "reattest": True} if renewal else {})}
        try:
            if not request.HasField("evidence"):
                raise attest.AttestationError("attestation required: Join carried no evidence")
            nonce = self.nonces.take(name, request.nonce)
            spki = bytes(request.session_key)
            if not spki:
                raise attest.AttestationError(
                    "attestation required: Join carried no session key (the public key the "
                    "collaborator made in its TEE)"
                )
            evidence = attest.from_proto(request.evidence)
            record.update(kind=evidence.kind, provider=evidence.provider)
            # bound to the digest it claimed at Join (already ours or allowed): a host that
            # claims our digest while its TEE loaded other code fails here
            binding = attest.party_binding(self.plan, request.workload_digest)
            record["workload_digest"] = request.workload_digest
            verdict = self.verifier.verify(evidence, spki, nonce, binding)
            issued = self.session_ca.issue(name, spki)
        except TeeflError as exc:
            record.update(accepted=False, reason=str(exc))
            attest.write_verdict(self.run_dir, f"collaborator-{name}", record)
            self.rec.record("attest", t0, time.monotonic(), accepted=False, **span)
            raise self.refuse(peer, str(exc), "PERMISSION_DENIED") from None
        record.update(
            accepted=True, verdict=verdict.to_dict(), session_key=attest.fingerprint(spki)
        )
        attest.write_verdict(self.run_dir, f"collaborator-{name}", record)
        t1 = time.monotonic()
        self.rec.record("attest", t0, t1, accepted=True, **span)
        log.info(
            "%s %s (%s, %s)",
            name,
            f"re-attested in round {rnd}" if renewal else "attested",
            verdict.tee_type,
            verdict.status,
        )
        return (*issued, Attested(rnd, self.clock()))
