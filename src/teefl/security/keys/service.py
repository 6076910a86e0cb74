"""The owner's key service: releases a secret to a party only after its TEE evidence verifies
under the owner's policy (`teefl keys serve`; the protocol is `teefl.security.keys.protocol`).

What a release needs, checked in this order (any failure: nothing is released, the requester
gets one line saying why, the audit log one record with the same reason):

1. the connection: TLS 1.3, a client certificate issued by the federation's CA (gRPC checks the
   chain), CA:false with clientAuth, not revoked (the CA's CRL), whose CN is a party of the
   owner's configuration;
2. the nonce: the one of this certificate's latest Challenge, used once, within ``nonce_ttl``
   (taken -- hence spent -- before anything else of the request is looked at);
3. the items: each one the owner lets this party receive;
4. the evidence: verified by the verifier of the party's role (`teefl.security.attest.Verifier`:
   signature chain, collateral, the owner's pinned measurements, TCB, debug) with report data
   ``report_data_for(tee_key, nonce, release_binding(client certificate key, items, party
   binding))`` -- so evidence made for another in-memory key, another connection, another item
   set or an earlier nonce is refused;
5. the party's configuration binding, when the owner pins it (``parties.NAME.bindings``).

The secrets are read once at start (a missing or group-readable key file stops the service with
one line) and leave the process only wrapped to the requester's in-memory key. Nothing here
logs or records a secret; the audit log carries the sealing key's id only.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from teefl.errors import TeeflError
from teefl.security import attest, certificates, crl
from teefl.security.keys import protocol
from teefl.security.keys.audit import AuditLog
from teefl.security.keys.config import KeyServiceConfig
from teefl.security.peer_identity import (
    REQUIRED_TLS_VERSION,
    IdentityError,
    check_client_certificate,
    client_cert,
    peer_certificate_pem,
    tls_version,
)
from teefl.wire import keys_pb2

log = logging.getLogger("teefl.keys")

#: a request is a nonce, a quote and a few keys: far below this (SNP evidence with its
#: certificate table is tens of KB)
MAX_REQUEST_BYTES = 1 << 20


class Refused(TeeflError):
    """A request the key service does not grant; ``status``: the gRPC status it answers with."""

    def __init__(self, reason: str, status: str = "PERMISSION_DENIED") -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass(frozen=True)
class Requester:
    """What a call says about its peer (from the gRPC auth context)."""

    address: str
    cert_pem: str | None
    tls_version: str | None


@dataclass(frozen=True)
class _Identity:
    name: str
    role: str
    cert_sha256: str
    client_spki: bytes


class KeyService:
    """The release logic, independent of gRPC (`KeyServer` carries it)."""

    def __init__(self, config: KeyServiceConfig) -> None:
        from teefl.security.sealed import key_id, load_key

        self.config = config
        self.sealing_key: bytes | None = None
        if config.sealing_key is not None:
            self.sealing_key = load_key(config.sealing_key)
        #: the sealing key's id (safe to log: an HMAC output), "" without a sealing key
        self.key_id = key_id(self.sealing_key).hex() if self.sealing_key is not None else ""
        self.tls_keys: dict[str, bytes] = {}
        for name, party in config.parties.items():
            if party.tls_key is not None:
                certificates.load_private_key(party.tls_key)  # PEM, unencrypted, mode 0600
                self.tls_keys[name] = party.tls_key.read_bytes()
        spec = config.attestation.spec()
        #: one verifier per role a party has: an unpinned policy stops the service here
        self.verifiers = {
            role: attest.Verifier(spec, role)
            for role in sorted({config.role_of(n) for n in config.parties})
        }
        self.revoked: frozenset[int] = frozenset()
        if config.tls.crl is not None:
            self.revoked = crl.load_crl(config.tls.crl, config.tls.ca)
        self.nonces = attest.NonceBook(config.nonce_ttl)
        self._nonce_lock = threading.Lock()
        self.audit = AuditLog(config.audit_log)

    # -- who is asking ---------------------------------------------------------------------
    def _identify(self, who: Requester) -> _Identity:
        if who.tls_version != REQUIRED_TLS_VERSION:
            raise Refused(
                f"connection uses {who.tls_version or 'no TLS'}; the key service requires "
                f"{REQUIRED_TLS_VERSION}",
                "UNAUTHENTICATED",
            )
        if not who.cert_pem:
            raise Refused(
                "no verified client certificate: the key service needs one", "UNAUTHENTICATED"
            )
        cert = client_cert(who.cert_pem)
        name = cert.cn or ""
        try:
            check_client_certificate(cert, name or "(no CN)", enrol=True, revoked=self.revoked)
        except IdentityError as exc:
            raise Refused(str(exc), exc.code.name) from None
        if name not in self.config.parties:
            raise Refused(
                f"certificate CN {name!r} is not a party of this key service (its "
                "configuration's parties)"
            )
        spki = attest.spki_der_of(who.cert_pem.encode())
        return _Identity(name, self.config.role_of(name), cert.der_sha256.hex(), spki)

    # -- the two calls ---------------------------------------------------------------------
    def challenge(self, who: Requester) -> tuple[bytes, float]:
        """A fresh nonce for this client certificate (its older one becomes stale)."""
        try:
            ident = self._identify(who)
        except Refused as exc:
            self._refused(who, None, "challenge", exc.reason, {})
            raise
        with self._nonce_lock:
            nonce = self.nonces.issue(ident.cert_sha256)
        self.audit.write(
            "challenge",
            party=ident.name,
            peer=who.address,
            client_cert=ident.cert_sha256,
            nonce=nonce.hex(),
        )
        return nonce, self.config.nonce_ttl

    def release(self, who: Requester, request: keys_pb2.ReleaseRequest) -> keys_pb2.ReleaseReply:
        """The items of ``request``, wrapped to its ``tee_key``, or `Refused`."""
        t0 = time.monotonic()
        record: dict[str, Any] = {"items": sorted(set(request.items))}
        ident: _Identity | None = None
        try:
            ident = self._identify(who)
            record.update(party=ident.name, role=ident.role, client_cert=ident.cert_sha256)
            with self._nonce_lock:
                nonce = self.nonces.take(ident.cert_sha256, bytes(request.nonce))
            record["nonce"] = nonce.hex()
            items = protocol.check_items(request.items)
            allowed = self.config.parties[ident.name].release
            denied = [i for i in items if i not in allowed]
            if denied:
                raise Refused(
                    f"{ident.name} may not receive {', '.join(denied)} (the owner's "
                    f"parties.{ident.name}.release: {', '.join(allowed)})"
                )
            if not request.HasField("evidence"):
                raise Refused("the request carries no evidence")
            evidence = attest.from_proto(request.evidence)
            record.update(kind=evidence.kind, provider=evidence.provider)
            tee_key = bytes(request.tee_key)
            protocol.public_key_of(tee_key, "tee_key")
            record["tee_key"] = attest.fingerprint(tee_key)
            party_binding = bytes(request.party_binding)
            if len(party_binding) != 32:
                raise Refused(
                    f"party_binding must be 32 bytes (attest.party_binding), got "
                    f"{len(party_binding)}"
                )
            record["party_binding"] = party_binding.hex()
            binding = protocol.release_binding(ident.client_spki, items, party_binding)
            verdict = self.verifiers[ident.role].verify(evidence, tee_key, nonce, binding)
            record["verdict"] = verdict.to_dict()
            pinned = self.config.parties[ident.name].bindings
            if pinned is not None and party_binding.hex() not in pinned:
                raise Refused(
                    f"configuration binding {party_binding.hex()} of {ident.name} is not in the "
                    f"owner's parties.{ident.name}.bindings (another plan, CA or code)"
                )
            secrets = {
                protocol.SEALING_KEY: self.sealing_key,
                protocol.TLS_KEY: self.tls_keys.get(ident.name),
            }
            missing = [i for i in items if secrets[i] is None]
            if missing:  # the configuration's checks make this unreachable; never release None
                raise Refused(f"the key service holds no {', '.join(missing)}", "INTERNAL")
            service_spki, wrapped = protocol.wrap(
                {i: secrets[i] for i in items},  # type: ignore[misc]
                tee_key,
                nonce,
            )
        except TeeflError as exc:
            reason = exc.reason if isinstance(exc, Refused) else str(exc)
            status = exc.status if isinstance(exc, Refused) else "PERMISSION_DENIED"
            self._refused(who, ident, "release", reason, record)
            raise Refused(reason, status) from None
        except Exception as exc:  # a bug: still nothing released, and still audited
            log.exception("release failed")
            reason = f"internal error of the key service ({type(exc).__name__}; see its log)"
            self._refused(who, ident, "release", reason, record)
            raise Refused(reason, "INTERNAL") from None
        if protocol.SEALING_KEY in items:
            record["key_id"] = self.key_id
        self.audit.write(
            "release",
            peer=who.address,
            accepted=True,
            seconds=round(time.monotonic() - t0, 4),
            **record,
        )
        assert ident is not None
        log.info(
            "released %s to %s (%s evidence, %s; key id %s)",
            ", ".join(items),
            ident.name,
            verdict.tee_type,
            verdict.status,
            self.key_id or "-",
        )
        return keys_pb2.ReleaseReply(
            service_key=service_spki,
            items=[
                keys_pb2.WrappedItem(item=w.item, iv=w.iv, ciphertext=w.ciphertext) for w in wrapped
            ],
        )

    def _refused(
        self,
        who: Requester,
        ident: _Identity | None,
        call: str,
        reason: str,
        record: dict[str, Any],
    ) -> None:
        name = ident.name if ident is not None else None
        self.audit.write(
            "refusal", call=call, peer=who.address, accepted=False, reason=reason, **record
        )
        log.warning(
            "refused %s of %s (%s): %s", call, name or "an unknown party", who.address, reason
        )

    def close(self) -> None:
        self.audit.close()


# -- gRPC ---------------------------------------------------------------------------------------
def requester_of(context: grpc.ServicerContext) -> Requester:
    return Requester(context.peer(), peer_certificate_pem(context), tls_version(context))


def _lenient(message_type: Any) -> Any:
    """A deserializer that never raises (gRPC would log a traceback and answer INTERNAL)."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception:  # DecodeError, or nesting beyond protobuf's limit
            return None

    return parse


