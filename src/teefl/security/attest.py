"""Attested join: evidence bound to a key born in the TEE, to a fresh nonce and to the plan.

Report data of every quote = SHA-512(DER SubjectPublicKeyInfo of the sender's in-memory TLS key
|| a 32-byte nonce chosen by the verifier || `config_binding`). A verified quote therefore proves
that the private key of the TLS connections that carry model traffic lives in a TEE running the
measured code, with *this* plan and CA and *this* workload (and, for the aggregator, strategy)
code digest (the binding, `party_binding`), now (the nonce).

Where each key is born (see `teefl.security.session`): with attestation required for a role,
that role's TLS key is made in memory at start-up and never written anywhere. The provisioned
key files are only the admin-issued identity used to enrol (a collaborator's Challenge and Join)
and to endorse (the aggregator signs its in-memory key with its provisioned key).

The plan fingerprint (`config_sections`) is compared at every Join in every mode, so a plan that
differs between the parties is named at once; with attestation the binding makes the comparison
something a host cannot lie about.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from teefl.errors import TeeflError
from teefl.plan import AttestationSpec, Plan, plan_digest, plan_sections
from teefl.security.tee.detect import default_provider
from teefl.security.tee.evidence import (
    ConfigfsTsmProvider,
    Evidence,
    EvidenceProvider,
    GramineProvider,
)
from teefl.security.tee.policy import ROLE_KEYS, ROLES, require_pinned
from teefl.security.tee.simulated import SimulatedProvider
from teefl.security.tee.verify import (
    AttestationError,
    QuoteVerdict,
    SimulatedVerifier,
    enforce_policy,
    report_data_for,
    spki_der_of,
    verify_evidence,
)
from teefl.wire import teefl_pb2

log = logging.getLogger("teefl.attest")

NONCE_SIZE = 32
#: a Challenge nonce must be used within this many seconds
NONCE_TTL_S = 120.0
#: version of the binding document (`binding_document`); bump when its fields change meaning
BINDING_VERSION = 1
#: what the aggregator's provisioned key signs (with the SPKI hash, nonce and binding): the
#: prefix keeps such a signature from meaning anything in another protocol
ENDORSEMENT_CONTEXT = b"teefl aggregator endorsement v1\0"


def make_provider(spec: AttestationSpec) -> EvidenceProvider:
    """This host's evidence source, as the plan asks."""
    if spec.provider == "simulated":
        return SimulatedProvider(allow_simulated=spec.allow_simulated, key_file=spec.simulated_key)
    if spec.provider == "configfs-tsm":
        return ConfigfsTsmProvider()
    if spec.provider == "gramine":
        return GramineProvider(Path("/"))
    return default_provider(allow_simulated=spec.allow_simulated, simulated_key=spec.simulated_key)


def to_proto(ev: Evidence) -> teefl_pb2.Evidence:
    extra = ev.to_dict()["extra"]
    return teefl_pb2.Evidence(
        kind=ev.kind, provider=ev.provider, quote=ev.quote, extra_json=json.dumps(extra)
    )


