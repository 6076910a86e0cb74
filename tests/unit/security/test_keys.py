"""The owner's key service (`teefl keys serve`), in this process over real mTLS on loopback.

An honest party (the aggregator's key-client certificate, the test's simulated "TEE") gets the
sealing key; a request whose evidence is bound to another in-memory key, to another connection,
to a stale or expired nonce, or that shows a measurement outside the owner's policy gets nothing,
and the refusal is one line to the requester and one record in the audit log. No secret is ever
written to the audit log or the service's log output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from identutil import secure_plan, sim_key
from keysutil import files_holding, key_client, key_server, owner_setup, spellings
from teefl.errors import TeeflError
from teefl.security import attest, certificates, crl, pki, session
from teefl.security.keys import protocol
from teefl.security.keys.audit import read_audit
from teefl.security.keys.client import KeyServiceError, fetch
from teefl.security.keys.config import load_config
from teefl.security.keys.service import KeyService
from teefl.security.tee.simulated import SimulatedProvider
from teefl.wire import keys_pb2, keys_pb2_grpc

BINDING = hashlib.sha256(b"the aggregator's configuration binding").digest()


@pytest.fixture
def owner(tmp_path: Path) -> dict[str, Any]:
    """A federation PKI (from a plan), the owner's configuration and sealing key."""
    plan, _, _ = secure_plan(tmp_path)
    config, key = owner_setup(tmp_path, tmp_path / "pki")
    return {"tmp": tmp_path, "pki": tmp_path / "pki", "config": config, "key": key, "plan": plan}


def provider(tmp: Path, **kw: Any) -> SimulatedProvider:
    return SimulatedProvider(allow_simulated=True, key_file=sim_key(tmp), **kw)


def fetch_as(owner: dict[str, Any], address: str, name: str = "aggregator", **kw: Any):
    cert, key = key_client(owner["pki"], name)
    args = {
        "ca": owner["pki"] / "ca.crt",
        "cert": cert,
        "key": key,
        "provider": provider(owner["tmp"]),
        "items": [protocol.SEALING_KEY],
        "party_binding": BINDING,
        "timeout": 15.0,
        **kw,
    }
    return fetch(address, **args)


def audit_of(owner: dict[str, Any]) -> list[dict[str, Any]]:
    return read_audit(Path(load_config(owner["config"]).audit_log))


# -- the protocol ---------------------------------------------------------------------------
def test_wrapped_items_open_only_with_the_request_key() -> None:
    tee = session.new_key()
    nonce = os.urandom(32)
    service_spki, wrapped = protocol.wrap({"sealing_key": b"k" * 32}, protocol.spki_of(tee), nonce)
    assert protocol.unwrap(tee, service_spki, nonce, wrapped) == {"sealing_key": b"k" * 32}
    assert all(b"k" * 32 not in w.ciphertext for w in wrapped)
    with pytest.raises(protocol.ReleaseError, match="wrapped to another key"):
        protocol.unwrap(session.new_key(), service_spki, nonce, wrapped)
    with pytest.raises(protocol.ReleaseError, match="wrapped to another key"):
        protocol.unwrap(tee, service_spki, os.urandom(32), wrapped)
    renamed = [protocol.Wrapped("tls_key", w.iv, w.ciphertext) for w in wrapped]
    with pytest.raises(protocol.ReleaseError):
        protocol.unwrap(tee, service_spki, nonce, renamed)


def test_release_binding_covers_connection_items_and_party() -> None:
    a, b = session.spki_of(session.new_key()), session.spki_of(session.new_key())
    base = protocol.release_binding(a, ["sealing_key"], BINDING)
    assert base == protocol.release_binding(a, ["sealing_key", "sealing_key"], BINDING)
    assert base != protocol.release_binding(b, ["sealing_key"], BINDING)
    assert base != protocol.release_binding(a, ["sealing_key", "tls_key"], BINDING)
    assert base != protocol.release_binding(a, ["sealing_key"], bytes(32))
    with pytest.raises(protocol.ReleaseError, match="unknown item 'ca_key'"):
        protocol.check_items(["ca_key"])


