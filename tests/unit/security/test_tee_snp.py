"""AMD SEV-SNP verification with real AMD-signed reports (offline), and the SNP policy.

The samples live in ``../shared/testdata/attestation/snp`` beside the project root (see its
README and manifest.json); tests that need them skip when the folder is absent. What AMD did not
sign for us (a CRL that revokes an ASK, reports bound to our report data) comes from the stand-in
chain in ``snputil``, which is trusted only where a test says so.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from snputil import SNP, FakeAmd, der, milan_fields, sign_report, synthetic_report

from teefl.security.tee.evidence import Evidence
from teefl.security.tee.policy import Policy, check_policy, enforce_policy, policy_block
from teefl.security.tee.snp import (
    KdsClient,
    SnpChain,
    SnpCollateral,
    SnpPolicy,
    build_cert_table,
    looks_like_snp_report,
    parse_cert_table,
    parse_report,
    verify_report,
)
from teefl.security.tee.snp.certs import is_ark, load_certificates, load_crls, serial_number
from teefl.security.tee.verify import AttestationError, verify_evidence, verify_snp

needs_samples = pytest.mark.skipif(
    not (SNP / "manifest.json").is_file(), reason=f"SEV-SNP samples not found at {SNP}"
)


def manifest() -> dict[str, Any]:
    return json.loads((SNP / "manifest.json").read_text())


MANIFEST = manifest() if (SNP / "manifest.json").is_file() else {"reports": {}}
NAMES = sorted(MANIFEST["reports"]) or ["(no samples)"]
AT = datetime.fromisoformat(MANIFEST.get("verify_instant", "2025-09-01T00:00:00+00:00"))
FAKE_AT = datetime(2024, 6, 1, tzinfo=UTC)  # inside every window of the stand-in chain


def chain_of(path: str) -> tuple[x509.Certificate, x509.Certificate]:
    """(ASK or ASVK, ARK) of a cert_chain file, picked by what they are, not by position."""
    certs = load_certificates((SNP / path).read_bytes())
    ark = next(c for c in certs if is_ark(c))
    return next(c for c in certs if not is_ark(c)), ark


def all_crls() -> tuple[x509.CertificateRevocationList, ...]:
    return tuple(c for p in sorted((SNP / "crl").glob("*.pem")) for c in load_crls(p.read_bytes()))


def sample(name: str) -> tuple[bytes, SnpChain]:
    entry = MANIFEST["reports"][name]
    ask, ark = chain_of(entry["chain"])
    key_cert = load_certificates((SNP / entry["key_cert"]).read_bytes())[0]
    return (SNP / entry["report"]).read_bytes(), SnpChain(key_cert, ask, ark, all_crls())


def collateral_for(name: str) -> SnpCollateral:
    """What a plan names: the product's cert_chain file, the key certificate, both CRLs."""
    entry = MANIFEST["reports"][name]
    return SnpCollateral.from_files(
        [SNP / entry["chain"], SNP / entry["key_cert"]], sorted((SNP / "crl").glob("*.pem"))
    )


