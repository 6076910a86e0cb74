"""The aggregator: round state machine, the plan's aggregation strategy, checkpoints and the final
model.

Why a condition variable and long polls instead of collaborators polling on a timer: a round opens
the instant the last update is accumulated, and every waiting collaborator learns it within the
same millisecond -- idle time shows up as ``wait`` on the collaborator, never as communication.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.unknown_fields import UnknownFieldSet

from teefl.errors import TeeflError
from teefl.federation import attest, roundconfig
from teefl.federation.fairshare import FairShare, Superseded
from teefl.federation.faults import fault
from teefl.measure.events import EventRecorder
from teefl.plan import Plan, plan_digest
from teefl.rundir import RunDir
from teefl.security import pki
from teefl.security import session as session_keys
from teefl.security.session import SessionCA
from teefl.security.tls import (
    IdentityError,
    authorize,
    check_client_certificate,
    client_cert,
    peer_certificate_pem,
)
from teefl.store.atomic import write_atomic
from teefl.store.files import BufferPool
from teefl.store.rounds import RoundStore
from teefl.store.staging import StagingArea
from teefl.strategy import (
    RoundConfig,
    StrategyState,
    check_round_config,
    decode_state,
    encode_state,
)
from teefl.strategy.registry import plan_strategy
from teefl.transport import framing, socket_server
from teefl.transport.channels import bind, payload_check, server_options
from teefl.wire import assembly, codec, compression, peerinput, teefl_pb2, teefl_pb2_grpc
from teefl.wire.checks import FiniteScan, FlatUpdate, UpdateRejected, check_update
from teefl.workload.datasets import dataset_shape
from teefl.workload.models import build_model

log = logging.getLogger("teefl.aggregator")

#: initial-metadata key the aggregator sends once an upload holds a receive slot
UPLOAD_GO = "teefl-upload-go"

#: a long poll returns after this long with "nothing new", so dead connections surface
WAIT_KEEPALIVE_S = 15.0

#: metadata key of the session token (hex) that every call after Join carries
SESSION_METADATA = "teefl-session"

#: the aggregator's quotes for Challenges: per collaborator a burst of this many, then one per
#: QUOTE_EVERY_S seconds (and per peer host the same for the whole federation)
QUOTE_BURST = 3
QUOTE_EVERY_S = 10.0

_PEM = Encoding.PEM


class _Transfer:
    """An upload or a download in progress, as the idle cut (`Aggregator._supervise`) sees it.

    Idle means that no byte moved for ``idle_timeout``, however slowly bytes move: ``probe``
    reads the connection's byte counters from the kernel (`framing.tcp_moved`, data plane
    only), ``touch`` notes progress the transfer reports itself (a piece received or sent, a
    gRPC message); both cost a few attribute stores, no lock.
    """

    __slots__ = ("cancel", "cut", "kind", "last", "moved", "name", "probe", "round")

    def __init__(self, kind: str, name: str, rnd: int, cancel: Any, probe: Any = None) -> None:
        self.kind, self.name, self.round, self.cancel, self.probe = kind, name, rnd, cancel, probe
        self.last = time.monotonic()
        self.moved = probe() if probe is not None else None
        self.cut = False  # cut by the idle cut or superseded: the handler says so, not "broke"

    def touch(self) -> None:
        self.last = time.monotonic()

    def supersede(self) -> None:
        """A newer transfer of the same collaborator takes this one's slot (fairshare.py)."""
        if not self.cut:
            self.cut = True
            log.info(
                "%s of %s for round %d cut: a newer one of %s came",
                self.kind,
                self.name,
                self.round,
                self.name,
            )
            self.cancel()

    def idle_for(self, now: float) -> float:
        if self.probe is not None:
            moved = self.probe()
            if moved is not None and moved != self.moved:
                self.moved, self.last = moved, now
        return now - self.last


class _Malformed:
    """A request whose bytes are not the message the RPC takes (see `add_to_server`)."""

    def __init__(self, what: str, error: Exception) -> None:
        self.what, self.error = what, error


def _lenient(message_type: Any) -> Any:
    """A request deserializer that never raises: gRPC logs a traceback for a deserializer's
    exception and answers INTERNAL; the handler answers a `_Malformed` INVALID_ARGUMENT."""
    parse = message_type.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or a nesting beyond its limit
            return _Malformed(message_type.DESCRIPTOR.name, exc)

    return deserialize


def _crc_of(header: teefl_pb2.Header) -> int | None:
    return header.crc32c if header.HasField("crc32c") else None


def _sinks(*sinks: Any) -> Any:
    """One `assembly.Assembler` sink calling each of ``sinks`` that is not None, in order."""
    live = [s for s in sinks if s is not None]
    if len(live) < 2:
        return live[0] if live else None

    def both(piece: memoryview, offset: int) -> None:
        for sink in live:
            sink(piece, offset)

    return both


def _finished(asm: assembly.Assembler) -> codec.ReceivedPayload:
    """The received payload, checked against the header's digest; a mismatch refuses it."""
    try:
        return asm.finish()
    except codec.PayloadError as exc:
        raise UpdateRejected(str(exc)) from None


class StaleUpdate(UpdateRejected):
    """An update for a round that is closed (or not open yet): refused, never counted."""


class SessionEnded(StaleUpdate):
    """An update whose session a newer Join of its collaborator ended: never counted."""