class _Handlers:
    def __init__(self, service: KeyService) -> None:
        self.service = service

    def challenge(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed KeyChallengeRequest")
        try:
            nonce, ttl = self.service.challenge(requester_of(context))
        except Refused as exc:
            context.abort(grpc.StatusCode[exc.status], exc.reason)
        return keys_pb2.KeyChallengeReply(nonce=nonce, ttl_s=ttl)

    def release(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed ReleaseRequest")
        try:
            return self.service.release(requester_of(context), request)
        except Refused as exc:
            context.abort(grpc.StatusCode[exc.status], exc.reason)


def add_to_server(service: KeyService, server: grpc.Server) -> None:
    handlers = _Handlers(service)
    rpcs = {
        "Challenge": grpc.unary_unary_rpc_method_handler(
            handlers.challenge,
            request_deserializer=_lenient(keys_pb2.KeyChallengeRequest),
            response_serializer=keys_pb2.KeyChallengeReply.SerializeToString,
        ),
        "Release": grpc.unary_unary_rpc_method_handler(
            handlers.release,
            request_deserializer=_lenient(keys_pb2.ReleaseRequest),
            response_serializer=keys_pb2.ReleaseReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("teefl.keys.v1.KeyRelease", rpcs),)
    )


class KeyServer:
    """`KeyService` served over gRPC with mTLS (the federation's CA verifies clients)."""

    def __init__(self, config: KeyServiceConfig) -> None:
        from teefl.security.tls import server_credentials
        from teefl.security.tls_diagnosis import split_target

        self.config = config
        host, port = split_target(config.listen)
        creds = server_credentials(config.tls.ca, config.tls.cert, config.tls.key, True)
        self.service = KeyService(config)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="keys"),
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        add_to_server(self.service, self.server)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_secure_port(where, creds)
        except RuntimeError:
            self.port = 0
        if not self.port:
            self.service.close()
            raise TeeflError(f"the key service cannot listen on {config.listen} (in use?)")
        self.host = host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        log.info(
            "key service listening on %s (mTLS, CA %s; %d parties; audit log %s)",
            self.address,
            self.config.tls.ca,
            len(self.config.parties),
            self.config.audit_log,
        )

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait(grace + 5)
        self.service.close()


__all__ = ["KeyServer", "KeyService", "Refused", "Requester", "add_to_server", "requester_of"]