def flipped(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def pinned(verdict, **snp: Any) -> Policy:
    """The policy `teefl tee policy` prints for this verdict, with ``snp`` keys overridden."""
    block = policy_block(verdict)
    block["snp"].update(snp)
    return Policy.model_validate(block)


# ---------------------------------------------------------------------------------------------
# Every genuine report
# ---------------------------------------------------------------------------------------------

_TCB_NAMES = {
    "bl": "bootloader",
    "tee": "tee",
    "snp": "snp",
    "ucode": "microcode",
    "fmc": "fmc",
    "raw": "raw",
}


@needs_samples
@pytest.mark.parametrize("name", NAMES)
def test_every_report_verifies_with_the_manifest_fields(name: str) -> None:
    entry = MANIFEST["reports"][name]
    data, chain = sample(name)
    assert looks_like_snp_report(data)
    verified = verify_report(data, chain, AT)
    assert verified.product == entry["product"]
    assert verified.signer == entry["key_type"].lower()
    assert verified.crl_checked == (entry["product"] in ("Milan", "Genoa"))  # no Turin CRL here
    got = parse_report(data).to_dict(verified.product)
    want = entry["fields"]
    for key in (
        "version",
        "guest_svn",
        "policy",
        "vmpl",
        "signature_algo",
        "mask_chip_key",
        "author_key_en",
        "platform_info",
        "measurement",
        "report_data",
        "host_data",
        "chip_id",
        "id_key_digest",
        "family_id",
        "image_id",
        "current_version",
    ):
        assert got[key] == want[key], key
    assert got["signing_key"] == {0: "vcek", 1: "vlek"}[want["signing_key"]]
    assert got["debug"] == entry["debug_allowed"]
    for which in ("reported_tcb", "current_tcb", "committed_tcb", "launch_tcb"):
        assert got[which] == {_TCB_NAMES[k]: v for k, v in want[which].items()}, which
    if "cpuid_fam_id" in want:
        cpuid = got["cpuid"]
        assert (hex(cpuid["family"]), hex(cpuid["model"]), hex(cpuid["step"])) == (
            want["cpuid_fam_id"],
            want["cpuid_mod_id"],
            want["cpuid_step"],
        )


@needs_samples
@pytest.mark.parametrize("name", NAMES)
def test_every_report_verifies_from_plan_files_and_its_own_pins(name: str) -> None:
    """The federation's path: collateral found among plan files; the pinned policy accepts it
    (with its own report data as the binding) and `allow_debug` only where the guest is debug."""
    data, _ = sample(name)
    verdict = verify_snp(data, collateral_for(name), AT)
    assert verdict.tee_type == "sev-snp" and verdict.details["snp"]["crl_checked"] in (True, False)
    policy = pinned(verdict)
    assert policy.pinned_kinds() == ["sev-snp"]
    assert policy.allow_debug == MANIFEST["reports"][name]["debug_allowed"]
    assert check_policy(verdict, policy, verdict.report_data, require_pinned=True) == []


# ---------------------------------------------------------------------------------------------
# Refusals, each with its reason
# ---------------------------------------------------------------------------------------------


@needs_samples
def test_debug_report_refused_by_default_and_accepted_with_allow_debug() -> None:
    data, _ = sample("milan_gsg_debug")
    verdict = verify_snp(data, collateral_for("milan_gsg_debug"), AT)  # genuine: verifies
    strict = pinned(verdict)
    strict.allow_debug = False
    with pytest.raises(AttestationError, match=r"SNP guest policy 0xb0000 allows DEBUG"):
        enforce_policy(verdict, strict, verdict.report_data, require_pinned=True)
    strict.allow_debug = True
    enforce_policy(verdict, strict, verdict.report_data, require_pinned=True)
    # and an unpinned policy (only the defaults, as `teefl tee verify` without --policy) too
    assert check_policy(verdict, Policy(require_binding=False), None) == [
        "SNP guest policy 0xb0000 allows DEBUG: debug guests are refused (policy allow_debug is "
        "false)"
    ]


@needs_samples
def test_report_with_another_chips_vcek_refused() -> None:
    data, chain = sample("milan_gsg_debug")
    _, other = sample("milan_virtee")
    with pytest.raises(AttestationError, match=r"VCEK hwID d49554ec717f4e5b… is not the report's"):
        verify_report(data, SnpChain(other.key_cert, chain.ask, chain.ark), AT)
    # the same through collateral resolution: the only VCEK on offer is the wrong one
    wrong = SnpCollateral.from_files(
        [SNP / "chains/milan_ask_ark.pem", SNP / "reports/milan_virtee.vcek.der"]
    )
    with pytest.raises(AttestationError, match="another chip"):
        verify_snp(data, wrong, AT)


@needs_samples
def test_chain_of_another_product_refused() -> None:
    data, chain = sample("milan_virtee")
    genoa_ask, genoa_ark = chain_of("chains/genoa_ask_ark.pem")
    asvk, _ = chain_of("chains/milan_asvk_ark.pem")
    with pytest.raises(AttestationError, match="VCEK SEV-VCEK is issued by SEV-Milan, not by"):
        verify_report(data, SnpChain(chain.key_cert, genoa_ask, genoa_ark), AT)
    with pytest.raises(AttestationError, match="ASK SEV-Genoa is issued by ARK-Genoa, not by"):
        verify_report(data, SnpChain(chain.key_cert, genoa_ask, chain.ark), AT)
    with pytest.raises(
        AttestationError, match="VCEK SEV-VCEK is issued by SEV-Milan, not by SEV-V"
    ):
        verify_report(data, SnpChain(chain.key_cert, asvk, chain.ark), AT)
    # a chain file without the product's ASK: nothing to verify the VCEK with
    only_genoa = SnpCollateral.from_files(
        [SNP / "chains/genoa_ask_ark.pem", SNP / "reports/milan_virtee.vcek.der"]
    )
    with pytest.raises(AttestationError, match="no ASK SEV-Milan for the VCEK"):
        verify_snp(data, only_genoa, AT)


@needs_samples
@pytest.mark.parametrize(
    "offset",
    [0x50, 0x90, 0x08, 0x2A0, 0x2E8],
    ids=["report_data", "measurement", "policy", "r", "s"],
)
def test_flipped_bit_in_signed_region_or_signature_refused(offset: int) -> None:
    data, chain = sample("milan_virtee")
    with pytest.raises(AttestationError, match="report signature invalid"):
        verify_report(flipped(data, offset), chain, AT)


@needs_samples
def test_unsigned_tail_is_not_covered_but_not_read_either() -> None:
    """Bytes 0x330-0x49F are reserved and unsigned (AMD's format): a flip there verifies, and
    nothing the verdict reports comes from there."""
    data, chain = sample("milan_virtee")
    tampered = flipped(data, 0x400)
    verify_report(tampered, chain, AT)
    assert parse_report(tampered).to_dict() == parse_report(data).to_dict()


@needs_samples
def test_flipped_reported_tcb_refused_before_the_signature() -> None:
    data, chain = sample("milan_virtee")
    with pytest.raises(AttestationError, match=r"REPORTED_TCB .* is not the TCB the VCEK"):
        verify_report(flipped(data, 0x187), chain, AT)


@needs_samples
@pytest.mark.parametrize("forged", ["fake_vcek_raw_hwid.der", "fake_vcek_wrapped_hwid.der"])
def test_forged_vcek_refused(forged: str) -> None:
    data, chain = sample("milan_trustee")
    fake = load_certificates((SNP / "negative" / forged).read_bytes())[0]
    with pytest.raises(AttestationError, match="signature invalid: not signed by SEV-Milan"):
        verify_report(data, SnpChain(fake, chain.ask, chain.ark), AT)


@needs_samples
def test_expired_vlek_refused_at_todays_date() -> None:
    data, chain = sample("milan_aws_vlek")
    now = datetime.now(UTC)
    if now <= chain.key_cert.not_valid_after_utc:
        pytest.skip("the sample VLEK has not expired yet on this machine's clock")
    with pytest.raises(AttestationError, match=r"VLEK SEV-VLEK expired at 2025-12-10T22:14:21"):
        verify_report(data, SnpChain(chain.key_cert, chain.ask, chain.ark), now)


@needs_samples
def test_stale_crl_refused() -> None:
    data, chain = sample("genoa_oak")
    later = datetime(2025, 12, 1, tzinfo=UTC)  # Genoa CRL's nextUpdate is 2025-11-03
    with pytest.raises(AttestationError, match="CRL of ARK-Genoa is stale"):
        verify_report(data, chain, later)


@needs_samples
def test_genuine_genoa_crl_revokes_an_older_ask_not_ours() -> None:
    crl = next(c for c in all_crls() if "Genoa" in c.issuer.rfc4514_string())
    ask, _ = chain_of("chains/genoa_ask_ark.pem")
    assert crl.get_revoked_certificate_by_serial_number(0x20001) is not None
    assert serial_number(ask) == 0x20002
    assert crl.get_revoked_certificate_by_serial_number(0x20002) is None
    verify_report(*sample("genoa_azure"), AT)  # the CRL is checked and passes


def test_revoked_ask_and_vcek_refused() -> None:
    amd = FakeAmd()
    report = synthetic_report()
    chip, tcb = milan_fields(report)
    vcek, key = amd.vcek(chip, tcb)
    signed = sign_report(report, key)
    ok = SnpChain(vcek, amd.ask, amd.ark, (amd.crl([]),))
    verify_report(signed, ok, FAKE_AT, trusted_arks=amd.trusted)
    with pytest.raises(AttestationError, match=r"ASK SEV-Milan \(serial 0x10001\) is revoked"):
        chain = SnpChain(vcek, amd.ask, amd.ark, (amd.crl([0x10001]),))
        verify_report(signed, chain, FAKE_AT, trusted_arks=amd.trusted)
    with pytest.raises(AttestationError, match=r"VCEK SEV-VCEK \(serial 0x1\) is revoked"):
        chain = SnpChain(vcek, amd.ask, amd.ark, (amd.crl([1]),))
        verify_report(signed, chain, FAKE_AT, trusted_arks=amd.trusted)
    # a CRL that names the ARK but is signed by someone else
    forger = FakeAmd()
    with pytest.raises(AttestationError, match="CRL signature invalid: not signed by ARK-Milan"):
        chain = SnpChain(vcek, amd.ask, amd.ark, (forger.crl([]),))
        verify_report(signed, chain, FAKE_AT, trusted_arks=amd.trusted)
    with pytest.raises(AttestationError, match="no CRL of ARK-Milan given"):
        chain = SnpChain(vcek, amd.ask, amd.ark)
        verify_report(signed, chain, FAKE_AT, trusted_arks=amd.trusted, require_crl=True)


def test_self_made_chain_is_not_an_amd_root() -> None:
    """A forger holding a complete chain of its own (ARK named ARK-Milan) is refused."""
    amd = FakeAmd()
    report = synthetic_report()
    vcek, key = amd.vcek(*milan_fields(report))
    with pytest.raises(AttestationError, match=r"ARK ARK-Milan .* is not a trusted AMD root"):
        verify_report(sign_report(report, key), SnpChain(vcek, amd.ask, amd.ark), FAKE_AT)


# ---------------------------------------------------------------------------------------------
# The SNP policy
# ---------------------------------------------------------------------------------------------


@needs_samples
def test_tcb_below_the_policys_minimum_refused() -> None:
    data, _ = sample("milan_virtee")
    verdict = verify_snp(data, collateral_for("milan_virtee"), AT)
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    enforce_policy(verdict, pinned(verdict, min_tcb=tcb), verdict.report_data, require_pinned=True)
    higher = pinned(verdict, min_tcb={**tcb, "microcode": 116, "snp": 9})
    failures = check_policy(verdict, higher, verdict.report_data, require_pinned=True)
    assert failures == [
        "SNP TCB snp 8 below the policy's minimum 9",
        "SNP TCB microcode 115 below the policy's minimum 116",
    ]


@needs_samples
def test_reported_tcb_not_current_tcb_is_judged() -> None:
    """milan_trustee runs microcode 206 but reports 115 (the VCEK's): the minimum is judged
    against what the key vouches for."""
    data, _ = sample("milan_trustee")
    verdict = verify_snp(data, collateral_for("milan_trustee"), AT)
    assert verdict.details["snp"]["current_tcb"]["microcode"] == 206
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 200}
    with pytest.raises(AttestationError, match="SNP TCB microcode 115 below"):
        enforce_policy(verdict, pinned(verdict, min_tcb=tcb), verdict.report_data)