@dataclass(eq=False)
class Session:
    """A collaborator's latest successful Join: what every later call and data connection of
    that name must present, and what a newer Join cancels."""

    name: str
    token: bytes  # 32 random bytes: metadata `teefl-session` and the data plane's HELLO
    #: SHA-256 of the session certificate's DER (collaborators' attestation), else None
    cert_sha256: bytes | None = None
    calls: set[Any] = field(default_factory=set)  # gRPC contexts of its calls in flight
    conns: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # its data connections


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address without the port."""
    rest = peer.split(":", 1)[1] if ":" in peer else peer
    return rest.rsplit(":", 1)[0]


def _has_unknown_fields(msg: Any) -> bool:
    return len(UnknownFieldSet(msg)) > 0 or (
        msg.HasField("header") and len(UnknownFieldSet(msg.header)) > 0
    )


class Aggregator(teefl_pb2_grpc.FederationServicer):
    """Holds the global model and runs rounds 1..R, then one final evaluation pass."""

    def __init__(self, plan: Plan, run_dir: Path, run_id: str, recorder: EventRecorder) -> None:
        self.plan, self.run_dir, self.run_id, self.rec = plan, Path(run_dir), run_id, recorder
        self.rounds = plan.federation.rounds
        self.names = list(plan.collaborators)
        channels, _, _, classes = dataset_shape(plan.dataset)
        model = build_model(plan.model.name, channels, classes, seed=plan.seed)
        self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.model_dir = RunDir(self.run_dir).model_dir

        self._init_identity()
        fed = plan.federation
        at_rest = plan.security.at_rest
        self.seal_key: bytes | None = None
        if at_rest.mode == "sealed":
            from teefl.security.sealed import load_key

            self.seal_key = load_key(at_rest.key_file, at_rest.key_env)
        self.store = RoundStore(
            self.run_dir,
            self.seal_key,
            keep=fed.keep_updates,
            run_id=run_id,
            staging_dir=self._staging_dir(),
        )
        self.check = payload_check(plan)  # what received updates are checked against
        self.cond = threading.Condition()
        self.round = 1  # the open round; rounds+1 is the final evaluation pass
        self.done = False
        self.failed: str | None = None
        self.received: dict[str, dict[str, Any]] = {}
        self.told_done: set[str] = set()
        self.joined: set[str] = set()
        self.persisting: set[str] = set()  # updates being written to disk, not yet counted
        self.close_pending = False  # every update is in; the round closes after the last ack
        #: uploads in progress (receiving their bytes), by collaborator
        self.inflight: dict[str, _Transfer] = {}
        self.sending: set[_Transfer] = set()  # downloads in progress
        #: receive slots, shared fairly: one upload per collaborator at a time (fairshare.py)
        self.slots = FairShare(fed.max_inflight_updates)
        self.polls: dict[str, object] = {}  # collaborator -> its one long poll (WaitRound)
        #: refusals of peers, logged and recorded at a bounded rate (peerinput.py)
        self.refusals = peerinput.RefusalLog(log, recorder)
        self.rx_pool = BufferPool(fed.max_inflight_updates)  # data-plane update buffers
        #: shared-memory receive slots (see staging.py); None: updates go to disk as they arrive
        self.staging = self._open_staging()
        self.spares = codec.Spares()  # earlier rounds' payloads, reused when free
        #: send slots, shared fairly: one download per collaborator at a time
        self.download_slots = FairShare(fed.max_concurrent_downloads)
        self.active = self.peak_active = 0  # updates being received right now, and the peak
        self.adding = 0  # acknowledged updates whose FedAvg add is still running
        self.transfers = 0  # model or update bytes moving right now (the checkpoint yields)
        self.quiet = threading.Condition()  # guards transfers/served; notified when they change
        self.served = 0  # downloads of the open round's model completed so far
        self.sum_lock = threading.Lock()  # serializes deferred adds (see `_deferred_add`)
        self.data_port = 0  # the data plane's port once serving (0: the gRPC streams only)
        #: checkpoints of closed rounds waiting to be written (see `_checkpoints`)
        self.ckpt_queue: queue.Queue[tuple[int, codec.Buffer, bytes, int, StrategyState] | None] = (
            queue.Queue()
        )
        threading.Thread(target=self._checkpoints, name="checkpoint", daemon=True).start()
        #: the aggregation rule, for the whole run (docs/strategies.md); what it must carry
        #: over a restart is saved with every checkpoint and restored from the one resumed from
        self.strategy = plan_strategy(fed.strategy)
        #: the last completed round of a resumed run (0: a restart in round 1, which had
        #: acknowledged updates but no durable checkpoint yet); None: a fresh run
        self.resumed_from: int | None = None
        resume = self.store.load_resume()
        completed = 0
        if resume is not None:
            self.resumed_from = completed = resume.round
            self.global_state = self._resumed_state(resume.payload)
            self._restore_strategy(resume)
            self.round = completed + 1
        #: the last round whose checkpoint is durable: collaborators keep a copy of each update
        #: they sent until they hear that its round is at most this (docs/reliability.md)
        self.durable_round = completed
        # what a dead aggregator left: temp files, updates of rounds whose checkpoint is
        # durable, metrics lines of the rounds it is about to close again
        self.store.clean_up(completed, final=completed == self.rounds)
        self.closed_before = self._rounds_closed_before()
        #: the open round's accumulator (`strategy.Accumulator`) and the config its
        #: collaborators train with
        self.round_config: RoundConfig = {}
        self.fedavg = self._new_round_aggregator()
        self.round_opened = time.monotonic()
        self._publish()
        self.model_info = {
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "size_bytes": len(self.payload),  # the model as it travels, serialized once
            "tensors": len(self.global_state),
        }
        # whatever the run directory holds for the open round, with or without a checkpoint:
        # in round 1 a restart has none, and its acknowledged updates must count all the same
        if self._replay_open_round(startup=True) and self.resumed_from is None:
            self.resumed_from = 0
        fault("startup", self.round)  # crash tests: killed during a (re)start, after the replay

    def _staging_dir(self) -> Path | None:
        """The shared-memory staging directory where this plan stages updates (whether or not
        it can be opened now: a restart still reads what an earlier process staged there);
        None where it never stages (see `_open_staging`)."""
        fed = self.plan.federation
        if (
            fed.update_staging != "memory"
            or self.plan.network.data_plane != "socket"  # gRPC uploads are stored after decode
            or self.seal_key is not None  # stored as ciphertext: never in plain shared memory
            or self.plan.runtime.launcher != "native"  # Gramine: no tmpfs of the host's to trust
        ):
            return None
        return fed.staging_dir / f"teefl-{os.getuid()}"

    def _resumed_state(self, payload: bytes) -> dict[str, torch.Tensor]:
        """The checkpoint a restart resumes from, refused unless it fits the plan's model."""
        try:
            state = codec.decode_state(payload)
            check_update(self.global_state, state)
        except (codec.PayloadError, UpdateRejected) as exc:
            raise TeeflError(
                f"cannot resume from {self.run_dir / 'state.json'}: its checkpoint does not fit "
                f"the plan's model ({exc})"
            ) from None
        return state

    def _restore_strategy(self, resume: Any) -> None:
        """Give the strategy the state saved with the checkpoint resumed from. A checkpoint
        written before strategies were saved names none: a stateless strategy needs nothing,
        and a stateful one refuses to begin the next round with one line."""
        if resume.strategy is None:
            return
        source = self.run_dir / f"model/strategy-round-{resume.round:04d}"
        state = (
            StrategyState(resume.strategy)
            if resume.strategy_state is None
            else decode_state(resume.strategy_state, str(source))
        )
        if state.strategy != resume.strategy:
            raise TeeflError(
                f"cannot resume from {self.run_dir / 'state.json'}: it names strategy "
                f"{resume.strategy!r}, but the saved state is {state.strategy!r}'s"
            )
        self.strategy.restore(state)

    def _rounds_closed_before(self) -> set[int]:
        """Rounds an earlier process of this run recorded as closed (``round_closed`` in its
        events): closed again after a restart, they are not recorded twice."""
        from teefl.measure.events import read_events

        path = getattr(self.rec, "path", None)
        if path is None or not Path(path).exists():
            return set()
        return {
            e["round"]
            for e in read_events(path)
            if e.get("what") == "round_closed" and type(e.get("round")) is int
        }

    def _open_staging(self) -> StagingArea | None:
        directory = self._staging_dir()
        if directory is None:
            return None
        return StagingArea.open(directory, self.plan.federation.max_inflight_updates)

    def _new_round_aggregator(self):
        """The open round's accumulator and config. Beginning a round ends the previous one's
        accumulator: FedAvg (and FedOpt) take its sums over, their pages mapped already."""
        if not self.evaluating:
            config = self.strategy.configure(self.round)
            self.round_config = check_round_config(config, self.strategy.name)
        else:
            self.round_config = {}
        return self.strategy.begin(self.round, self.global_state, self._model_layout())

    def _model_layout(self) -> codec.Layout | None:
        """The global model's payload layout (`codec.Layout`), computed again only when the
        global state was replaced by something other than a payload of that layout."""
        if getattr(self, "_layout_for", None) is not self.global_state:
            self.layout = codec.Layout.of_state(self.global_state)
            self._layout_for = self.global_state
        return self.layout

    def _replay_open_round(self, startup: bool = False) -> int:
        """Count the updates the run directory holds for the open round, once each; returns
        how many. At start-up (round 1 included), and after every round close: the next
        round's updates acknowledged before a crash. Every bound an update was checked against
        on arrival is checked again (the files may have been edited since): its collaborator,
        its sample count, its metrics, its layout, shapes, dtypes and finiteness; one that
        fails is dropped and its collaborator may send it again (it is not counted)."""
        bound = self.plan.federation.max_samples_per_update
        rnd, n = self.round, 0
        for saved in self.store.load_updates(rnd, drop=self._dropped_on_replay):
            name, meta = saved.name, saved.meta
            try:
                if name not in self.names:
                    raise UpdateRejected(f"{name!r} is not a collaborator of this plan")
                if bool(meta.get("report")) != self.evaluating:
                    raise UpdateRejected("an evaluation report outside the evaluation pass")
                samples, metrics = meta.get("samples"), meta.get("metrics", {})
                if type(samples) is not int or not 0 < samples <= bound:
                    raise UpdateRejected(f"sample count {samples!r} outside 1..{bound}")
                if not isinstance(metrics, dict) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
                ):
                    raise UpdateRejected("its metrics are not numbers")
                state = None
                if not self.evaluating:
                    try:
                        state = codec.decode_state(saved.payload)
                    except codec.PayloadError as exc:
                        raise UpdateRejected(str(exc)) from None
                    check_update(self.global_state, state)
            except UpdateRejected as exc:
                log.warning("stored update of %s for round %d not counted: %s", name, rnd, exc)
                self.store.discard_update(rnd, name)
                self._dropped_on_replay(name, str(exc))
                continue
            if name in self.received:  # cannot be: the round was opened (or resumed) just now
                continue
            if state is not None:
                with self.sum_lock:
                    self.fedavg.add(state, samples, checked=True)
            self.received[name] = {"samples": samples, **metrics}
            self.rec.info("update_replayed", collaborator=name, round=rnd)
            n += 1
        if startup and (n or self.resumed_from is not None):
            log.warning(
                "resumed after round %s; %d acknowledged update(s) of round %d replayed",
                self.resumed_from if self.resumed_from is not None else 0,
                n,
                rnd,
            )
        elif n:
            log.warning(
                "%d acknowledged update(s) of round %d replayed from %s", n, rnd, self.run_dir
            )
        return n

    def _dropped_on_replay(self, name: str, reason: str) -> None:
        """A stored update not counted after all (see `_replay_open_round`): an event."""
        self.rec.info("update_dropped", collaborator=name, round=self.round, reason=reason)

    def _init_identity(self) -> None:
        """Keys, certificates and checks of the aggregator's identity (see docs/security.md).

        With ``attestation.aggregator: required`` the TLS key is made here, in memory, and the
        server certificate is self-signed for it; the provisioned key only endorses it. With
        ``attestation.collaborators: required`` an in-memory session CA is made here: the only
        issuer of certificates that may carry a collaborator's model traffic.
        """
        plan = self.plan
        att, tls = plan.security.attestation, plan.security.tls
        transport = plan.security.transport or "none"
        self.sessions: dict[str, Session] = {}  # collaborator -> its latest successful Join
        self.ident_lock = threading.Lock()  # guards `sessions` (never held while waiting)
        self.conn_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.nonces = attest.NonceBook()
        self.sections = attest.config_sections(plan)
        self.binding = attest.config_binding(plan)
        log.info(
            "plan fingerprint %s (configuration binding %s)",
            plan_digest(plan).hex(),
            self.binding.hex(),
        )
        self.verifier = (
            attest.Verifier(att, "collaborator") if att.collaborators == "required" else None
        )
        self.session_ca = SessionCA() if self.verifier is not None else None
        self.revoked: frozenset[int] = frozenset()
        if transport != "none" and tls.crl is not None:
            assert tls.ca is not None  # require_transport
            self.revoked = pki.load_crl(tls.crl, tls.ca)
        self.quotes = attest.RateLimiter()
        self.provider = None
        #: the TLS certificate and key this aggregator serves with: PEM bytes made in memory
        #: (attested aggregator) or the provisioned files
        self.tls_chain: tuple[bytes, bytes] | tuple[Path, Path] | None = None
        if transport == "none":
            return
        if att.aggregator == "required":
            assert tls.ca is not None and tls.server_cert is not None and tls.server_key is not None
            # the provisioned identity: checked now, used only to endorse the in-memory key
            pki.check_certificate(
                tls.server_cert, ca_path=tls.ca, key_path=tls.server_key, purpose="server"
            )
            self.endorser = pki.load_private_key(tls.server_key)
            self.endorsement_pem = tls.server_cert.read_bytes()
            key = session_keys.new_key()
            self.tls_chain = (
                session_keys.self_signed_server(key, pki.plan_hosts(plan)),
                session_keys.key_pem(key),
            )
            self.own_spki = session_keys.spki_of(key)
            self.provider = attest.make_provider(att)
        elif tls.server_cert is not None and tls.server_key is not None:
            self.tls_chain = (tls.server_cert, tls.server_key)

    def _client_roots(self) -> bytes | None:
        """The issuers a client certificate may come from (mtls): the plan's CA (enrolment, or
        everything without collaborators' attestation) and the in-memory session CA."""
        if (self.plan.security.transport or "none") != "mtls":
            return None
        ca = self.plan.security.tls.ca
        if ca is None:
            raise TeeflError("transport mtls needs security.tls.ca to verify collaborators")
        roots = pki.load_certificate(ca).public_bytes(_PEM)
        if self.session_ca is not None:
            roots += self.session_ca.pem
        return roots

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """The gRPC port's credentials: in-memory key, or the provisioned files (checked first,
        with readable messages); client certificates from `_client_roots` under mtls."""
        if (self.plan.security.transport or "none") == "none" or self.tls_chain is None:
            return None  # transport none, or bind() names the missing server certificate
        roots = self._client_roots()
        cert, key = self.tls_chain
        if isinstance(cert, bytes) and isinstance(key, bytes):
            return grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=roots, require_client_auth=roots is not None
            )
        from teefl.security.tls import server_credentials

        tls = self.plan.security.tls
        assert tls.ca is not None
        return server_credentials(
            tls.ca,
            Path(cert),
            Path(key),
            require_client_cert=roots is not None,
            extra_roots=self.session_ca.pem if self.session_ca is not None else None,
        )

    # -- sessions ------------------------------------------------------------------------------
    def _current(self, name: str, token: bytes | None) -> bool:
        """Is ``token`` the session token of ``name``'s latest successful Join?"""
        session = self.sessions.get(name)
        return (
            session is not None and token is not None and hmac.compare_digest(session.token, token)
        )

    def _revoke(self, name: str, why: str) -> None:
        """End ``name``'s session: its token and certificate stop working, its calls in flight
        are cancelled and its data connections cut (nothing half-received is counted)."""
        with self.ident_lock:
            old = self.sessions.pop(name, None)
            calls, conns = (list(old.calls), list(old.conns)) if old is not None else ([], [])
        if old is None:
            return
        for ctx in calls:
            ctx.cancel()
        for conn in conns:
            conn.cancel()
        with self.cond:
            self.cond.notify_all()  # its long polls end
        log.info("session of %s ended: %s", name, why)
        self.rec.info("session_ended", collaborator=name, reason=why)

    def _open_session(self, name: str, cert_sha256: bytes | None = None) -> Session:
        session = Session(name, os.urandom(32), cert_sha256)
        with self.ident_lock:
            self.sessions[name] = session
        return session

    @staticmethod
    def _call_token(context: grpc.ServicerContext) -> bytes | None:
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_METADATA:
                try:
                    return bytes.fromhex(value if isinstance(value, str) else value.decode())
                except (ValueError, UnicodeDecodeError):
                    return None
        return None

    # -- state -------------------------------------------------------------------------------
    @property
    def evaluating(self) -> bool:
        return self.round == self.rounds + 1

    def _publish(self, payload: codec.Buffer | None = None) -> None:
        """Serialize the global model once per round; every download streams the same bytes.

        ``payload``: the global model's tensors already live in it (`_close_round`). The data
        chunks for gRPC downloads are serialized once per round, on first use, and shared by
        every download (see `_chunk_to_wire`).
        """
        self.payload = codec.encode_state(self.global_state) if payload is None else payload
        # the SHA-256 only where a collaborator checks it; the checkpoint's own is then computed
        # by the background writer, off the critical path
        self.digest = codec.sha256(self.payload) if self.check == "sha256" else b""
        self.crc = codec.crc32c(self.payload)
        self.update_limit = len(self.payload) + (64 << 10)
        self._wire: list[bytes] | None = None  # made by the round's first gRPC download
        net = self.plan.network
        self.compressed: tuple[bytes, bytes, int] | None = None  # (zstd frame, SHA-256, CRC32C)
        if net.compression == "zstd":  # compressed once per round, sent to everyone
            frame = compression.compress(self.payload, net.compression_level)
            sha = codec.sha256(frame) if self.check == "sha256" else b""
            self.compressed = (frame, sha, codec.crc32c(frame))

    @property
    def wire_chunks(self) -> list[bytes]:
        """The payload as serialized gRPC chunk messages, made once per round on first use:
        with the data plane nobody downloads over gRPC, and this would be one more model copy."""
        if self._wire is None:
            size = self.plan.network.chunk_size
            self._wire = [
                teefl_pb2.Chunk(data=bytes(piece), offset=i * size).SerializeToString()
                for i, piece in enumerate(codec.iter_chunks(self.payload, size))
            ]
        return self._wire

    def _refuse(self, context, name: str, code: grpc.StatusCode, reason: str):
        # the name and the reason may carry what an unauthenticated peer claimed: shown
        # truncated and escaped, and logged at a bounded rate (peerinput.py)
        if name and not peerinput.valid_name(name):
            reason = reason.replace(name, peerinput.shown(name))
        self.refusals.refused(
            "call", context.peer(), reason, collaborator=peerinput.name_for_log(name)
        )
        context.abort(code, reason)

    def _malformed(self, context, request: _Malformed) -> None:
        """Answer a request that is not the message its RPC takes (see `add_to_server`)."""
        reason = f"malformed {request.what}: {peerinput.shown(str(request.error), 120)}"
        self.refusals.refused("call", context.peer(), reason)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    def _known(self, name: str, context: grpc.ServicerContext, attested: bool = True) -> str:
        """Who this call may act as.

        ``attested=False``: an enrolment call (Challenge, Join): the transport's identity only
        (under mtls the plan-CA certificate with CN = name, clientAuth, CA:false, not revoked).
        Otherwise, in every mode, the token of ``name``'s latest successful Join in the call's
        metadata, and under mtls a certificate that may carry model traffic (with
        collaborators' attestation: exactly the session certificate of that Join). The call is
        remembered with the session, so a later Join of that name cancels it.
        """
        transport = self.plan.security.transport or "none"
        try:
            name = authorize(context, name, self.names, transport)
            cert = None
            if transport == "mtls":
                pem = peer_certificate_pem(context)
                cert = client_cert(pem) if pem else None
            issuer = self.session_ca.subject_der if self.session_ca is not None else None
            if not attested:
                if transport == "mtls":
                    check_client_certificate(
                        cert, name, enrol=True, session_issuer=issuer, revoked=self.revoked
                    )
                return name
            token = self._call_token(context)
            with self.ident_lock:
                session = self.sessions.get(name)
                if (
                    session is None
                    or token is None
                    or not hmac.compare_digest(session.token, token)
                ):
                    raise IdentityError(
                        f"no current session for {name} on this call (token missing or "
                        "outdated): Join first",
                        grpc.StatusCode.UNAUTHENTICATED,
                    )
                if transport == "mtls":
                    check_client_certificate(
                        cert,
                        name,
                        enrol=False,
                        session_issuer=issuer,
                        session_cert_sha256=session.cert_sha256,
                        revoked=self.revoked,
                    )
                session.calls.add(context)
            if not context.add_callback(lambda: session.calls.discard(context)):
                session.calls.discard(context)  # the RPC already ended
        except IdentityError as exc:
            self._refuse(context, name, exc.code, str(exc))
        return name

    # -- RPCs --------------------------------------------------------------------------------
    def Challenge(self, request: teefl_pb2.ChallengeRequest, context: grpc.ServicerContext):
        name = self._known(request.collaborator, context, attested=False)
        reply = teefl_pb2.ChallengeReply(
            evidence_required=self.verifier is not None, plan_sections=self.sections
        )
        if self.verifier is not None:
            reply.nonce = self.nonces.issue(name)
        if request.want_evidence:
            if self.provider is None:
                self._refuse(
                    context,
                    name,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this aggregator's plan does not provide attestation "
                    "(security.attestation.aggregator is off)",
                )
            if len(request.nonce) != attest.NONCE_SIZE:
                self._refuse(
                    context,
                    name,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"challenge nonce must be {attest.NONCE_SIZE} bytes",
                )
            # a quote only for an authenticated caller (above), and not without pause
            wait = self.quotes.allow(
                (f"name:{name}", QUOTE_BURST, QUOTE_EVERY_S),
                (
                    f"peer:{_peer_host(context.peer())}",
                    QUOTE_BURST * len(self.names),
                    QUOTE_EVERY_S / len(self.names),
                ),
            )
            if wait:
                self._refuse(
                    context,
                    name,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rate limit: too many Challenges for evidence from {name}; retry in "
                    f"{wait:.0f} s",
                )
            with self.rec.span("attest", collaborator=name, evidence="own"):
                ev = self.provider.get_evidence(
                    attest.report_data_for(self.own_spki, request.nonce, self.binding)
                )
                signature = attest.endorse(
                    self.endorser, self.own_spki, request.nonce, self.binding
                )
            reply.aggregator_evidence.CopyFrom(attest.to_proto(ev))
            reply.endorsement.certificate = self.endorsement_pem
            reply.endorsement.signature = signature
        return reply

    def _verify_join(
        self, name: str, request, context: grpc.ServicerContext
    ) -> tuple[bytes, bytes]:
        """Check a collaborator's evidence, bound to the key it made in memory (its TEE) and to
        our nonce and configuration; refuse the call (and record why) if it fails. Returns the
        session certificate issued for that key: (PEM, SHA-256 of its DER)."""
        assert self.verifier is not None and self.session_ca is not None
        t0 = time.monotonic()
        record: dict[str, Any] = {
            "collaborator": name,
            "peer": context.peer(),
            "t_wall": time.time(),
        }
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
            verdict = self.verifier.verify(evidence, spki, nonce, self.binding)
            issued = self.session_ca.issue(name, spki)
        except TeeflError as exc:
            record.update(accepted=False, reason=str(exc))
            attest.write_verdict(self.run_dir, f"collaborator-{name}", record)
            self.rec.record("attest", t0, time.monotonic(), collaborator=name, accepted=False)
            self._refuse(context, name, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        record.update(
            accepted=True, verdict=verdict.to_dict(), session_key=attest.fingerprint(spki)
        )
        attest.write_verdict(self.run_dir, f"collaborator-{name}", record)
        self.rec.record("attest", t0, time.monotonic(), collaborator=name, accepted=True)
        log.info("%s attested (%s, %s)", name, verdict.tee_type, verdict.status)
        return issued

    def _same_plan(self, name: str, request, context: grpc.ServicerContext) -> None:
        """Refuse a collaborator whose plan (or CA) differs from ours, naming where."""
        theirs = dict(request.plan_sections)
        if not theirs:
            self._refuse(
                context,
                name,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name} sent no plan fingerprint: every party must run the same teefl version",
            )
        differ = attest.differing_sections(self.sections, theirs)
        if differ:
            self._refuse(
                context,
                name,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the plan of {name} differs from the aggregator's in: {', '.join(differ)} "
                "(every party must use the same plan file and CA certificate)",
            )

    def Join(self, request: teefl_pb2.JoinRequest, context: grpc.ServicerContext):
        name = self._known(request.collaborator, context, attested=False)
        # any Join of this name -- whatever its outcome -- ends the earlier session: a refused
        # Join must not leave an earlier attestation, token or connection in place
        self._revoke(name, "a new Join")
        self._same_plan(name, request, context)
        cert_pem, cert_sha256 = b"", None
        if self.verifier is not None:
            cert_pem, cert_sha256 = self._verify_join(name, request, context)
        session = self._open_session(name, cert_sha256)
        with self.cond:
            if not self.joined:  # round 1's clock starts when the federation does
                self.round_opened = time.monotonic()
            self.joined.add(name)
        log.info("%s joined from %s", name, context.peer())
        self.rec.info("joined", collaborator=name, peer=context.peer())
        with self.cond:  # the open round and whether this member's update is in it, together
            current, holds, durable = self.round, name in self.received, self.durable_round
        reply = teefl_pb2.JoinReply(
            run_id=self.run_id,
            rounds=self.rounds,
            current_round=current,
            nonce=os.urandom(32),
            session_token=session.token,
            session_cert=cert_pem,
            plan_sections=self.sections,
            holds_update=holds,
            durable_round=durable,
        )
        if self.data_port:
            reply.data_port = self.data_port
        return reply

    def WaitRound(self, request: teefl_pb2.WaitRequest, context: grpc.ServicerContext):
        """Long poll. One per collaborator: a newer poll of the same collaborator makes the
        older one return at once with "nothing new" (a poll holds one of the server's worker
        threads; 16 polls of one member held every worker and a Join waited 14 s)."""
        name = self._known(request.collaborator, context)
        after = request.after_round
        me = object()
        token = self._call_token(context)

        def ready() -> bool:
            # a collaborator that already contributed to the open round (e.g. restarted after
            # its upload was acknowledged) waits for the next one: nothing is counted twice
            return (
                bool(self.done or self.failed)
                or (self.round > after and name not in self.received)
                or not self._current(name, token)  # its session ended (a newer Join)
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
            if not self._current(name, token):
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, f"the session of {name} ended: Join first"
                )
            if self.failed:
                context.abort(grpc.StatusCode.ABORTED, f"run failed: {self.failed}")
            if self.done:
                self.told_done.add(name)
                self.cond.notify_all()
                return teefl_pb2.WaitReply(round=0, done=True, durable_round=self.durable_round)
            if ready():
                return teefl_pb2.WaitReply(
                    round=self.round,
                    evaluate_only=self.evaluating,
                    durable_round=self.durable_round,
                    round_config=roundconfig.to_proto(self.round_config),
                )
            return teefl_pb2.WaitReply(round=0, durable_round=self.durable_round)

    def GetModel(self, request: teefl_pb2.ModelRequest, context: grpc.ServicerContext):
        name = self._known(request.collaborator, context)
        if self.plan.network.data_plane == "socket":
            self._refuse(
                context,
                name,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the model travels over the data plane (network.data_plane: socket), not gRPC",
            )
        with self.cond:
            if request.round != self.round or self.done:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"round {request.round} is not open (open round: {self.round})",
                )
            size, digest, rnd, chunks = len(self.payload), self.digest, self.round, self.wire_chunks
            crc = self.crc
        t0 = time.monotonic()
        # a bounded number of downloads stream at once, one per collaborator; the slot is given
        # back when the RPC ends for any reason (finished, cancelled, peer gone, cut as idle),
        # so it can never leak
        transfer = _Transfer("download", name, rnd, context.cancel)
        try:
            ticket = self.download_slots.acquire(name, transfer.supersede)
        except Superseded as exc:
            context.abort(grpc.StatusCode.CANCELLED, f"download of {name}: {exc}")

        def ended() -> None:
            self.download_slots.release(ticket)
            with self.cond:
                self.sending.discard(transfer)

        with self.cond:
            transfer.touch()  # its idle time counts from now, not from the wait for a slot
            self.sending.add(transfer)
        if not context.add_callback(ended):
            ended()  # the RPC already ended
        return self._stream(size, digest, crc, rnd, chunks, name, t0, transfer)

    def _stream(
        self,
        size: int,
        digest: bytes,
        crc: int,
        rnd: int,
        chunks: list[bytes],
        name: str,
        t0: float,
        transfer: _Transfer,
    ) -> Iterator[Any]:
        t1 = time.monotonic()
        header = teefl_pb2.Header(
            collaborator=name,
            round=rnd,
            total_size=size,
            sha256=digest,
            format=codec.FORMAT,
            crc32c=crc,
        )
        yield teefl_pb2.Chunk(header=header)
        for chunk in chunks:  # progress per message: gRPC does not say how many bytes moved
            yield chunk
            transfer.last = time.monotonic()
        with self.quiet:  # as on the data plane: a background checkpoint waits for downloads
            self.served += 1
            self.quiet.notify_all()
        self.rec.record(
            "serve_download",
            t1,
            time.monotonic(),
            round=rnd,
            bytes=size,
            collaborator=name,
            queued_s=round(t1 - t0, 6),
        )

    def PutUpdate(self, request_iterator, context: grpc.ServicerContext):
        ack = self._put_update(request_iterator, context)
        self._close_soon()
        return ack

    def _close_soon(self) -> None:
        """Close the round in its own thread once every update is in: the uploader that
        completed it is answered without waiting for the close."""
        if self.close_pending:
            threading.Thread(target=self._close_pending_round, name="close-round").start()

    def _close_pending_round(self) -> None:
        with self.cond:
            if self.close_pending:
                self._close_round()

    def _put_update(self, request_iterator, context: grpc.ServicerContext):
        t0 = time.monotonic()
        try:
            first = next(request_iterator, None)
        except grpc.RpcError:
            return teefl_pb2.UpdateAck(accepted=False, message="stream broken")
        if isinstance(first, _Malformed):
            self._malformed(context, first)
        if first is None or not first.HasField("header"):
            reason = "update stream must start with a header"
            self.refusals.refused("upload", context.peer(), reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        h = first.header
        name = self._known(h.collaborator, context)
        if self.plan.network.data_plane == "socket" and not h.evaluate_only:
            self._refuse(
                context,
                name,
                grpc.StatusCode.FAILED_PRECONDITION,
                "updates travel over the data plane (network.data_plane: socket); gRPC "
                "PutUpdate carries only the evaluation report",
            )
        transfer = _Transfer("upload", name, h.round, context.cancel)
        ticket = None
        try:
            if _has_unknown_fields(first):
                raise UpdateRejected("message carries unknown fields")
            # a bounded number of updates held in memory at once, one per collaborator
            try:
                ticket = self.slots.acquire(name, transfer.supersede)
            except Superseded as exc:
                context.abort(grpc.StatusCode.CANCELLED, f"upload of {name}: {exc}")
            # tells the collaborator to start sending its data (see Collaborator._upload): an
            # upload waiting for a slot has sent only its header, so waiting uploads hold
            # nothing in our HTTP/2 receive windows however many there are
            context.send_initial_metadata(((UPLOAD_GO, "1"),))
            with self.cond:
                self.active += 1
                self.peak_active = max(self.peak_active, self.active)
            try:
                return self._receive(
                    name,
                    h,
                    first,
                    request_iterator,
                    context,
                    t0,
                    transfer,
                    token=self._call_token(context),
                )
            finally:
                with self.cond:
                    self.active -= 1
        except UpdateRejected as exc:
            self._report_rejected(name, h.round, exc)
            stale = isinstance(exc, StaleUpdate)
            code = (
                grpc.StatusCode.FAILED_PRECONDITION if stale else grpc.StatusCode.INVALID_ARGUMENT
            )
            context.abort(code, f"update {'stale' if stale else 'rejected'}: {exc}")
        except grpc.RpcError:  # the collaborator vanished mid-stream: nothing was applied
            if not transfer.cut:  # else the idle cut has said so
                log.warning("upload of %s for round %d broke off; discarded", name, h.round)
                self.rec.info("update_broken", collaborator=name, round=h.round)
            return teefl_pb2.UpdateAck(accepted=False, message="stream broken")
        finally:
            with self.cond:
                if self.inflight.get(name) is transfer:
                    del self.inflight[name]
            if ticket is not None:
                self.slots.release(ticket)

    # -- data plane (see framing.py) -------------------------------------------------------
    def data_hello(self, conn: socket_server.Connection, name: str, token: bytes) -> None:
        """Authorise a data connection as `_known` does a call: the token of the latest Join,
        and under mtls a client certificate that may carry model traffic (CN = name,
        clientAuth, CA:false; with collaborators' attestation exactly the session certificate
        of that Join). The connection is remembered with the session: a later Join cuts it."""

        def refuse(code: str, reason: str) -> None:
            # the name passed the plan's name rule in the data plane; logged at a bounded rate
            shown = peerinput.name_for_log(name)
            self.refusals.refused("data connection", conn.peer, reason, collaborator=shown)
            raise framing.RemoteError(code, reason)

        if name not in self.names:
            refuse("PERMISSION_DENIED", f"'{name}' is not a collaborator of this plan")
        with self.ident_lock:
            session = self.sessions.get(name)
        if session is None or not hmac.compare_digest(session.token, token):
            refuse("UNAUTHENTICATED", f"unknown or outdated session token for {name}: Join first")
        assert session is not None
        if (self.plan.security.transport or "none") == "mtls":
            der = conn.sock.getpeercert(binary_form=True)
            cert = client_cert(der) if der else None
            if cert is not None and cert.cn != name:
                refuse("PERMISSION_DENIED", f"certificate CN '{cert.cn}' does not match '{name}'")
            try:
                check_client_certificate(
                    cert,
                    name,
                    enrol=False,
                    session_issuer=self.session_ca.subject_der if self.session_ca else None,
                    session_cert_sha256=session.cert_sha256,
                    revoked=self.revoked,
                )
            except IdentityError as exc:
                refuse(exc.code.name, str(exc))
        with self.ident_lock:
            if self.sessions.get(name) is not session:  # a newer Join came in meanwhile
                refuse("UNAUTHENTICATED", f"the session of {name} ended: Join first")
            session.conns.add(conn)
            self.conn_tokens[conn] = token

    def data_get(self, conn: socket_server.Connection, body: bytes) -> None:
        """One download: the MODEL header, then the round's payload straight from memory."""
        name = conn.name
        try:
            req = teefl_pb2.ModelRequest.FromString(body)
        except Exception:  # protobuf's DecodeError, or worse: a malformed request
            reason = "malformed model request"
            self.refusals.refused("download", conn.peer, reason, collaborator=name)
            framing.send_error(conn.sock, "INVALID_ARGUMENT", reason)
            return
        with self.cond:
            if req.round != self.round or self.done:
                framing.send_error(
                    conn.sock,
                    "FAILED_PRECONDITION",
                    f"round {req.round} is not open (open round: {self.round})",
                )
                return
            payload, digest, crc, rnd = self.payload, self.digest, self.crc, self.round
            encoding, raw_size = "", 0
            if self.compressed is not None:
                raw_size, encoding = len(payload), "zstd"
                payload, digest, crc = self.compressed
        t0 = time.monotonic()
        # a bounded number stream at once, one per collaborator, as on the gRPC path; one that
        # moves no byte for idle_timeout is cut (`_supervise`)
        transfer = _Transfer("download", name, rnd, conn.cancel, conn.moved)
        try:
            ticket = self.download_slots.acquire(name, transfer.supersede)
        except Superseded as exc:
            framing.send_error(conn.sock, "CANCELLED", f"download of {name}: {exc}")
            return
        try:
            t1 = time.monotonic()
            header = teefl_pb2.Header(
                collaborator=name,
                round=rnd,
                total_size=len(payload),
                sha256=digest,
                format=codec.FORMAT,
                crc32c=crc,
                encoding=encoding,
                raw_size=raw_size,
            )
            with self.cond:
                transfer.touch()  # idle from now on, not from the wait for a slot
                self.sending.add(transfer)
            try:
                framing.send_frame(conn.sock, framing.MODEL, header.SerializeToString())
                with self._moving():
                    framing.send_payload(conn.sock, payload, transfer.touch)
            finally:
                with self.cond:
                    self.sending.discard(transfer)
            with self.quiet:
                self.served += 1
                self.quiet.notify_all()
        finally:
            self.download_slots.release(ticket)
        self.rec.record(
            "serve_download",
            t1,
            time.monotonic(),
            round=rnd,
            bytes=len(payload),
            collaborator=name,
            queued_s=round(t1 - t0, 6),
        )

    def data_put(self, conn: socket_server.Connection, body: bytes) -> None:
        """One upload: PUT header -> GO once a receive slot is ours -> payload -> ACK.

        Every check that needs no payload byte runs before GO, so a refused upload costs the
        uploader only its header, and the connection stays in step after any refusal. The
        FedAvg add runs after the ACK has gone out (the update is stored and counted first).
        """
        t0 = time.monotonic()
        name = conn.name
        target = None  # the update's file, until it is committed
        buffer = None  # the pooled receive buffer, until its update has been summed
        slot = None  # or the shared-memory slot it is received into (staging.py)
        ticket = None  # its receive slot (one per collaborator, see fairshare.py)
        moving = contextlib.ExitStack()  # entered once the upload's bytes may flow
        try:
            h = teefl_pb2.Header.FromString(body)
        except Exception:  # protobuf's DecodeError, or a nesting beyond its limit
            reason = "malformed update header"
            self.refusals.refused("upload", conn.peer, reason, collaborator=name)
            framing.send_error(conn.sock, "INVALID_ARGUMENT", reason)
            return
        if h.collaborator != name:
            reason = f"this connection belongs to {name}"
            self.refusals.refused("upload", conn.peer, reason, collaborator=name)
            framing.send_error(conn.sock, "PERMISSION_DENIED", reason)
            return
        transfer = _Transfer("upload", name, h.round, conn.cancel, conn.moved)
        try:
            if len(UnknownFieldSet(h)) > 0:
                raise UpdateRejected("message carries unknown fields")
            if h.evaluate_only:
                raise UpdateRejected("evaluation reports travel over gRPC (PutUpdate)")
            try:
                ticket = self.slots.acquire(name, transfer.supersede)
            except Superseded as exc:
                framing.send_error(conn.sock, "CANCELLED", f"upload of {name}: {exc}")
                return
            with self.cond:
                self.active += 1
                self.peak_active = max(self.peak_active, self.active)
            try:
                dup = self._open_update(name, h, transfer)
                if dup is not None:
                    framing.send_frame(conn.sock, framing.ACK, dup.SerializeToString())
                    return
                try:
                    assembly.Assembler.check_announced(
                        h.total_size, h.sha256, self.update_limit, self.check
                    )
                except codec.PayloadError as exc:  # checked before a file is made for it
                    raise UpdateRejected(str(exc)) from None
                zstd = self._encoding_of(h) == "zstd"
                if not zstd and self.staging is not None and h.total_size:
                    slot = self.staging.take(h.total_size)
                if zstd:  # the frame in memory; the payload is decompressed and stored
                    buffer = None
                elif slot is not None:  # stored once received: nothing to write meanwhile
                    buffer = slot.mem
                else:
                    buffer = self.rx_pool.take(h.total_size)
                    target = self.store.open_update(h.round, name, buffer)
                scan = self._finite_scan(h, buffer)
                sink = _sinks(target.write if target is not None else None, scan)
                try:
                    asm = assembly.Assembler.for_header(
                        h, self.update_limit, self.check, buffer, sink
                    )
                except codec.PayloadError as exc:  # a field the check needs is missing
                    raise UpdateRejected(f"malformed update header: {exc}") from None
                # from GO to ACK the upload is "moving": a background checkpoint waits
                moving.enter_context(self._moving())
                framing.send_frame(conn.sock, framing.GO)
                # each receive waits at most idle_timeout for a byte: idle is "no byte
                # moved", however slowly bytes move
                conn.sock.settimeout(self.plan.federation.idle_timeout)
                try:
                    asm.receive(framing.reader(conn.sock), framing.STEP, transfer.touch)
                except codec.PayloadError:  # the peer ended mid-payload
                    raise framing.Closed("upload ended before its announced size") from None
                except framing.Idle:
                    self._idle_cut(transfer)
                    with contextlib.suppress(OSError, framing.Closed):
                        framing.send_error(
                            conn.sock,
                            "DEADLINE_EXCEEDED",
                            f"upload moved no byte for {self.plan.federation.idle_timeout:g}"
                            " s: cut off",
                        )
                    raise
                finally:
                    conn.sock.settimeout(None)
                payload, digest, crc = _finished(asm), h.sha256, _crc_of(h)
                if zstd:
                    payload, digest, crc = self._decompressed(payload, h)
                # decoded in place: the tensors share the received buffer
                payload, state = self._decode_update(payload, owned=True, scan=scan)
                metrics = {k: float(v) for k, v in h.metrics.items()}
                ack, add = self._accept(
                    name,
                    h.round,
                    state,
                    int(h.num_samples),
                    metrics,
                    payload,
                    t0,
                    digest,
                    defer_add=True,
                    stored=target,
                    crc=crc,
                    staged=slot,
                    token=self.conn_tokens.get(conn),
                )
                target = None  # committed: its file is the stored update now
                try:
                    framing.send_frame(conn.sock, framing.ACK, ack.SerializeToString())
                finally:
                    moving.close()
                    if add is not None:
                        add()  # even if the ACK was lost: the update is counted and stored
            finally:
                moving.close()
                if slot is not None:  # summed and moved, or refused: nothing reads it
                    self.staging.give(slot)
                elif buffer is not None:  # summed or refused: nothing reads it any more
                    self.rx_pool.give(buffer)
                with self.cond:
                    self.active -= 1
                    if self.inflight.get(name) is transfer:
                        del self.inflight[name]
                self.slots.release(ticket)
                ticket = None
            # this thread is back waiting for the next frame before the close takes the lock
            # (it holds it for the whole mean): the round's first GET used to find it blocked
            # here and was answered ~10 ms late
            self._close_soon()
        except UpdateRejected as exc:
            if target is not None:  # gone before the uploader hears of the refusal
                target.abort()
                target = None
            self._report_rejected(name, h.round, exc)
            stale = isinstance(exc, StaleUpdate)
            code = "FAILED_PRECONDITION" if stale else "INVALID_ARGUMENT"
            verdict = "stale" if stale else "rejected"
            framing.send_error(conn.sock, code, f"update {verdict}: {exc}")
        except framing.Closed:
            if not transfer.cut:  # else the idle cut or the newer upload has said so
                log.warning("upload of %s for round %d broke off; discarded", name, h.round)
                self.rec.info("update_broken", collaborator=name, round=h.round)
            raise
        finally:
            if target is not None:
                target.abort()
            with self.cond:
                if self.inflight.get(name) is transfer:
                    del self.inflight[name]
            if ticket is not None:
                self.slots.release(ticket)  # idempotent

    def _encoding_of(self, h) -> str:
        """The update's wire encoding, refused unless the plan's compression is that one."""
        want = compression.encoding_of(self.plan.network.compression)
        if h.encoding != want:
            raise UpdateRejected(
                f"update encoding {h.encoding or 'none'!r}, the plan's network.compression is "
                f"{self.plan.network.compression!r}"
            )
        if want and h.raw_size > self.update_limit:  # before anything is received
            raise UpdateRejected(
                f"announced payload of {h.raw_size} bytes exceeds limit {self.update_limit}"
            )
        return want

    def _decompressed(self, frame: Any, h) -> tuple[codec.ReceivedPayload, bytes, int]:
        """A received zstd frame (checked against the header's digest) -> the payload in a
        buffer of its own, and the digests it is stored with (computed here)."""
        try:
            raw = compression.decompress(frame, h.raw_size, self.update_limit)
        except codec.PayloadError as exc:
            raise UpdateRejected(str(exc)) from None
        sha = codec.sha256(raw) if self.check == "sha256" else b""
        return codec.ReceivedPayload(raw), sha, codec.crc32c(raw)

    def _report_rejected(self, name: str, rnd: int, exc: UpdateRejected) -> None:
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

    def _open_update(self, name: str, h, transfer: _Transfer) -> teefl_pb2.UpdateAck | None:
        """Checks before any payload byte is taken; a duplicate is answered at once (the ack).
        From here the upload is in flight: watched by the idle cut."""
        with self.cond:
            if h.round != self.round or self.done:
                raise StaleUpdate(f"round {h.round} is not open (open round: {self.round})")
            if name in self.received:
                return teefl_pb2.UpdateAck(
                    accepted=True, round=h.round, message="duplicate: already counted once"
                )
            evaluating = self.evaluating
            transfer.touch()
            self.inflight[name] = transfer
        if h.evaluate_only != evaluating:
            raise UpdateRejected("metrics-only report outside the evaluation pass, or vice versa")
        bound = self.plan.federation.max_samples_per_update
        if not 0 < int(h.num_samples) <= bound:
            raise UpdateRejected(f"sample count {int(h.num_samples)} outside 1..{bound}")
        if not evaluating and h.format != codec.FORMAT:
            raise UpdateRejected(f"unsupported payload format {h.format!r}")
        return None

    def _idle_cut(self, transfer: _Transfer) -> None:
        """Say (once) that a transfer moved no byte for ``idle_timeout`` and is cut off."""
        if transfer.cut:
            return
        transfer.cut = True
        idle = self.plan.federation.idle_timeout
        log.warning(
            "%s of %s for round %d moved no byte for %g s: cut off",
            transfer.kind,
            transfer.name,
            transfer.round,
            idle,
        )
        self.rec.info(
            f"{transfer.kind}_idle_cut",
            collaborator=transfer.name,
            round=transfer.round,
            idle_s=idle,
        )

    def _finite_scan(self, h, buffer: Any) -> FiniteScan | None:
        """The finiteness check to run while an update of the global model's size arrives."""
        layout = self.fedavg.layout
        if layout is None or buffer is None or h.total_size != layout.size:
            return None
        return FiniteScan(layout, buffer)

    def _decode_update(
        self, payload: Any, owned: bool = False, scan: FiniteScan | None = None
    ) -> tuple[Any, Any]:
        """The checked update: a `FlatUpdate` where the payload has exactly the global model's
        layout (its header bytes prove names, dtypes and shapes; one finiteness check per run,
        or the ``scan`` made while it arrived) and FedAvg sums it; else decoded and checked
        tensor by tensor (which also names the offending tensor of a non-finite update).
        ``owned``: see `codec.decode_state`."""
        layout = self.fedavg.layout
        if layout is not None and layout.matches(payload):
            flat = FlatUpdate(layout, payload)
            if (scan is not None and scan.finite()) or flat.finite():
                return payload, flat
        try:
            state = codec.decode_state(payload, owned=owned)
        except codec.PayloadError as exc:
            raise UpdateRejected(str(exc)) from None
        check_update(self.global_state, state)  # before anything is stored or summed
        return payload, state

    def _receive(
        self,
        name: str,
        h,
        first,
        chunks,
        context,
        t0: float,
        transfer: _Transfer | None = None,
        token: bytes | None = None,
    ) -> teefl_pb2.UpdateAck:
        if transfer is None:
            transfer = _Transfer("upload", name, h.round, context.cancel)
        dup = self._open_update(name, h, transfer)
        if dup is not None:
            return dup
        metrics = {k: float(v) for k, v in h.metrics.items()}
        samples = int(h.num_samples)
        if h.evaluate_only:
            if h.total_size or first.data or next(chunks, None) is not None:
                raise UpdateRejected("evaluation report must not carry a payload")
            return self._accept(name, h.round, None, samples, metrics, None, t0, token=token)[0]
        try:
            asm = assembly.Assembler.for_header(h, self.update_limit, self.check)
        except codec.PayloadError as exc:
            raise UpdateRejected(str(exc)) from None
        if first.data:
            raise UpdateRejected("the header message must not carry data")
        if h.encoding:
            raise UpdateRejected("compressed updates travel over the data plane only")
        for chunk in chunks:
            if isinstance(chunk, _Malformed):
                raise UpdateRejected(f"malformed {chunk.what} message in the stream")
            if chunk.HasField("header"):
                raise UpdateRejected("a second header inside the stream")
            if _has_unknown_fields(chunk):
                raise UpdateRejected("message carries unknown fields")
            if chunk.offset != asm.filled:
                raise UpdateRejected(
                    f"out-of-order chunk: offset {chunk.offset}, expected {asm.filled}"
                )
            try:
                asm.add(chunk.data)
            except codec.PayloadError as exc:
                raise UpdateRejected(str(exc)) from None
            transfer.last = time.monotonic()  # progress per message (gRPC hides the bytes)
        payload, state = self._decode_update(_finished(asm))
        return self._accept(
            name,
            h.round,
            state,
            samples,
            metrics,
            payload,
            t0,
            h.sha256,
            crc=_crc_of(h),
            token=token,
        )[0]

    def _accept(
        self,
        name,
        rnd,
        state,
        samples,
        metrics,
        payload,
        t0,
        digest: bytes | None = None,
        defer_add: bool = False,
        stored: Any = None,
        crc: int | None = None,
        staged: Any = None,
        token: bytes | None = None,
    ) -> tuple[teefl_pb2.UpdateAck, Any]:
        """Store, count and (unless deferred) add one checked update; returns (ack, add).

        ``defer_add``: the FedAvg add is returned as ``add`` for the caller to run *after* it
        has sent the acknowledgement (the data plane can; a unary gRPC answer cannot). The
        update is stored and counted first, so a crash after the ack still loses nothing, and
        the round does not close before every deferred add has run (see `_close_round`).
        ``stored``: the `UpdateFile` the payload was received into (committed here instead of
        writing the payload out again). ``staged``: the shared-memory `staging.Slot` it was
        received into instead: committed there, moved to the run directory with the (deferred)
        add. ``token``: the session it came in on; an update of a session that a newer Join
        ended meanwhile is not counted.
        """
        assert staged is None or defer_add  # the move runs after the ack, with the add
        with self.cond:
            if token is not None and not self._current(name, token):
                raise SessionEnded(f"the session of {name} ended (a newer Join): not counted")
            if rnd != self.round:
                raise StaleUpdate(f"round {rnd} closed while the update was in transit")
            if name in self.received or name in self.persisting:
                dup = teefl_pb2.UpdateAck(
                    accepted=True, round=rnd, message="duplicate: already counted once"
                )
                return dup, None
            self.persisting.add(name)
        add = None
        pending = None  # a staged update still to be moved into the run directory
        try:
            if payload is not None:
                # stored before the acknowledgement: a crash after the ack loses nothing
                with self.rec.span("persist_update", round=rnd, collaborator=name) as s:
                    meta = {"samples": samples, "metrics": metrics}
                    digests, verified = self._digests(digest, crc)
                    if stored is not None:
                        stored.commit(meta, digests, verified)
                    elif staged is not None:
                        pending = self.store.commit_staged(
                            rnd, name, staged, meta, digests, verified
                        )
                    else:
                        self.store.save_update(rnd, name, payload, meta, digests, verified)
                    s["bytes"] = len(payload)
            elif state is None:  # an evaluation report: a restart must not wait for it again
                self.store.save_report(rnd, name, {"samples": samples, "metrics": metrics})
            with self.cond:
                if rnd != self.round:
                    if pending is not None:  # back to a free slot before its name is gone
                        pending.slot.unlink()
                    self.store.discard_update(rnd, name)
                    raise StaleUpdate(f"round {rnd} closed while the update was in transit")
                if state is not None and defer_add:
                    self.adding += 1
                    add = self._deferred_add(rnd, name, state, samples, pending)
                    pending = None
                elif state is not None:
                    ta = time.monotonic()
                    with self.sum_lock:
                        self.fedavg.add(state, samples, checked=True)  # checked in _decode_update
                    self.rec.record("aggregate", ta, time.monotonic(), round=rnd, collaborator=name)
                self.received[name] = {"samples": samples, **metrics}
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
                if len(self.received) == len(self.names):
                    # closed right after this acknowledgement is sent (see PutUpdate): the update
                    # is already stored, and the uploader's time is not spent on our checkpoint
                    self.close_pending = True
                return teefl_pb2.UpdateAck(accepted=True, round=rnd, message="accepted"), add
        finally:
            with self.cond:
                self.persisting.discard(name)

    def _digests(self, sha256: bytes | None, crc: int | None) -> tuple[dict[str, Any], bool]:
        """What an update is stored with, and whether it was checked on arrival: the digest
        that was verified, else (over TLS) the sender's claim -- the CRC32C, faster to replay."""
        if self.check == "sha256":
            return {"sha256": sha256}, True
        if self.check == "crc32c":
            return {"crc32c": crc}, True
        return ({"crc32c": crc} if crc is not None else {"sha256": sha256 or None}), False

    def _deferred_add(self, rnd: int, name: str, state, samples: int, staged=None):
        """The add, to run after the ACK. Called with ``cond`` held; the add itself runs under
        ``sum_lock`` only: holding ``cond`` for its ~50 ms (ResNet-18) stalled every other
        upload's receive loop and every long poll. The round cannot close (and replace
        ``fedavg``) while ``adding`` counts it. ``staged``: a `rounds.StagedUpdate` moved into
        the run directory after the add -- so before the round closes, and long before its
        checkpoint lets the round's updates go."""
        fedavg = self.fedavg

        def add() -> None:
            what = "FedAvg add"
            fault("acked", rnd)  # crash tests: acknowledged and stored, not summed yet
            try:
                with self.sum_lock:
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
                with self.cond:
                    self.failed = f"{what} of {name}'s update for round {rnd} failed: {exc}"
                raise
            finally:
                with self.cond:
                    self.adding -= 1
                    self.cond.notify_all()

        return add

    def _close_round(self) -> None:
        """Called with the lock held once every collaborator's update is in (or a quorum's, on
        timeout). The round it opens may hold updates already: acknowledged before a crash,
        they are counted now (`_replay_open_round`), and that round is closed too once
        complete -- round by round, as far as the stored updates go."""
        while self._close_open_round():
            self._replay_open_round()
            if len(self.received) < len(self.names):
                return

    def _close_open_round(self) -> bool:
        """Close the open round (lock held); True when it opened the next one."""
        rnd = self.round
        # acknowledged updates may still be being summed (deferred adds); while we wait, the
        # lock is free, so another closer may get there first: then there is nothing to do
        self.cond.wait_for(lambda: self.adding == 0 or self.round != rnd or self.done)
        if self.round != rnd or self.done:
            return False
        self.close_pending = False
        self._write_metrics(rnd)
        if self.evaluating:
            # the final model is on disk before anyone hears of the end: its write ran in the
            # background during the evaluation pass (waiting frees the lock for the writer)
            self.cond.wait_for(lambda: self.ckpt_queue.unfinished_tasks == 0 or bool(self.failed))
            if self.failed:
                return False  # `_supervise` ends the run with the failure
            self.done = True
            self.rec.info("evaluation_done", round=rnd)
            self.cond.notify_all()
            return False
        with self.rec.span("aggregate", round=rnd, final=True):
            # the mean is written run by run straight into the next download's payload where
            # the sums are kept in the model's layout (the layout stays the global model's)
            layout = self.fedavg.layout
            if layout is not None:
                payload = self.spares.take(layout)
                self.fedavg.result_into(layout.run_views(payload))
                self.global_state = self._layout_for = layout.tensor_views(payload)
                self.layout = layout
            else:
                payload, self.global_state = None, self.fedavg.result()
            # a snapshot (copies) taken right after the result, before the next round begins:
            # it is written with this round's checkpoint, in the background
            strategy_state = self.strategy.state()
        with self.rec.span("publish", round=rnd) as s:
            previous = self.payload
            self._publish(payload)
            s["bytes"] = len(self.payload)
        self.spares.give(previous)
        del previous
        # the final round's too: the evaluation pass overlaps it, and ends only once it is
        # durable (above); the run's span ends when the final model is on disk
        self.ckpt_queue.put((rnd, self.payload, self.digest, self.crc, strategy_state))
        if rnd not in self.closed_before:  # closed again after a restart: recorded once
            self.rec.info("round_closed", round=rnd)
        self.round += 1
        self.served = 0
        self.received = {}
        self.fedavg = self._new_round_aggregator()
        self.round_opened = time.monotonic()
        self.cond.notify_all()
        return True

    def _write_checkpoint(
        self,
        rnd: int,
        payload: codec.Buffer,
        digest: bytes,
        crc: int,
        strategy_state: StrategyState | None = None,
    ) -> None:
        """Called by the background writer (`_checkpoints`), which gives way to transfers.
        ``strategy_state``: the strategy's state after this round, saved with its checkpoint
        (a stateless strategy's empty state is only named in the resume pointer)."""

        def pause() -> None:
            fault("checkpoint", rnd)  # crash tests: killed mid-write, the checkpoint not durable
            self._give_way()

        with self.rec.span("checkpoint", round=rnd) as s:
            st = strategy_state or StrategyState(self.strategy.name)
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
        with self.cond:  # collaborators may drop their copies of this round's updates now
            self.durable_round = max(self.durable_round, rnd)

    @contextlib.contextmanager
    def _moving(self) -> Iterator[None]:
        """Counts a download or an upload whose bytes are moving (see `_give_way`)."""
        with self.quiet:
            self.transfers += 1
        try:
            yield
        finally:
            with self.quiet:
                self.transfers -= 1
                self.quiet.notify_all()

    def _give_way(self) -> None:
        """Between two slices of a background checkpoint: wait while a model or an update is on
        the move (for at most 2 s, so a checkpoint is never starved for good). Without it, the
        writes' page-cache copies and the writeback slowed the next round's transfers about 2x
        on 2 cores. (Idle CPU priority for this thread was tried and dropped: holding the GIL
        at idle priority, it stalled the data plane's threads by ~15 ms.)
        """
        with self.quiet:  # no polling: a thread waking every few ms costs the others the GIL
            self.quiet.wait_for(
                lambda: not self.transfers and self.served >= len(self.names), timeout=2.0
            )

    def _checkpoints(self) -> None:
        """Write closed rounds' checkpoints in order, off the critical path.

        Why: the fsync'd write of a 45 MB checkpoint took 300-500 ms here, during which no
        collaborator could start the next round. The next round now opens as soon as the new
        model is serialized; a crash before the checkpoint is durable loses nothing either,
        because the round's acknowledged updates stay on disk until then: a restart resumes
        from the previous checkpoint and closes the round again from the same updates (and
        replays the next round's, see `serve`). The final round's checkpoint too: the
        evaluation pass runs meanwhile, and the run ends only once it is durable.
        """
        while True:
            item = self.ckpt_queue.get()
            try:
                if item is None:
                    return
                rnd, payload, digest, crc, strategy_state = item
                try:
                    self._write_checkpoint(rnd, payload, digest, crc, strategy_state)
                except Exception as exc:  # a checkpoint that cannot be written fails the run
                    log.error("checkpoint of round %d failed: %s", rnd, exc)
                    with self.cond:
                        self.failed = f"checkpoint of round {rnd} could not be written: {exc}"
                        self.cond.notify_all()
            finally:
                self.ckpt_queue.task_done()
                with self.cond:  # the evaluation pass's close may be waiting for it
                    self.cond.notify_all()

    def _write_metrics(self, rnd: int) -> None:
        total = sum(m["samples"] for m in self.received.values()) or 1
        keys = sorted({k for m in self.received.values() for k in m if k != "samples"})
        weighted = {
            k: sum(m.get(k, 0.0) * m["samples"] for m in self.received.values()) / total
            for k in keys
        }
        line = {
            "round": "final" if self.evaluating else rnd,
            "collaborators": self.received,
            "weighted": weighted,
        }
        # one line per round: a round closed again after a restart finds its line removed by
        # `RoundStore.clean_up` (it keeps the lines of durable rounds only)
        RunDir(self.run_dir).append_metrics(line)

    # -- serving -----------------------------------------------------------------------------
    def serve(
        self, listen: str, port: int, port_file: Path | None = None, t_start: float | None = None
    ) -> None:
        """Serve until the final evaluation is done and every collaborator was told so."""
        self.t_start = t_start if t_start is not None else time.monotonic()
        with self.cond:
            # crashed between the last acknowledgement and the close, or before the checkpoint
            # of a closed round was durable: close again from the stored updates, round by round
            # (`_close_round` replays and closes each next round as far as they go)
            if len(self.received) == len(self.names):
                self._close_round()
        # what one collaborator may hold at once: one long poll (a newer one ends the older)
        # and one upload (the evaluation report, and updates over gRPC), plus one download when
        # the data travels over gRPC -- each bounded per collaborator (fairshare.py), so one
        # member cannot take the workers the others' calls and a Join need; 8 to spare
        per = 2 if self.plan.network.data_plane == "socket" else 3
        workers = max(8, per * len(self.names) + 8)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agg"),
            options=server_options(self.plan),
            maximum_concurrent_rpcs=None,
        )
        add_to_server(self, server)
        bound = bind(server, self.plan, listen, port, self._server_credentials())
        data = self._data_server(listen)
        server.start()
        log.info(
            "aggregator listening on %s:%d (transport %s%s)",
            listen,
            bound,
            self.plan.security.transport or "none",
            f", data plane on port {self.data_port}" if data else ", data over gRPC",
        )
        if port_file is not None:
            write_atomic(port_file, str(bound).encode())
        RunDir(self.run_dir).update(status="running", port=bound)
        try:
            self._supervise()
            # every collaborator heard of the end: a restart would have nothing to resume, so
            # the evaluation reports (kept until now for one) go
            self.store.drop_updates(self.rounds + 1, last=True)
        finally:
            self.ckpt_queue.join()  # every closed round's checkpoint is on disk
            if data is not None:
                data.stop()
            server.stop(grace=2.0).wait(5.0)
            self.refusals.flush()  # the count of refusals not logged one by one, if any
            if self.staging is not None:
                self.staging.close()
            RunDir(self.run_dir).update(peak_inflight_updates=self.peak_active)

    def _data_server(self, listen: str) -> socket_server.DataServer | None:
        """Start the data plane (plan ``network.data_plane: socket``) on the gRPC host."""
        net = self.plan.network
        if net.data_plane != "socket":
            return None
        tls = None
        if (self.plan.security.transport or "none") != "none":
            assert self.tls_chain is not None  # checked by bind()
            tls = session_keys.server_ssl_context(self.tls_chain, self._client_roots())
        limits = socket_server.Limits(
            handshake_timeout=net.handshake_timeout,
            max_pending=net.max_pending_handshakes,
            max_pending_per_address=net.max_pending_per_address,
        )
        data = socket_server.DataServer(
            listen,
            net.data_port,
            tls,
            self.data_hello,
            self.data_get,
            self.data_put,
            limits=limits,
            refused=self.refusals.refused,
        )
        data.start()
        self.data_port = data.port
        return data

    def _cut_idle(self, now: float) -> None:
        """Cut every upload and download that moved no byte for ``idle_timeout`` (a dead or
        stalled peer, not a slow one: see `_Transfer`); its connection is closed or its RPC
        cancelled, so the peer sees the end, and its slot is given back. Called with ``cond``
        held, twice a second."""
        idle_limit = self.plan.federation.idle_timeout
        for transfer in [*self.inflight.values(), *self.sending]:
            # a data-plane upload's own receive times out after idle_timeout and answers the
            # peer why (`data_put`); this is its backstop, the only cut of everything else
            backstop = transfer.kind == "upload" and transfer.probe is not None
            if transfer.cut or transfer.idle_for(now) <= idle_limit * (2 if backstop else 1):
                continue
            self._idle_cut(transfer)
            transfer.cancel()
            if self.inflight.get(transfer.name) is transfer:
                del self.inflight[transfer.name]
            self.sending.discard(transfer)

    def _supervise(self) -> None:
        """Enforce the round timeout: close with a quorum, or fail the run naming who is missing."""
        timeout = self.plan.federation.round_timeout
        quorum = self.plan.federation.min_collaborators or len(self.names)
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
                missing = sorted(set(self.names) - set(self.received))
                if len(self.received) >= quorum and (self.received or self.evaluating):
                    log.warning(
                        "round %d closed on timeout with %d of %d updates; missing: %s",
                        self.round,
                        len(self.received),
                        len(self.names),
                        ", ".join(missing),
                    )
                    self.rec.info("round_quorum", round=self.round, missing=missing)
                    self._close_round()
                    continue
                self.failed = (
                    f"round {self.round} timed out after {timeout:g} s with "
                    f"{len(self.received)} of {quorum} required updates; "
                    f"missing: {', '.join(missing)}"
                )
                self.cond.notify_all()
                raise TeeflError(self.failed)
            # let every collaborator hear that the run is over (bounded)
            deadline = time.monotonic() + 10.0
            while len(self.told_done) < len(self.names) and time.monotonic() < deadline:
                self.cond.wait(timeout=0.2)