def from_proto(msg: teefl_pb2.Evidence) -> Evidence:
    try:
        extra = json.loads(msg.extra_json) if msg.extra_json else {}
        if not isinstance(extra, dict):
            raise ValueError("extra is not an object")
        return Evidence.from_dict(
            {
                "kind": msg.kind,
                "provider": msg.provider,
                "extra": extra,
                "quote_b64": base64.b64encode(msg.quote).decode(),
            }
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise AttestationError(f"malformed evidence: {exc}") from None


def spki_of_pem(pem: bytes | str) -> bytes:
    """DER SubjectPublicKeyInfo of a PEM certificate (what report data binds)."""
    data = pem.encode() if isinstance(pem, str) else pem
    return spki_der_of(x509.load_pem_x509_certificate(data))


def fingerprint(spki: bytes) -> str:
    return hashlib.sha256(spki).hexdigest()


# -- what a party runs with: the plan fingerprint and the configuration binding ------------------
def ca_digest(plan: Plan) -> bytes | None:
    """SHA-256 of the plan's CA certificate (DER: the fingerprint `teefl pki show` prints),
    or None without one (transport none)."""
    ca = plan.security.tls.ca
    if ca is None or (plan.security.transport or "none") == "none":
        return None
    from teefl.security import certificates

    return hashlib.sha256(
        certificates.load_certificate(ca).public_bytes(serialization.Encoding.DER)
    ).digest()


def config_sections(plan: Plan) -> dict[str, bytes]:
    """What a party sends at Challenge and Join: the SHA-256 of each top-level plan section
    (`teefl.plan.plan_sections`) and of the CA certificate (``ca``)."""
    sections = plan_sections(plan)
    ca = ca_digest(plan)
    if ca is not None:
        sections["ca"] = ca
    return sections


def differing_sections(mine: dict[str, bytes], theirs: dict[str, bytes]) -> list[str]:
    """The sections (sorted) in which two `config_sections` differ, one missing included."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def binding_document(plan: Plan, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """What a party binds into its evidence, as a small document hashed canonically: the plan
    fingerprint and the CA, plus ``extra`` (the code digests of `party_binding`)."""
    ca = ca_digest(plan)
    doc: dict[str, Any] = {
        "version": BINDING_VERSION,
        "plan": plan_digest(plan).hex(),
        "ca": ca.hex() if ca is not None else "",
    }
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"binding field {key!r} is reserved")
        doc[key] = value
    return doc


def config_binding(plan: Plan, extra: dict[str, str] | None = None) -> bytes:
    """SHA-256 of the canonical `binding_document`: the last 32 bytes hashed into report data."""
    doc = binding_document(plan, extra)
    return hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).digest()


def party_binding(plan: Plan, workload: str = "", strategy: str | None = None) -> bytes:
    """The `config_binding` of a party that runs workload code of digest ``workload``
    (`teefl.workload.digest`) and, for the aggregator, strategy code of digest ``strategy``
    ("" for a strategy built into teefl).

    Why the code goes into the binding: the plan says WHICH workload and strategy to run, but
    two parties with the same plan can still load different files. Bound into report data, the
    digest is something the TEE vouches for -- a host cannot claim one digest at Join while its
    enclave or CVM loaded other code. A collaborator binds ``workload`` only; the aggregator
    binds both (the key ``strategy`` present, even empty, keeps the two roles' documents apart).
    """
    extra: dict[str, str] = {}
    if workload:
        extra["workload"] = workload
    if strategy is not None:
        extra["strategy"] = strategy
    return config_binding(plan, extra)


# -- the aggregator's endorsement of its in-memory key -------------------------------------------
def _endorsed_message(spki: bytes, nonce: bytes, binding: bytes) -> bytes:
    return ENDORSEMENT_CONTEXT + hashlib.sha256(spki).digest() + bytes(nonce) + bytes(binding)


def endorse(key: Any, spki: bytes, nonce: bytes, binding: bytes) -> bytes:
    """Sign (in-memory SPKI, the collaborator's nonce, the binding) with the aggregator's
    provisioned key: the admin-issued identity vouches for the key its TEE made."""
    message = _endorsed_message(spki, nonce, binding)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(
            message,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
            hashes.SHA256(),
        )
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify_endorsement(
    cert_pem: bytes,
    signature: bytes,
    spki: bytes,
    nonce: bytes,
    binding: bytes,
    *,
    ca: Path,
    host: str,
    revoked: frozenset[int] = frozenset(),
) -> x509.Certificate:
    """Check the aggregator's endorsement: its certificate is issued by the plan's CA, valid,
    a server certificate (EKU serverAuth, CA:false) for ``host``, not revoked, and its key
    signed our nonce with the in-memory SPKI. Returns the certificate."""
    from teefl.security import certificates

    try:
        cert = x509.load_pem_x509_certificate(bytes(cert_pem))
    except ValueError:
        raise AttestationError("the aggregator's endorsement carries no PEM certificate") from None
    ca_cert = certificates.load_certificate(ca)
    try:
        certificates.check_validity(cert, "of the aggregator's endorsement")
        certificates.check_signed_by(cert, "of the aggregator's endorsement", ca_cert, ca)
    except TeeflError as exc:
        raise AttestationError(f"endorsement refused: {exc}") from None
    if certificates.is_ca(cert) or "serverAuth" not in certificates.ekus(cert):
        raise AttestationError(
            "endorsement refused: the certificate is not a server certificate "
            "(needs EKU serverAuth and CA:false)"
        )
    if not certificates.covers_host(cert, host):
        raise AttestationError(
            f"endorsement refused: the aggregator certificate does not cover host {host!r} "
            f"(SANs: {', '.join(certificates.sans(cert)) or 'none'})"
        )
    if cert.serial_number in revoked:
        raise AttestationError(
            f"endorsement refused: the aggregator certificate (serial {cert.serial_number:x}) "
            "is revoked (security.tls.crl)"
        )
    public = cert.public_key()
    message = _endorsed_message(spki, nonce, binding)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(
                signature,
                message,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
                hashes.SHA256(),
            )
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA384()))
        else:
            raise AttestationError("endorsement refused: unsupported key type")
    except InvalidSignature:
        raise AttestationError(
            "endorsement refused: the aggregator's provisioned key did not sign this TLS key "
            "and nonce"
        ) from None
    return cert


class Verifier:
    """Checks the evidence of a party of one role against that role's policy and collateral.

    ``role`` is the role of the party WHOSE evidence is verified ("aggregator": a collaborator
    checks the aggregator; "collaborator": the aggregator checks a collaborator). Construction
    is the start-time check: a policy that pins no TEE identity (see
    ``teefl.security.tee.policy.require_pinned``) stops the party with one line, and a stated
    TDX subset or ``allow_debug`` is warned about at every start.
    """

    def __init__(self, spec: AttestationSpec, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.role = role
        where = f"security.attestation.policies.{ROLE_KEYS[role]}"
        policy = spec.policies.for_role(role)
        for warning in require_pinned(policy, where):
            log.warning("ATTESTATION POLICY WARNING: %s", warning)
        assert policy is not None  # require_pinned refuses None
        if policy.allow_simulated and not spec.allow_simulated:  # the plan validator says so too
            raise AttestationError(f"{where}.allow_simulated needs allow_simulated: true")
        self.policy = policy
        try:
            self.collateral = spec.collateral.read_text() if spec.collateral else None
        except OSError as exc:
            raise TeeflError(
                f"cannot read security.attestation.collateral {spec.collateral}: {exc.strerror}"
            ) from None
        self.pccs_url = spec.pccs_url
        self.simulated = SimulatedVerifier(allow_simulated=True) if policy.allow_simulated else None
        self.snp = snp_collateral(spec) if "sev-snp" in policy.pinned_kinds() else None

    def verify(self, evidence: Evidence, spki: bytes, nonce: bytes, binding: bytes) -> QuoteVerdict:
        """``binding``: the *verifier's own* `config_binding` -- a peer whose plan or CA differs
        from ours has other report data and is refused."""
        verdict = verify_evidence(
            evidence,
            collateral_json=self.collateral,
            pccs_url=self.pccs_url,
            simulated_verifier=self.simulated,
            snp_collateral=self.snp,
        )
        enforce_policy(
            verdict, self.policy, report_data_for(spki, nonce, binding), require_pinned=True
        )
        return verdict


def snp_collateral(spec: AttestationSpec) -> Any:
    """The plan's SEV-SNP collateral (files, and AMD KDS with a disk cache when allowed)."""
    from teefl.security.tee.snp.collateral import SnpCollateral, default_kds_cache

    snp = spec.snp
    cache = (snp.kds_cache or default_kds_cache()) if snp.kds else None
    return SnpCollateral.from_files(
        snp.certs, snp.crls, kds_cache=cache, require_crl=snp.require_crl
    )


def check_policies(spec: AttestationSpec) -> None:
    """Refuse, before anything starts, a required role whose policy pins no identity (what each
    verifying party would refuse at its own start; ``teefl run`` calls this for both roles)."""
    for role, key in (("collaborator", "collaborators"), ("aggregator", "aggregator")):
        if getattr(spec, key) == "required":
            Verifier(spec, role)


@dataclass
class _Pending:
    nonce: bytes
    expires: float


class NonceBook:
    """Single-use nonces per collaborator: a quote bound to an old nonce is a replay.

    ``ttl``: seconds a nonce stays valid (default `NONCE_TTL_S`; the key service's is the
    owner's ``nonce_ttl``)."""

    def __init__(self, ttl: float | None = None) -> None:
        self._pending: dict[str, _Pending] = {}
        self.ttl = ttl

    def issue(self, name: str) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        ttl = NONCE_TTL_S if self.ttl is None else self.ttl
        self._pending[name] = _Pending(nonce, time.monotonic() + ttl)
        return nonce

    def take(self, name: str, nonce: bytes) -> bytes:
        pending = self._pending.pop(name, None)
        if pending is None or pending.nonce != nonce:
            raise AttestationError(
                "attestation refused: stale or unknown nonce (evidence must be bound to the "
                "nonce of the latest Challenge)"
            )
        if time.monotonic() > pending.expires:
            raise AttestationError("attestation refused: nonce expired")
        return pending.nonce


class RateLimiter:
    """Token buckets: each key allows a burst of events, then one per interval.

    Why: every Challenge that asks for the aggregator's evidence makes a fresh quote (tens to
    hundreds of milliseconds of a TEE's quoting service). Keyed by collaborator name and by peer
    host, an authenticated peer cannot make the aggregator quote without pause.
    """

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at time)
        self._lock = threading.Lock()

    def allow(self, *buckets: tuple[str, float, float]) -> float:
        """``buckets``: (key, burst, seconds per event). 0.0 when every bucket has room (the
        event is then counted in each), else the seconds until it would."""
        now = time.monotonic()
        with self._lock:
            levels = {}
            for key, burst, every in buckets:
                level, at = self._state.get(key, (float(burst), now))
                levels[key] = (min(float(burst), level + (now - at) / every), every)
            wait = max(
                ((1.0 - lv) * every for lv, every in levels.values() if lv < 1.0), default=0.0
            )
            if wait:
                return wait
            for key, (level, _) in levels.items():
                self._state[key] = (level - 1.0, now)
            return 0.0


def write_verdict(run_dir: Path, party: str, record: dict[str, Any]) -> None:
    """Keep every verdict (accepted or refused) in the run: ``attestation/<party>.json``.

    Under an exclusive lock of the file: the collaborators of one run directory (``teefl run``)
    all append to ``aggregator.json``, at the same instant when they re-attest together, and a
    read that met another writer's truncated file used to start the list over."""
    import fcntl

    from teefl.rundir import RunDir
    from teefl.runfiles import open_private, private_dir

    rd = RunDir(run_dir)
    private_dir(rd.attestation_dir)
    fd = open_private(rd.verdicts(party), os.O_RDWR | os.O_CREAT)
    with os.fdopen(fd, "r+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        history = []
        try:
            history = json.loads(fh.read().decode("utf-8") or "[]")
        except (UnicodeDecodeError, json.JSONDecodeError):
            history = []
        if not isinstance(history, list):
            history = []
        history.append(record)
        fh.seek(0)
        fh.truncate()
        fh.write((json.dumps(history, indent=2, default=str) + "\n").encode("utf-8"))


def fetch_server_certificate(address: str, timeout: float = 10.0) -> bytes:
    """The certificate (PEM) that ``address`` presents, fetched by a TLS handshake that verifies
    nothing: the caller pins exactly this certificate on its channels, and trusts it only once
    the aggregator's evidence and endorsement, both bound to its key, have been verified over
    a channel pinned to it."""
    from teefl.security.tls_diagnosis import split_target

    host, port = split_target(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionError(
            f"cannot fetch the aggregator's certificate from {address}: {exc}"
        ) from None
    if not der:
        raise ConnectionError(f"the aggregator at {address} presented no certificate")
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def first_san(cert_pem: bytes) -> str:
    """A host name the certificate covers (for gRPC's target-name check on a pinned channel)."""
    from teefl.security import certificates

    cert = x509.load_pem_x509_certificate(cert_pem)
    for entry in certificates.sans(cert):
        return entry.split(":", 1)[1]
    return certificates.common_name(cert) or ""