@needs_samples
def test_each_snp_policy_key_names_its_check() -> None:
    data, _ = sample("milan_aws_vlek")  # VMPL 1, VLEK-signed, SMT on
    verdict = verify_snp(data, collateral_for("milan_aws_vlek"), AT)
    rd = verdict.report_data
    cases = {
        "measurement": (["00" * 48], "SNP MEASUREMENT 8922ebbdd00ec2c5… not in policy"),
        "host_data": (["11" * 32], "SNP HOST_DATA 0000000000000000… not in policy"),
        "id_key_digest": (["22" * 48], "SNP ID_KEY_DIGEST 0000000000000000… not in policy"),
        "author_key_digest": (["33" * 48], "SNP AUTHOR_KEY_DIGEST 0000000000000000… not in"),
        "vmpl": ([0], "SNP VMPL 1 not in policy [0]"),
        "allow_smt": (False, "SMT is enabled on the platform (PLATFORM_INFO 0x27)"),
        "signers": (["vcek"], "SNP report signed by a VLEK, not allowed"),
        "min_guest_svn": (1, "SNP GUEST_SVN 0 below minimum 1"),
    }
    assert check_policy(verdict, pinned(verdict), rd, require_pinned=True) == []
    for key, (value, message) in cases.items():
        failures = check_policy(verdict, pinned(verdict, **{key: value}), rd, require_pinned=True)
        assert len(failures) == 1 and failures[0].startswith(message), (key, failures)
    with pytest.raises(AttestationError, match="report data does not bind the TLS key"):
        enforce_policy(verdict, pinned(verdict), bytes(64))


