"""The private PKI (teefl.security.pki) and the ``teefl pki`` commands."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from teefl.errors import TeeflError
from teefl.plan import load_plan, plan_from_dict
from teefl.security import certificates, pki, plan_pki

NOW = dt.datetime.now(dt.UTC)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d)
    return d


# -- CA ----------------------------------------------------------------------------------------
def test_init_ca_writes_a_pathlen0_p384_ca_with_private_key_0600(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    cert_path = pki.init_ca(d)
    assert cert_path == d / "ca.crt"
    assert _mode(d / "ca.key") == 0o600
    cert = _cert(cert_path)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert certificates.common_name(cert).startswith("teefl CA ")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=3650)


def test_init_ca_rsa_3072(tmp_path: Path) -> None:
    cert = _cert(pki.init_ca(tmp_path, key_type="rsa", days=10))
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert cert.public_key().key_size == 3072
    # leaves follow the CA's key type by default
    leaf = _cert(pki.issue_collaborator(tmp_path, "col1"))
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_two_cas_have_distinct_names(tmp_path: Path) -> None:
    a = _cert(pki.init_ca(tmp_path / "a"))
    b = _cert(pki.init_ca(tmp_path / "b"))
    assert a.subject != b.subject


def test_private_key_is_created_0600_even_with_umask_0(tmp_path: Path, monkeypatch) -> None:
    """The key file must be 0600 from the moment it exists, not chmod-ed afterwards."""
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append((str(path), mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(certificates.os, "open", spy)
    old = os.umask(0)
    try:
        pki.init_ca(tmp_path)
        pki.issue_collaborator(tmp_path, "col1")
    finally:
        os.umask(old)
    key_opens = [m for p, m in opened if ".key." in p]
    assert key_opens == [0o600, 0o600]
    assert _mode(tmp_path / "ca.key") == 0o600
    assert _mode(tmp_path / "collaborators" / "col1.key") == 0o600
    assert _mode(tmp_path / "ca.crt") == 0o644
    assert not list(tmp_path.rglob("*.tmp"))


def test_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = (ca_dir / "ca.crt").read_bytes()
    with pytest.raises(TeeflError) as err:
        pki.init_ca(ca_dir)
    assert str(err.value) == f"{ca_dir / 'ca.crt'} already exists; pass --force to overwrite it"
    assert (ca_dir / "ca.crt").read_bytes() == before
    pki.init_ca(ca_dir, force=True)
    assert (ca_dir / "ca.crt").read_bytes() != before
    assert _mode(ca_dir / "ca.key") == 0o600


def test_refusal_checks_the_key_too(ca_dir: Path) -> None:
    """Half a pair (key left from before) is not silently replaced either."""
    pki.issue_collaborator(ca_dir, "col1")
    (ca_dir / "collaborators" / "col1.crt").unlink()
    with pytest.raises(TeeflError, match=r"col1\.key already exists; pass --force"):
        pki.issue_collaborator(ca_dir, "col1")


def test_bad_days_and_key_type(tmp_path: Path) -> None:
    with pytest.raises(TeeflError, match="--days must be positive"):
        pki.init_ca(tmp_path, days=0)
    with pytest.raises(TeeflError, match="unknown key type 'dsa'"):
        pki.init_ca(tmp_path, key_type="dsa")  # type: ignore[arg-type]
    assert not (tmp_path / "ca.key").exists()


# -- leaves ------------------------------------------------------------------------------------
def test_aggregator_certificate_sans_eku_and_signature(ca_dir: Path) -> None:
    path = pki.issue_aggregator(ca_dir, ["Agg.Example", "10.0.0.5", "::1", "10.0.0.5"], days=30)
    assert path == ca_dir / "aggregator.crt"
    assert _mode(ca_dir / "aggregator.key") == 0o600
    cert = _cert(path)
    assert certificates.sans(cert) == ["DNS:agg.example", "IP:10.0.0.5", "IP:::1"]
    assert certificates.ekus(cert) == ["serverAuth"]
    assert certificates.common_name(cert) == "Agg.Example"
    assert not certificates.is_ca(cert)
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)
    assert certificates.covers_host(cert, "agg.example") and certificates.covers_host(
        cert, "AGG.example."
    )
    assert certificates.covers_host(cert, "10.0.0.5") and certificates.covers_host(cert, "[::1]")
    assert not certificates.covers_host(cert, "127.0.0.1")
    assert not certificates.covers_host(cert, "other.example")


def test_aggregator_needs_a_valid_host(ca_dir: Path) -> None:
    with pytest.raises(TeeflError, match="at least one host"):
        pki.issue_aggregator(ca_dir, [" "])
    with pytest.raises(TeeflError, match="neither a host name nor an IP"):
        pki.issue_aggregator(ca_dir, ["http://x"])


def test_wildcard_san_matches_one_label(ca_dir: Path) -> None:
    cert = _cert(pki.issue_aggregator(ca_dir, ["*.fl.example"]))
    assert certificates.covers_host(cert, "agg.fl.example")
    assert not certificates.covers_host(cert, "fl.example")
    assert not certificates.covers_host(cert, "a.b.fl.example")


def test_collaborator_certificate(ca_dir: Path) -> None:
    path = pki.issue_collaborator(ca_dir, "col1")
    assert path == ca_dir / "collaborators" / "col1.crt"
    assert _mode(ca_dir / "collaborators" / "col1.key") == 0o600
    cert = _cert(path)
    assert certificates.common_name(cert) == "col1"
    assert certificates.ekus(cert) == ["clientAuth"]
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    )
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))


@pytest.mark.parametrize("name", ["../evil", "a b", "", "x" * 64])
def test_collaborator_name_is_checked(ca_dir: Path, name: str) -> None:
    with pytest.raises(TeeflError, match="must be 1-63 letters"):
        pki.issue_collaborator(ca_dir, name)


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(TeeflError, match=r"no CA in .*; create one with: teefl pki init"):
        pki.issue_collaborator(tmp_path, "col1")


def test_force_reissues_a_leaf(ca_dir: Path) -> None:
    first = pki.issue_collaborator(ca_dir, "col1").read_bytes()
    with pytest.raises(TeeflError, match="already exists; pass --force"):
        pki.issue_collaborator(ca_dir, "col1")
    assert pki.issue_collaborator(ca_dir, "col1", force=True).read_bytes() != first


# -- loading and checks ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_private_key_others_can_read_is_refused_with_the_fix(ca_dir: Path, mode: int) -> None:
    from teefl.security import tls

    pki.issue_aggregator(ca_dir, ["localhost"])
    key = ca_dir / "aggregator.key"
    key.chmod(mode)
    expected = (
        f"private key {key} is accessible by group or others (mode {mode:04o}); "
        f"run: chmod 600 {key}"
    )
    with pytest.raises(TeeflError) as err:
        certificates.load_private_key(key)
    assert str(err.value) == expected
    # where the aggregator loads it for its port, and where `teefl pki issue` loads the CA's
    with pytest.raises(TeeflError) as err:
        tls.server_credentials(ca_dir / "ca.crt", ca_dir / "aggregator.crt", key, True)
    assert str(err.value) == expected
    (ca_dir / "ca.key").chmod(0o644)
    with pytest.raises(TeeflError, match=r"ca\.key is accessible by group or others"):
        certificates.load_ca(ca_dir)
    key.chmod(0o600)
    certificates.load_private_key(key)


def test_key_not_matching_certificate(ca_dir: Path) -> None:
    c1, _ = certificates.collaborator_paths(ca_dir, "col1")
    _, k2 = certificates.collaborator_paths(ca_dir, "col2")
    pki.issue_collaborator(ca_dir, "col1")
    pki.issue_collaborator(ca_dir, "col2")
    with pytest.raises(TeeflError) as err:
        certificates.load_key_pair(c1, k2)
    assert str(err.value) == f"private key {k2} does not match certificate {c1}"


def test_missing_files_name_the_path(ca_dir: Path) -> None:
    pki.issue_collaborator(ca_dir, "col1")
    cert, key = certificates.collaborator_paths(ca_dir, "col1")
    key.unlink()
    with pytest.raises(TeeflError) as err:
        certificates.load_key_pair(cert, key)
    assert str(err.value) == f"private key file not found: {key}"
    with pytest.raises(TeeflError) as err:
        certificates.load_certificate(ca_dir / "nope.crt")
    assert str(err.value) == f"certificate file not found: {ca_dir / 'nope.crt'}"


def test_invalid_pem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("hello\n")
    with pytest.raises(TeeflError, match=r"bad\.pem is not a PEM certificate"):
        certificates.load_certificate(bad)
    with pytest.raises(TeeflError, match=r"bad\.pem is not a PEM private key"):
        certificates.load_private_key(bad)
    with pytest.raises(TeeflError, match="is a directory"):
        certificates.load_certificate(tmp_path)


def test_encrypted_key_is_refused_clearly(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TeeflError, match="is encrypted; teefl needs an unencrypted key"):
        certificates.load_private_key(path)


def test_check_certificate_validity_ca_and_purpose(tmp_path: Path) -> None:
    d, other = tmp_path / "a", tmp_path / "b"
    pki.init_ca(d)
    pki.init_ca(other)
    ca = d / "ca.crt"
    old = pki.issue_collaborator(d, "old", not_before=NOW - dt.timedelta(days=10), days=1)
    with pytest.raises(TeeflError) as err:
        certificates.check_certificate(old, ca_path=ca)
    expiry = certificates.format_time(_cert(old).not_valid_after_utc)
    assert str(err.value) == f"certificate {old} expired on {expiry}"

    future = pki.issue_collaborator(d, "future", not_before=NOW + dt.timedelta(days=1))
    with pytest.raises(TeeflError, match=r"future\.crt is not valid before \d{4}-\d\d-\d\d"):
        certificates.check_certificate(future, ca_path=ca)

    foreign = pki.issue_collaborator(other, "col1")
    with pytest.raises(TeeflError) as err:
        certificates.check_certificate(foreign, ca_path=ca)
    assert str(err.value).startswith(f"certificate {foreign} is not signed by CA {ca} (unknown CA")

    client = pki.issue_collaborator(d, "col1")
    certificates.check_certificate(client, ca_path=ca, purpose="client")
    with pytest.raises(TeeflError, match=r"is not a server certificate.*clientAuth"):
        certificates.check_certificate(client, ca_path=ca, purpose="server")
    with pytest.raises(TeeflError, match="is not a CA certificate"):
        certificates.check_certificate(client, ca_path=client)


def test_describe_certificate(ca_dir: Path) -> None:
    path = pki.issue_aggregator(ca_dir, ["agg.example", "10.1.2.3"])
    info = certificates.describe_certificate(path)
    cert = _cert(path)
    assert info["subject"] == "CN=agg.example,O=teefl"
    assert info["issuer"] == _cert(ca_dir / "ca.crt").subject.rfc4514_string()
    assert info["sans"] == ["DNS:agg.example", "IP:10.1.2.3"]
    assert info["eku"] == ["serverAuth"]
    assert info["key_type"] == "EC P-384"
    assert info["status"] == "valid"
    assert info["not_after"] == cert.not_valid_after_utc
    assert info["fingerprint_sha256"].replace(":", "").lower() == (
        cert.fingerprint(hashes.SHA256()).hex()
    )
    assert info["is_ca"] is False
    assert certificates.describe_certificate(ca_dir / "ca.crt")["is_ca"] is True


# -- plan --------------------------------------------------------------------------------------
def test_issue_for_plan_loopback_and_idempotent(tmp_path: Path) -> None:
    plan = plan_from_dict({"collaborators": ["a", "b"], "network": {"host": "127.0.0.1"}})
    d = tmp_path / "pki"
    res = plan_pki.issue_for_plan(plan, d)
    assert set(res.created) == {
        d / "ca.crt",
        d / "aggregator.crt",
        d / "collaborators" / "a.crt",
        d / "collaborators" / "b.crt",
    }
    sans = certificates.sans(_cert(res.server_cert))
    assert sans == ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    assert certificates.common_name(_cert(res.server_cert)) == "127.0.0.1"

    again = plan_pki.issue_for_plan(plan, d)
    assert again.created == [] and len(again.kept) == 4

    # a new collaborator: only its certificate is issued
    plan3 = plan_from_dict({"collaborators": ["a", "b", "c"], "network": {"host": "127.0.0.1"}})
    res3 = plan_pki.issue_for_plan(plan3, d)
    assert res3.created == [d / "collaborators" / "c.crt"]


def test_issue_for_plan_host_change_needs_force_and_keeps_ca(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    plan_pki.issue_for_plan(plan_from_dict({"collaborators": 1}), d)
    ca_before = (d / "ca.crt").read_bytes()
    moved = plan_from_dict({"collaborators": 1, "network": {"host": "agg.example"}})
    with pytest.raises(TeeflError, match=r"does not cover host 'agg\.example'; pass --force"):
        plan_pki.issue_for_plan(moved, d)
    res = plan_pki.issue_for_plan(moved, d, force=True)
    assert (d / "ca.crt").read_bytes() == ca_before
    assert certificates.sans(_cert(res.server_cert)) == ["DNS:agg.example"]


def test_security_yaml_loads_into_a_plan(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text("collaborators: 2\n")
    res = plan_pki.issue_for_plan(load_plan(plan_path), tmp_path / "pki")
    block = res.security_yaml(relative_to=tmp_path)
    assert "transport: mtls" in block and "ca: pki/ca.crt" in block
    plan_path.write_text("collaborators: 2\n" + block)
    plan = load_plan(plan_path)
    assert plan.security.transport == "mtls"
    assert plan.security.tls.ca == (tmp_path / "pki" / "ca.crt").resolve()
    assert plan.security.tls.server_key == (tmp_path / "pki" / "aggregator.key").resolve()
    assert (plan.security.tls.client_dir / "col2.key").exists()


# -- CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli():
    from teefl.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), env={"COLUMNS": "200"})

    return invoke


def test_cli_init_issue_show(cli, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = cli("pki", "init", str(d), "--days", "30")
    assert r.exit_code == 0, r.output
    assert "created CA" in r.output and "SHA-256" in r.output
    r = cli("pki", "issue", str(d), "--aggregator", "agg.example,10.0.0.7", "--collaborator", "c1")
    assert r.exit_code == 0, r.output
    assert (d / "collaborators" / "c1.key").exists()

    r = cli("pki", "show", str(d / "aggregator.crt"))
    assert r.exit_code == 0, r.output
    info = certificates.describe_certificate(d / "aggregator.crt")
    for text in (
        "CN=agg.example,O=teefl",
        "DNS:agg.example, IP:10.0.0.7",
        "serverAuth",
        "valid",
        "EC P-384",
        info["fingerprint_sha256"],
        certificates.format_time(info["not_after"]),
    ):
        assert text in r.output, (text, r.output)


def test_cli_refuses_overwrite_and_missing_file(cli, tmp_path: Path) -> None:
    assert cli("pki", "init", str(tmp_path)).exit_code == 0
    r = cli("pki", "init", str(tmp_path))
    assert r.exit_code != 0
    assert isinstance(r.exception, TeeflError)
    assert "already exists; pass --force" in str(r.exception)
    assert cli("pki", "init", str(tmp_path), "--force", "--key-type", "rsa").exit_code == 0

    r = cli("pki", "show", str(tmp_path / "missing.crt"))
    assert isinstance(r.exception, TeeflError)
    assert "certificate file not found" in str(r.exception)

    r = cli("pki", "issue", str(tmp_path))
    assert isinstance(r.exception, TeeflError)
    assert "nothing to issue" in str(r.exception)


def test_cli_plan_prints_security_block(cli, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text("collaborators: [alice, bob]\n")
    r = cli("pki", "plan", str(plan_path))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pki" / "collaborators" / "bob.crt").exists()
    block = r.output[r.output.index("security:") :].split("\n\n")[0]
    assert yaml.safe_load(block) == {
        "security": {
            "transport": "mtls",
            "tls": {
                "ca": "pki/ca.crt",
                "server_cert": "pki/aggregator.crt",
                "server_key": "pki/aggregator.key",
                "client_dir": "pki/collaborators",
            },
        }
    }
    r = cli("pki", "plan", str(plan_path), "--dir", str(tmp_path / "other"))
    assert r.exit_code == 0, r.output
    assert "ca: other/ca.crt" in r.output


def test_cli_issues_the_key_service_and_its_clients(cli, tmp_path: Path) -> None:
    """`teefl keys serve` needs a server certificate, and the aggregator (which has only a
    server certificate) a client certificate: both from the federation's CA, the client one
    apart from the collaborators'."""
    assert cli("pki", "init", str(tmp_path)).exit_code == 0
    r = cli(
        "pki", "issue", str(tmp_path), "--key-service", "keys.example", "--key-client", "aggregator"
    )
    assert r.exit_code == 0, r.output
    ca = tmp_path / "ca.crt"
    cert, key = certificates.aggregator_paths(tmp_path, certificates.KEY_SERVICE)
    server = certificates.check_certificate(cert, ca_path=ca, key_path=key, purpose="server")
    assert certificates.covers_host(server, "keys.example")
    cert, key = certificates.key_client_paths(tmp_path, "aggregator")
    assert cert.parent.name == "key-clients"
    client = certificates.check_certificate(cert, ca_path=ca, key_path=key, purpose="client")
    assert certificates.common_name(client) == "aggregator"
    assert certificates.ekus(client) == ["clientAuth"]
    assert not certificates.collaborator_paths(tmp_path, "aggregator")[0].exists()
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