def _chunk_to_wire(msg: teefl_pb2.Chunk | bytes) -> bytes:
    """GetModel's response serializer: data chunks arrive already serialized (`_publish`)."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class _Handlers:
    """Captures the generated method handlers so one serializer can be swapped."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


#: the request message of each RPC (teefl.proto)
_REQUESTS = {
    "Challenge": teefl_pb2.ChallengeRequest,
    "Join": teefl_pb2.JoinRequest,
    "WaitRound": teefl_pb2.WaitRequest,
    "GetModel": teefl_pb2.ModelRequest,
    "PutUpdate": teefl_pb2.Chunk,
}


def _refusing_malformed(servicer: Aggregator, behaviour: Any) -> Any:
    """A unary-request handler that answers a `_Malformed` request itself."""

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            servicer._malformed(context, request)
        return behaviour(request, context)

    return handle


def add_to_server(servicer: Aggregator, server: grpc.Server) -> None:
    """Register the servicer as the generated code does, but with GetModel sending pre-serialized
    chunks as they are (the wire format is unchanged: clients decode ordinary `Chunk`s), and
    with requests parsed by `_lenient`: bytes that are not the RPC's message get a defined
    answer (INVALID_ARGUMENT, a ``refused`` event) instead of a traceback in the log."""
    cap = _Handlers()
    teefl_pb2_grpc.add_FederationServicer_to_server(servicer, cap)
    handlers = dict(cap.handlers)
    for method, message_type in _REQUESTS.items():
        h = handlers[method]
        h = h._replace(request_deserializer=_lenient(message_type))
        if h.unary_unary is not None:
            h = h._replace(unary_unary=_refusing_malformed(servicer, h.unary_unary))
        elif h.unary_stream is not None:
            h = h._replace(unary_stream=_refusing_malformed(servicer, h.unary_stream))
        handlers[method] = h  # PutUpdate (stream request): `_put_update` checks each message
    handlers["GetModel"] = handlers["GetModel"]._replace(response_serializer=_chunk_to_wire)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(cap.service, handlers),))
    server.add_registered_method_handlers(cap.service, handlers)


def final_state(run_dir: Path, key: bytes | None = None) -> dict[str, torch.Tensor]:
    """Load a run's final global model (plain, or sealed when ``key`` is given)."""
    rd = RunDir(run_dir)
    if key is not None:
        from teefl.security.sealed import read_sealed

        return codec.decode_state(read_sealed(rd.final_model(sealed=True), key))
    return codec.decode_state(rd.final_model().read_bytes())