def test_migration_agent_refused_unless_allowed() -> None:
    amd = FakeAmd()
    report = synthetic_report(policy=0x30000 | (1 << 18))
    vcek, key = amd.vcek(*milan_fields(report))
    collateral = SnpCollateral([amd.ark, amd.ask, vcek], trusted_arks=amd.trusted)
    verdict = verify_snp(sign_report(report, key), collateral, FAKE_AT)
    policy = pinned(verdict)
    assert check_policy(verdict, policy, bytes(64)) == [
        "SNP guest policy 0x70000 allows a migration agent (MIGRATE_MA)"
    ]
    assert check_policy(verdict, pinned(verdict, allow_migration_agent=True), bytes(64)) == []


def test_snp_policy_pins_and_validation() -> None:
    assert Policy(snp={"measurement": ["00" * 48]}).pinned_kinds() == []
    assert Policy(snp={"measurement": ["00" * 48]}).missing_pins("sev-snp") == ["snp.min_tcb"]
    full = {
        "measurement": ["00" * 48],
        "min_tcb": {"bootloader": 1, "tee": 0, "snp": 1, "microcode": 1},
    }
    assert Policy(snp=full).pinned_kinds() == ["sev-snp"]
    with pytest.raises(ValueError, match="48 bytes"):
        SnpPolicy(measurement=["00"])
    with pytest.raises(ValueError, match="signers"):
        SnpPolicy(signers=["ask"])
    with pytest.raises(ValueError, match="extra"):
        SnpPolicy(min_tcb={"bootloader": 1, "tee": 0, "snp": 1, "microcode": 1, "ucode": 2})


