"""Quote verification and policy with real Intel-signed SGX and TDX quotes (offline).

The samples live in ``../shared/testdata/attestation`` beside the project root (see its README);
tests that need them skip when the folder is absent.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from paths import REPO

from teefl.security.tee.quote import parse_quote_fields
from teefl.security.tee.verify import (
    AttestationError,
    Policy,
    QuoteVerdict,
    check_policy,
    enforce_policy,
    report_data_for,
    spki_der_of,
    verify_quote,
)

ROOT = REPO
DATA = ROOT.parent / "shared" / "testdata" / "attestation"
IN_WINDOW = datetime(2025, 7, 1, tzinfo=UTC)

needs_samples = pytest.mark.skipif(
    not (DATA / "tdx_quote").is_file(), reason=f"attestation samples not found at {DATA}"
)


def sample(name: str) -> tuple[bytes, str]:
    return (DATA / f"{name}_quote").read_bytes(), (
        DATA / f"{name}_quote_collateral.json"
    ).read_text()


@pytest.fixture(scope="module")
def tdx() -> tuple[bytes, str, QuoteVerdict]:
    if not (DATA / "tdx_quote").is_file():
        pytest.skip(f"attestation samples not found at {DATA}")
    quote, coll = sample("tdx")
    return quote, coll, verify_quote(quote, coll, None, IN_WINDOW)


@pytest.fixture(scope="module")
def sgx() -> tuple[bytes, str, QuoteVerdict]:
    if not (DATA / "sgx_quote").is_file():
        pytest.skip(f"attestation samples not found at {DATA}")
    quote, coll = sample("sgx")
    return quote, coll, verify_quote(quote, coll, None, IN_WINDOW)


def fresh_tls_spki() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aggregator")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2025, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2035, 1, 1, tzinfo=UTC))
        .sign(key, hashes.SHA256())
    )
    spki = spki_der_of(cert)
    assert spki == spki_der_of(key) == spki_der_of(cert.public_bytes(Encoding.PEM))
    return spki


# ---------------------------------------------------------------------------------------------
# Binding
# ---------------------------------------------------------------------------------------------


def test_report_data_for_is_sha512_of_spki_nonce_and_binding() -> None:
    spki, nonce, binding = b"spki-der", bytes(range(32)), bytes(range(32, 64))
    rd = report_data_for(spki, nonce, binding)
    assert len(rd) == 64
    assert rd == hashlib.sha512(spki + nonce + binding).digest()
    assert rd != report_data_for(spki, bytes(32), binding)
    assert rd != report_data_for(spki, nonce, bytes(32))  # another plan or CA
    with pytest.raises(AttestationError, match="32 bytes"):
        report_data_for(spki, b"short", binding)
    with pytest.raises(AttestationError, match="binding must be 32 bytes"):
        report_data_for(spki, nonce, b"")


# ---------------------------------------------------------------------------------------------
# Parsing (no signature check)
# ---------------------------------------------------------------------------------------------


@needs_samples
def test_parse_tdx_fields() -> None:
    quote, _ = sample("tdx")
    f = parse_quote_fields(quote)
    assert (f.version, f.tee_type, f.attestation_key_type) == (4, "tdx", 2)
    assert f.report_data == quote[568:632]
    assert f.report_data.hex().startswith("9a9d48e7f6799642d3d1b34e1e5e1742")
    assert f.measurements["mrtd"] == quote[184:232].hex()
    assert set(f.measurements) >= {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam"}
    assert f.measurements["rtmr3"] == "00" * 48


@needs_samples
def test_parse_sgx_fields() -> None:
    quote, _ = sample("sgx")
    f = parse_quote_fields(quote)
    assert (f.version, f.tee_type) == (3, "sgx")
    assert f.report_data == quote[368:432]
    assert f.report_data.startswith(b"Hello, world!")
    assert f.measurements["mrenclave"] == quote[112:144].hex()
    assert f.measurements["mrsigner"] == quote[176:208].hex()
    assert (f.isv_prod_id, f.isv_svn) == (0, 0)


def test_parse_rejects_garbage() -> None:
    with pytest.raises(AttestationError, match="truncated"):
        parse_quote_fields(b"\x04\x00")
    with pytest.raises(AttestationError, match="unsupported quote version"):
        parse_quote_fields(b"\x09\x00" + bytes(700))
    with pytest.raises(AttestationError, match="truncated"):
        parse_quote_fields(b"\x04\x00\x02\x00\x81\x00\x00\x00" + bytes(100))


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def test_tdx_verifies_up_to_date(tdx: tuple[bytes, str, QuoteVerdict]) -> None:
    _, _, verdict = tdx
    assert verdict.tee_type == "tdx" and verdict.quote_version == 4
    assert verdict.status == "UpToDate"
    assert verdict.advisory_ids == ()
    assert verdict.report_data.hex().startswith("9a9d48e7f6799642d3d1b34e1e5e1742")
    d = verdict.to_dict()
    assert d["status"] == "UpToDate" and d["measurements"]["mrtd"]


def test_sgx_verifies_with_advisories(sgx: tuple[bytes, str, QuoteVerdict]) -> None:
    _, _, verdict = sgx
    assert verdict.tee_type == "sgx" and verdict.quote_version == 3
    assert verdict.status == "ConfigurationAndSWHardeningNeeded"
    assert set(verdict.advisory_ids) == {"INTEL-SA-00289", "INTEL-SA-00615"}
    assert verdict.report_data.startswith(b"Hello, world!")


@pytest.mark.parametrize("name", ["tdx", "sgx"])
@needs_samples
def test_one_bit_flip_refused(name: str) -> None:
    quote, coll = sample(name)
    bad = bytearray(quote)
    bad[600] ^= 0x01
    with pytest.raises(AttestationError, match="quote signature invalid"):
        verify_quote(bytes(bad), coll, None, IN_WINDOW)


@pytest.mark.parametrize("name", ["tdx", "sgx"])
@needs_samples
def test_expired_collateral_refused(name: str) -> None:
    quote, coll = sample(name)
    with pytest.raises(AttestationError, match="collateral expired"):
        verify_quote(quote, coll, None, datetime.now(UTC))
    with pytest.raises(AttestationError, match="collateral expired"):
        verify_quote(quote, coll, None, datetime(2025, 7, 20, tzinfo=UTC))


@needs_samples
def test_bad_inputs_refused() -> None:
    quote, coll = sample("tdx")
    with pytest.raises(AttestationError, match="collateral invalid"):
        verify_quote(quote, "{not json", None, IN_WINDOW)
    with pytest.raises(AttestationError, match="no collateral"):
        verify_quote(quote, None, None, IN_WINDOW)
    with pytest.raises(AttestationError, match="timezone-aware"):
        verify_quote(quote, coll, None, datetime(2025, 7, 1))
    _, sgx_coll = sample("sgx")
    with pytest.raises(AttestationError):
        verify_quote(quote, sgx_coll, None, IN_WINDOW)  # collateral of another platform


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------


def test_binding_refuses_both_quotes_for_our_tls_key(
    tdx: tuple[bytes, str, QuoteVerdict], sgx: tuple[bytes, str, QuoteVerdict]
) -> None:
    expected = report_data_for(fresh_tls_spki(), bytes(32), bytes(32))
    accept_all = Policy(accepted_tcb_statuses=["UpToDate", "ConfigurationAndSWHardeningNeeded"])
    for _, _, verdict in (tdx, sgx):
        assert check_policy(verdict, accept_all, expected) == [
            "report data does not bind the TLS key"
        ]
        with pytest.raises(AttestationError, match="report data does not bind the TLS key"):
            enforce_policy(verdict, accept_all, expected)


def test_binding_accepts_matching_report_data(tdx: tuple[bytes, str, QuoteVerdict]) -> None:
    _, _, verdict = tdx
    assert check_policy(verdict, Policy(), verdict.report_data) == []
    assert check_policy(verdict, Policy(), None) == [
        "report data binding required but no expected value was given"
    ]
    assert check_policy(verdict, Policy(require_binding=False), None) == []


def test_wrong_mrtd_refused(tdx: tuple[bytes, str, QuoteVerdict]) -> None:
    _, _, verdict = tdx
    right = Policy(mrtd=[verdict.measurements["mrtd"]], require_binding=False)
    assert check_policy(verdict, right, None) == []
    wrong = Policy(mrtd=["ab" * 48], require_binding=False)
    with pytest.raises(AttestationError, match=r"MRTD 91eb2b44d141d4ec… not in policy"):
        enforce_policy(verdict, wrong, None)
    rtmr = Policy(rtmr0=["00" * 48], require_binding=False)
    assert check_policy(verdict, rtmr, None)[0].startswith("RTMR0 ")


def test_wrong_mrenclave_refused(sgx: tuple[bytes, str, QuoteVerdict]) -> None:
    _, _, verdict = sgx
    base = {
        "accepted_tcb_statuses": ["ConfigurationAndSWHardeningNeeded"],
        "require_binding": False,
    }
    ok = Policy(
        mrenclave=[verdict.measurements["mrenclave"]],
        mrsigner=["0x" + verdict.measurements["mrsigner"].upper()],
        min_isv_svn=0,
        **base,
    )
    assert check_policy(verdict, ok, None) == []
    wrong = Policy(mrenclave=["11" * 32], **base)
    with pytest.raises(AttestationError, match="MRENCLAVE 33d8736db756ed49… not in policy"):
        enforce_policy(verdict, wrong, None)
    svn = Policy(min_isv_svn=1, **base)
    assert check_policy(verdict, svn, None) == ["ISV SVN 0 below minimum 1"]
    # an SGX-only policy must not accept a quote of another kind
    assert "MRENCLAVE required by policy" in " ".join(
        check_policy(
            QuoteVerdict("tdx", 4, "UpToDate", (), bytes(64), {"mrtd": "00" * 48}),
            Policy(mrenclave=["11" * 32], require_binding=False),
            None,
        )
    )


def test_default_policy_refuses_sgx_tcb_status(sgx: tuple[bytes, str, QuoteVerdict]) -> None:
    _, _, verdict = sgx
    failures = check_policy(verdict, Policy(require_binding=False), None)
    assert len(failures) == 1
    assert failures[0].startswith("TCB status ConfigurationAndSWHardeningNeeded not accepted")
    with pytest.raises(AttestationError, match="TCB status ConfigurationAndSWHardeningNeeded"):
        enforce_policy(verdict, Policy(require_binding=False), None)
    relaxed = Policy(
        accepted_tcb_statuses=["UpToDate", "ConfigurationAndSWHardeningNeeded"],
        require_binding=False,
    )
    assert check_policy(verdict, relaxed, None) == []


def test_default_policy_accepts_tdx_status(tdx: tuple[bytes, str, QuoteVerdict]) -> None:
    _, _, verdict = tdx
    assert check_policy(verdict, Policy(require_binding=False), None) == []


def test_policy_model_validation() -> None:
    with pytest.raises(ValueError, match="extra"):
        Policy.model_validate({"accepted_tcb_status": ["UpToDate"]})  # typo: forbidden
    with pytest.raises(ValueError, match="48 bytes"):
        Policy(mrtd=["abcd"])
    with pytest.raises(ValueError, match="32 bytes"):
        Policy(mrenclave=["zz" * 32])
    assert Policy().accepted_tcb_statuses == ["UpToDate"] and Policy().require_binding
