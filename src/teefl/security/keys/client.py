"""A party's side of the key service: attest, and receive a secret that no file on its host holds.

`fetch` makes an EC P-384 key in this process's memory (in a TEE: the TEE's memory), asks the
service for a nonce, has the local TEE produce evidence bound to (that key, the nonce, the
release binding of this connection), and unwraps the answer with that key. The secret exists
only in this process; a failure is one `KeyServiceError` line: unreachable, wrong CA, refused
(with the service's reason), no evidence.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from teefl.errors import TeeflError
from teefl.security import attest
from teefl.security.keys import protocol
from teefl.wire import keys_pb2

if TYPE_CHECKING:
    from teefl.plan import Plan

_SERVICE = "/teefl.keys.v1.KeyRelease/"


class KeyServiceError(TeeflError):
    """The secret could not be obtained; the message is the one line for the user."""


def _describe(items: list[str]) -> str:
    names = {protocol.SEALING_KEY: "the sealing key", protocol.TLS_KEY: "the TLS key"}
    return " and ".join(names.get(i, i) for i in items)


def _issued_by(cert: Any, root: Any) -> bool:
    try:
        cert.verify_directly_issued_by(root)
    except Exception:  # another issuer name, another key, an unsupported algorithm
        return False
    return True


def _unreachable(address: str, ca: Path, cert: Path, key: Path) -> tuple[str, bool]:
    """Why the channel to the key service does not come up: (one line, worth retrying?)."""
    import socket

    from cryptography import x509

    from teefl.security import certificates
    from teefl.security.tls_diagnosis import _probe, split_target

    host, port = split_target(address)
    try:
        probe = _probe(host, port, cert, key, 2.0)
    except ConnectionRefusedError:
        return (
            f"the key service at {address} is unreachable (connection refused): is `teefl keys "
            "serve` running there, and is security.at_rest.key_from its address?",
            True,
        )
    except socket.gaierror as exc:
        return f"cannot resolve the key service host {host!r}: {exc.strerror}", False
    except OSError as exc:
        return (
            f"the key service at {address} is unreachable ({exc.strerror or exc})",
            True,
        )
    if probe.speaks != "tls" or probe.server_cert_der is None:
        return f"the service at {address} does not speak TLS: is it a teefl key service?", False
    theirs = x509.load_der_x509_certificate(probe.server_cert_der)
    roots = x509.load_pem_x509_certificates(Path(ca).read_bytes())  # gRPC trusts each of them
    if not any(_issued_by(theirs, root) for root in roots):
        names = ", ".join(f"'{r.subject.rfc4514_string()}'" for r in roots)
        return (
            f"the key service at {address} presents a certificate issued by "
            f"'{theirs.issuer.rfc4514_string()}', not by CA {ca} ({names}): wrong CA -- the "
            "key service must use the federation's PKI (security.tls.ca)",
            False,
        )
    if not certificates.covers_host(theirs, host):
        sans = ", ".join(certificates.sans(theirs)) or "none"
        return (
            f"the key service's certificate does not cover host {host!r} (SANs: {sans}); "
            f"re-issue it: teefl pki issue DIR --key-service {host} --force",
            False,
        )
    if probe.accepted is False:
        return (
            f"the key service at {address} refused the client certificate {cert}: it does not "
            "trust its issuer (wrong CA?) or the certificate is not valid",
            False,
        )
    return f"cannot connect to the key service at {address}", True


def _wait_ready(
    channel: grpc.Channel, address: str, ca: Path, cert: Path, key: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    why = f"no answer from the key service at {address}"
    while (left := deadline - time.monotonic()) > 0:
        try:
            grpc.channel_ready_future(channel).result(timeout=min(left, 2.0))
            return
        except grpc.FutureTimeoutError:
            why, retry = _unreachable(address, ca, cert, key)
            if not retry:
                raise KeyServiceError(why) from None
    raise KeyServiceError(f"{why} (gave up after {timeout:g} s)")


def fetch(
    address: str,
    *,
    ca: Path,
    cert: Path,
    key: Path,
    provider: Any,
    items: list[str],
    party_binding: bytes,
    timeout: float = 30.0,
) -> dict[str, bytes]:
    """The ``items`` the key service at ``address`` releases to this party, after it has
    verified the evidence of ``provider`` (an `EvidenceProvider`) bound to this request.

    ``cert``/``key``: this party's client certificate for the service, issued by ``ca`` (also
    the CA the service's certificate must chain to). ``party_binding``: this party's
    configuration binding (`teefl.security.attest.party_binding`), bound into the evidence.
    """
    from teefl.security import session
    from teefl.security.tls import channel_credentials

    items = protocol.check_items(items)
    what = _describe(items)
    creds = channel_credentials(ca, cert, key)  # our own files, checked with one line each
    client_spki = attest.spki_der_of(Path(cert).read_bytes())
    deadline = time.monotonic() + timeout
    channel = grpc.secure_channel(address, creds)
    try:
        _wait_ready(channel, address, ca, cert, key, timeout)
        challenge = channel.unary_unary(
            _SERVICE + "Challenge",
            request_serializer=keys_pb2.KeyChallengeRequest.SerializeToString,
            response_deserializer=keys_pb2.KeyChallengeReply.FromString,
        )
        release = channel.unary_unary(
            _SERVICE + "Release",
            request_serializer=keys_pb2.ReleaseRequest.SerializeToString,
            response_deserializer=keys_pb2.ReleaseReply.FromString,
        )
        try:
            left = max(1.0, deadline - time.monotonic())
            nonce = bytes(challenge(keys_pb2.KeyChallengeRequest(), timeout=left).nonce)
            tee_key = session.new_key()
            tee_spki = protocol.spki_of(tee_key)
            binding = protocol.release_binding(client_spki, items, party_binding)
            try:
                evidence = provider.get_evidence(attest.report_data_for(tee_spki, nonce, binding))
            except TeeflError as exc:
                raise KeyServiceError(
                    f"no evidence for the key service at {address}: {exc}"
                ) from None
            ev = attest.to_proto(evidence)
            left = max(1.0, deadline - time.monotonic())
            reply = release(
                keys_pb2.ReleaseRequest(
                    nonce=nonce,
                    evidence=keys_pb2.Evidence(
                        kind=ev.kind, provider=ev.provider, quote=ev.quote, extra_json=ev.extra_json
                    ),
                    tee_key=tee_spki,
                    items=items,
                    party_binding=bytes(party_binding),
                ),
                timeout=left,
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise KeyServiceError(
                    f"the key service at {address} refused {what}: {details}"
                ) from None
            raise KeyServiceError(
                f"the key service at {address} did not release {what}: "
                f"{code.name if code else 'error'}: {details}"
            ) from None
        got = protocol.unwrap(
            tee_key,
            bytes(reply.service_key),
            nonce,
            [protocol.Wrapped(w.item, bytes(w.iv), bytes(w.ciphertext)) for w in reply.items],
        )
    finally:
        channel.close()
    missing = [i for i in items if i not in got]
    if missing:
        raise KeyServiceError(f"the key service at {address} answered without {_describe(missing)}")
    return {i: got[i] for i in items}


def fetch_sealing_key(plan: Plan, party_binding: bytes, provider: Any = None) -> bytes:
    """The sealing key of ``plan``'s ``security.at_rest.key_from``, released to this process
    after its evidence (``provider``, default: the plan's attestation provider) verified under
    the owner's policy."""
    from teefl.security.sealed import KEY_SIZE

    rest, sec = plan.security.at_rest, plan.security
    assert rest.key_from is not None and rest.client_cert is not None
    assert rest.client_key is not None
    if sec.tls.ca is None:
        raise KeyServiceError(
            "security.at_rest.key_from needs security.tls.ca: the key service is reached over "
            "mTLS with the plan's CA"
        )
    if provider is None:
        try:
            provider = attest.make_provider(sec.attestation)
        except TeeflError as exc:
            raise KeyServiceError(
                f"security.at_rest.key_from: this host cannot attest to the key service "
                f"(security.attestation.provider {sec.attestation.provider}): {exc}"
            ) from None
    got = fetch(
        rest.key_from,
        ca=sec.tls.ca,
        cert=rest.client_cert,
        key=rest.client_key,
        provider=provider,
        items=[protocol.SEALING_KEY],
        party_binding=party_binding,
        timeout=rest.key_timeout,
    )
    key = got[protocol.SEALING_KEY]
    if len(key) != KEY_SIZE:
        raise KeyServiceError(
            f"the key service at {rest.key_from} released a sealing key of {len(key)} bytes, "
            f"not {KEY_SIZE}"
        )
    return key


__all__ = ["KeyServiceError", "fetch", "fetch_sealing_key"]