# ---------------------------------------------------------------------------------------------
# Where the certificates come from: the guest's table, AMD KDS
# ---------------------------------------------------------------------------------------------


@needs_samples
def test_guest_certificate_table_is_used() -> None:
    data, chain = sample("milan_virtee")
    table = build_cert_table(
        [("vcek", der(chain.key_cert)), ("ask", der(chain.ask)), ("ark", der(chain.ark))]
    )
    assert [k for k, _ in parse_cert_table(table)] == ["vcek", "ask", "ark"]
    ev = Evidence("sev-snp", data, "configfs-tsm/sev_guest", {"auxblob": table})
    verdict = verify_evidence(ev, now=AT)  # no plan files at all: the guest carried the chain
    assert verdict.details["snp"]["signer"] == "vcek"
    assert verdict.report_data == data[0x50:0x90]
    # an entry the host filled with garbage is skipped; the rest of the table still counts
    messy = build_cert_table(
        [("ask", b"not a certificate"), ("vcek", der(chain.key_cert)), ("ask", der(chain.ask))]
    )
    ark_file = SnpCollateral([chain.ark])
    ev = Evidence("sev-snp", data, "configfs-tsm/sev_guest", {"auxblob": messy})
    assert verify_evidence(ev, now=AT, snp_collateral=ark_file).details["snp"]["signer"] == "vcek"
    # a table whose ARK is a forger's is worth nothing
    amd = FakeAmd()
    vcek, key = amd.vcek(*milan_fields(data))
    forged = build_cert_table([("vcek", der(vcek)), ("ask", der(amd.ask)), ("ark", der(amd.ark))])
    forged_ev = Evidence(
        "sev-snp", sign_report(data, key), "configfs-tsm/sev_guest", {"auxblob": forged}
    )
    with pytest.raises(AttestationError, match="not a trusted AMD root"):
        verify_evidence(forged_ev, now=FAKE_AT)


def test_certificate_table_malformed() -> None:
    with pytest.raises(AttestationError, match="truncated"):
        parse_cert_table(b"\x01" * 20)
    empty_slot = build_cert_table([("vcek", b"")])  # a slot the host left empty is skipped
    assert parse_cert_table(empty_slot) == []
    bad = bytearray(build_cert_table([("vcek", b"x" * 10)]))
    bad[16:20] = (4096).to_bytes(4, "little")
    with pytest.raises(AttestationError, match="points outside the table"):
        parse_cert_table(bytes(bad))