# -- releases and refusals over mTLS ---------------------------------------------------------
def test_attested_party_gets_the_key_and_nothing_leaks(
    owner: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with key_server(owner["config"]) as server:
        got = fetch_as(owner, server.address)
    assert got == {"sealing_key": owner["key"]}
    records = audit_of(owner)
    assert [r["event"] for r in records] == ["challenge", "release"]
    release = records[-1]
    assert release["accepted"] is True and release["party"] == "aggregator"
    assert release["verdict"]["tee_type"] == "simulated"
    assert release["party_binding"] == BINDING.hex()
    assert release["nonce"] == records[0]["nonce"]
    from teefl.security.sealed import key_id

    assert release["key_id"] == key_id(owner["key"]).hex()
    audit = Path(load_config(owner["config"]).audit_log)
    assert oct(audit.stat().st_mode & 0o777) == "0o600"
    assert files_holding(owner["key"], audit) == []
    logged = caplog.text.encode("utf-8", "surrogateescape")
    assert [how for how, form in spellings(owner["key"]).items() if form in logged] == []


def _raw_release(
    owner: dict[str, Any],
    port: int,
    *,
    mode: str,
    name: str = "aggregator",
    items: tuple[str, ...] = ("sealing_key",),
    evidence_provider: SimulatedProvider | None = None,
) -> str:
    """A hand-made request with one thing wrong (``mode``); returns the refusal's details."""
    cert, key = key_client(owner["pki"], name)
    creds = grpc.ssl_channel_credentials(
        (owner["pki"] / "ca.crt").read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        stub = keys_pb2_grpc.KeyReleaseStub(ch)
        nonce = stub.Challenge(keys_pb2.KeyChallengeRequest(), timeout=10).nonce
        tee = session.new_key()
        tee_spki = protocol.spki_of(tee)
        signed_key, client_spki = tee_spki, attest.spki_der_of(cert.read_bytes())
        if mode == "other-key":  # evidence for one in-memory key, the request names another
            signed_key = protocol.spki_of(session.new_key())
        if mode == "other-connection":  # evidence made for another client certificate
            client_spki = session.spki_of(session.new_key())
        if mode == "stale-nonce":  # a newer Challenge makes the first nonce stale
            stub.Challenge(keys_pb2.KeyChallengeRequest(), timeout=10)
        if mode == "expired-nonce":
            time.sleep(0.4)
        binding = protocol.release_binding(client_spki, items, BINDING)
        ev = attest.to_proto(
            (evidence_provider or provider(owner["tmp"])).get_evidence(
                attest.report_data_for(signed_key, nonce, binding)
            )
        )
        request = keys_pb2.ReleaseRequest(
            nonce=nonce,
            evidence=keys_pb2.Evidence(
                kind=ev.kind, provider=ev.provider, quote=ev.quote, extra_json=ev.extra_json
            ),
            tee_key=tee_spki,
            items=list(items),
            party_binding=BINDING,
        )
        if mode == "replay":  # the same request twice: the nonce is spent by the first
            stub.Release(request, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Release(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = refused.value.details()
    assert "\n" not in details
    return details


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("other-key", "report data does not bind the TLS key"),
        ("other-connection", "report data does not bind the TLS key"),
        ("stale-nonce", "stale or unknown nonce"),
        ("replay", "stale or unknown nonce"),
    ],
)
def test_evidence_bound_to_something_else_gets_nothing(
    owner: dict[str, Any], mode: str, reason: str
) -> None:
    with key_server(owner["config"]) as server:
        details = _raw_release(owner, server.port, mode=mode)
    assert reason in details
    refusal = audit_of(owner)[-1]
    assert refusal["event"] == "refusal" and refusal["accepted"] is False
    assert reason in refusal["reason"] and refusal["party"] == "aggregator"
    assert files_holding(owner["key"], Path(load_config(owner["config"]).audit_log)) == []


def test_an_expired_nonce_gets_nothing(owner: dict[str, Any]) -> None:
    config, _ = owner_setup(owner["tmp"], owner["pki"], name="ttl.yaml", nonce_ttl=0.2)
    with key_server(config) as server:
        details = _raw_release({**owner, "config": config}, server.port, mode="expired-nonce")
    assert "nonce expired" in details
    assert "nonce expired" in read_audit(owner["tmp"] / "ttl-audit.jsonl")[-1]["reason"]


def test_a_measurement_outside_the_owners_policy_gets_nothing(owner: dict[str, Any]) -> None:
    """The same simulated platform key, the same binding: only the measurement differs."""
    outside = provider(owner["tmp"], measurements={"mrtd": b"\x66" * 48})
    with key_server(owner["config"]) as server, pytest.raises(KeyServiceError) as refused:
        fetch_as(owner, server.address, provider=outside)
    line = str(refused.value)
    assert "refused the sealing key" in line and "MRTD 6666666666666666" in line
    assert "not in policy" in line and "\n" not in line
    refusal = audit_of(owner)[-1]
    assert refusal["event"] == "refusal" and "MRTD 6666666666666666" in refusal["reason"]


def test_the_owners_policy_is_the_one_that_counts(owner: dict[str, Any]) -> None:
    """Evidence the federation's plan would accept is refused when the OWNER pins another
    measurement: the key service reads only its own configuration."""
    config, _ = owner_setup(
        owner["tmp"], owner["pki"], name="strict.yaml", policy={"rtmr3": ["77" * 48]}
    )
    with key_server(config) as server, pytest.raises(KeyServiceError, match="RTMR3"):
        fetch_as(owner, server.address)


def test_parties_and_items_the_owner_did_not_list_get_nothing(owner: dict[str, Any]) -> None:
    pki.issue_key_client(owner["pki"], "stranger")
    with key_server(owner["config"]) as server:
        with pytest.raises(KeyServiceError, match="'stranger' is not a party"):
            fetch_as(owner, server.address, name="stranger")
        with pytest.raises(KeyServiceError, match="may not receive tls_key"):
            fetch_as(owner, server.address, items=["tls_key"])
    events = [(r["event"], r.get("call")) for r in audit_of(owner)]
    assert events == [("refusal", "challenge"), ("challenge", None), ("refusal", "release")]


def test_a_pinned_configuration_binding_is_enforced(owner: dict[str, Any]) -> None:
    parties = {"aggregator": {"release": ["sealing_key"], "bindings": [BINDING.hex()]}}
    config, key = owner_setup(owner["tmp"], owner["pki"], name="pinned.yaml", parties=parties)
    with key_server(config) as server:
        assert fetch_as(owner, server.address) == {"sealing_key": key}
        with pytest.raises(KeyServiceError, match="configuration binding 00000000"):
            fetch_as(owner, server.address, party_binding=bytes(32))


def test_a_revoked_client_certificate_gets_nothing(owner: dict[str, Any]) -> None:
    path, _ = crl.revoke(owner["pki"], certificates=[key_client(owner["pki"])[0]])
    config, _ = owner_setup(owner["tmp"], owner["pki"], name="crl.yaml")
    data = yaml.safe_load(config.read_text())
    data["tls"]["crl"] = str(path)
    config.write_text(yaml.safe_dump(data))
    with key_server(config) as server, pytest.raises(KeyServiceError, match="is revoked"):
        fetch_as(owner, server.address)


def test_a_partys_tls_key_is_released_to_it(owner: dict[str, Any]) -> None:
    tls_key = certificates.collaborator_paths(owner["pki"], "col1")[1]
    parties = {
        "aggregator": {"release": ["sealing_key"]},
        "col1": {"role": "collaborator", "release": ["tls_key"], "tls_key": str(tls_key)},
    }
    config, _ = owner_setup(owner["tmp"], owner["pki"], name="tls.yaml", parties=parties)
    data = yaml.safe_load(config.read_text())
    data["attestation"]["policies"]["collaborators"] = data["attestation"]["policies"]["aggregator"]
    config.write_text(yaml.safe_dump(data))
    pki.issue_key_client(owner["pki"], "col1")
    with key_server(config) as server:
        got = fetch_as(owner, server.address, name="col1", items=["tls_key"])
    assert got == {"tls_key": tls_key.read_bytes()}


# -- bad input: one line each ----------------------------------------------------------------
def test_unreachable_key_service_is_one_line(owner: dict[str, Any]) -> None:
    from fedutil import free_port

    t0 = time.monotonic()
    with pytest.raises(KeyServiceError) as exc:
        fetch_as(owner, f"127.0.0.1:{free_port()}", timeout=2.0)
    assert "unreachable (connection refused)" in str(exc.value)
    assert "\n" not in str(exc.value) and time.monotonic() - t0 < 15


def test_wrong_ca_is_one_line(owner: dict[str, Any]) -> None:
    other = owner["tmp"] / "other-pki"
    pki.init_ca(other)
    pki.issue_key_client(other, "aggregator")
    with key_server(owner["config"]) as server:
        # the client trusts another CA: the service's certificate is not from it
        cert, key = key_client(other)
        with pytest.raises(KeyServiceError, match="wrong CA") as exc:
            fetch_as(owner, server.address, ca=other / "ca.crt", cert=cert, key=key)
        assert "\n" not in str(exc.value)
        # the service trusts the federation's CA only: a client certificate of another PKI is
        # refused (the client trusts both CAs here, so only its certificate is wrong)
        both = owner["tmp"] / "both.crt"
        both.write_bytes((other / "ca.crt").read_bytes() + (owner["pki"] / "ca.crt").read_bytes())
        with pytest.raises(KeyServiceError, match="refused the client certificate") as exc:
            fetch_as(owner, server.address, ca=both, cert=cert, key=key)
        assert "\n" not in str(exc.value)


def test_key_file_missing_on_the_service_is_one_line(owner: dict[str, Any]) -> None:
    (owner["tmp"] / "owner.key").unlink()
    with pytest.raises(TeeflError) as exc:
        KeyService(load_config(owner["config"]))
    assert str(exc.value) == f"key file {owner['tmp'] / 'owner.key'} not found"


def test_an_unpinned_owner_policy_stops_the_service(owner: dict[str, Any]) -> None:
    data = yaml.safe_load(owner["config"].read_text())
    data["attestation"] = {"policies": {"aggregator": {"accepted_tcb_statuses": ["UpToDate"]}}}
    owner["config"].write_text(yaml.safe_dump(data))
    with pytest.raises(TeeflError, match="pins no TEE identity"):
        KeyService(load_config(owner["config"]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sealing_key": None}, "names sealing_key but sealing_key (the key file) is not set"),
        ({"parties": {"bad name": {"release": ["sealing_key"]}}}, "party 'bad name'"),
        ({"parties": {"aggregator": {"release": ["ca_key"]}}}, "parties.aggregator.release"),
        ({"tls": None}, "invalid key service configuration"),
        ({"surprise": 1}, "surprise: unknown key"),
    ],
)
def test_configuration_errors_are_one_line(
    owner: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    data = {**yaml.safe_load(owner["config"].read_text()), **change}
    owner["config"].write_text(yaml.safe_dump(data))
    with pytest.raises(TeeflError, match="invalid key service configuration") as exc:
        load_config(owner["config"])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_an_internal_error_releases_nothing_and_is_audited(
    owner: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("wrapping failed")

    monkeypatch.setattr(protocol, "wrap", broken)
    with key_server(owner["config"]) as server, pytest.raises(KeyServiceError) as exc:
        fetch_as(owner, server.address)
    assert "INTERNAL: internal error of the key service (RuntimeError" in str(exc.value)
    assert audit_of(owner)[-1]["event"] == "refusal"


def test_a_host_that_cannot_attest_is_one_line(owner: dict[str, Any]) -> None:
    from teefl.plan import load_plan
    from teefl.security.keys.client import fetch_sealing_key

    cert, key = key_client(owner["pki"])
    data = yaml.safe_load(owner["plan"].read_text())
    data["security"]["attestation"] = {"provider": "simulated"}  # without allow_simulated
    data["security"]["at_rest"] = {
        "mode": "sealed",
        "key_from": "127.0.0.1:1",
        "client_cert": str(cert),
        "client_key": str(key),
    }
    owner["plan"].write_text(yaml.safe_dump(data))
    with pytest.raises(KeyServiceError) as exc:
        fetch_sealing_key(load_plan(owner["plan"]), BINDING)
    assert "this host cannot attest to the key service" in str(exc.value)
    assert "simulated attestation is disabled" in str(exc.value) and "\n" not in str(exc.value)