class FakeKds:
    """AMD KDS over a dict; counts calls so tests see the cache work."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers, self.calls = answers, []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        if url not in self.answers:
            raise AttestationError(f"AMD KDS fetch {url} failed: HTTP 404")
        return self.answers[url]


@needs_samples
def test_kds_fetch_is_cached(tmp_path: Path) -> None:
    data, chain = sample("milan_virtee")
    hwid = data[0x1A0:0x1E0].hex()
    base = "https://kdsintf.amd.com/vcek/v1/Milan"
    vcek_url = f"{base}/{hwid}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115"
    kds = FakeKds(
        {
            vcek_url: der(chain.key_cert),
            f"{base}/cert_chain": (SNP / "chains/milan_ask_ark.pem").read_bytes(),
            f"{base}/crl": (SNP / "crl/milan_vcek.crl.pem").read_bytes(),
        }
    )
    collateral = SnpCollateral(kds=KdsClient(tmp_path / "kds", kds))
    verdict = verify_snp(data, collateral, AT)
    assert verdict.details["snp"]["crl_checked"] is True
    assert sorted(kds.calls) == sorted(kds.answers)
    offline = FakeKds({})
    again = SnpCollateral(kds=KdsClient(tmp_path / "kds", offline))
    verify_snp(data, again, AT)
    assert offline.calls == []  # everything came from the cache
    # a cached CRL past its nextUpdate is fetched again (here: KDS has nothing fresher)
    with pytest.raises(AttestationError, match="crl failed: HTTP 404"):
        verify_snp(data, again, datetime(2026, 6, 1, tzinfo=UTC))
    assert offline.calls == [f"{base}/crl"]


@needs_samples
def test_kds_url_for_turin_uses_fmc_and_the_8_byte_hwid(tmp_path: Path) -> None:
    data, _ = sample("turin_oak")
    kds = FakeKds({})
    client = KdsClient(tmp_path, kds)
    with pytest.raises(AttestationError, match="HTTP 404"):
        client.vcek("Turin", parse_report(data))
    assert kds.calls == [
        "https://kdsintf.amd.com/vcek/v1/Turin/3b42092f69c656d3"
        "?fmcSPL=00&blSPL=01&teeSPL=00&snpSPL=02&ucodeSPL=71"
    ]


def test_kds_default_transport_refuses_other_hosts(tmp_path: Path) -> None:
    from teefl.security.tee.snp.collateral import _https_get

    with pytest.raises(AttestationError, match="refusing to fetch"):
        _https_get("https://example.org/vcek/v1/Milan/cert_chain")
    # a product name read from an unverified certificate never reaches a URL or a cache path
    kds = FakeKds({})
    with pytest.raises(AttestationError, match=r"unknown product '\.\./\.\./x'"):
        KdsClient(tmp_path, kds).chain("../../x")
    assert kds.calls == [] and list(tmp_path.iterdir()) == []


@needs_samples
def test_missing_collateral_says_what_to_give() -> None:
    data, _ = sample("milan_virtee")
    with pytest.raises(AttestationError, match="no VCEK for this report: give it in"):
        verify_snp(data, SnpCollateral(), AT)
    vlek, _ = sample("milan_aws_vlek")
    with pytest.raises(AttestationError, match="VLEKs are not on AMD's public KDS"):
        verify_snp(vlek, SnpCollateral(), AT)


def test_report_format_refusals() -> None:
    with pytest.raises(AttestationError, match="must be 1184 bytes"):
        parse_report(bytes(100))
    assert not looks_like_snp_report(b"\x04\x00\x02\x00" + bytes(1180))  # a DCAP v4 quote head
    bad = bytearray(synthetic_report())
    bad[0x34] = 2
    amd = FakeAmd()
    vcek, _ = amd.vcek(*milan_fields(bytes(bad)))
    with pytest.raises(AttestationError, match="SIGNATURE_ALGO 2 is not 1"):
        verify_report(bytes(bad), SnpChain(vcek, amd.ask, amd.ark), FAKE_AT)
