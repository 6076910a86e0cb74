"""Evidence providers against a fake configfs-tsm kernel, a fake Gramine tree and the simulator."""

from __future__ import annotations

import errno
import hashlib
import logging
from pathlib import Path

import pytest

from teefl.errors import TeeflError
from teefl.security.tee.detect import default_provider
from teefl.security.tee.evidence import (
    ConfigfsTsmProvider,
    Evidence,
    EvidenceError,
    EvidenceProvider,
    GramineProvider,
    TsmFs,
)
from teefl.security.tee.simulated import SimulatedProvider, simulated_key_fingerprint
from teefl.security.tee.verify import (
    AttestationError,
    Policy,
    SimulatedVerifier,
    check_policy,
    report_data_for,
    verify_evidence,
)

REPORT_DIR = Path("sys/kernel/config/tsm/report")


class FakeConfigfs(TsmFs):
    """In-memory configfs-tsm: mkdir creates the attribute files, inblob writes bump generation.

    ``race`` simulates another process writing our inblob between our write and our read.
    ``fail_outblob`` makes reading the quote fail like a kernel whose quoting service is down.
    """

    def __init__(self, root: Path, provider: str = "tdx_guest", *, race: bool = False) -> None:
        self.report_dir = root / REPORT_DIR
        self.provider = provider
        self.race = race
        self.fail_outblob = False
        self.requests: dict[Path, dict[str, bytes | int]] = {}
        self.created: list[Path] = []
        self.removed: list[Path] = []

    def exists(self, path: Path) -> bool:
        if path == self.report_dir:
            return True
        return path.parent in self.requests and path.name in (
            "inblob",
            "outblob",
            "provider",
            "generation",
        )

    def mkdir(self, path: Path) -> None:
        assert path.parent == self.report_dir
        if path in self.requests:
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        self.requests[path] = {"generation": 0, "inblob": b""}
        self.created.append(path)

    def rmdir(self, path: Path) -> None:
        del self.requests[path]
        self.removed.append(path)

    def write(self, path: Path, data: bytes) -> None:
        req = self.requests[path.parent]
        if path.name != "inblob":
            raise OSError(errno.EACCES, "read-only attribute")
        if len(data) > 64:
            raise OSError(errno.EINVAL, "Invalid argument")
        req["inblob"] = bytes(data)
        req["generation"] = int(req["generation"]) + 1

    def read(self, path: Path) -> bytes:
        req = self.requests[path.parent]
        if path.name == "generation":
            return f"{req['generation']}\n".encode()
        if path.name == "provider":
            return f"{self.provider}\n".encode()
        if path.name == "outblob":
            if self.fail_outblob:
                raise OSError(errno.EIO, "Input/output error")
            if self.race:  # someone else writes inblob in between
                req["inblob"] = b"\xff" * 64
                req["generation"] = int(req["generation"]) + 1
            inblob = bytes(req["inblob"])
            return b"FAKEQUOTE" + hashlib.sha256(inblob).digest() + inblob
        raise FileNotFoundError(errno.ENOENT, "no such attribute", str(path))


REPORT_DATA = bytes(range(64))


def test_configfs_tsm_quote_contains_report_data(tmp_path: Path) -> None:
    fs = FakeConfigfs(tmp_path)
    provider = ConfigfsTsmProvider(tmp_path, fs=fs)
    assert isinstance(provider, EvidenceProvider)
    ev = provider.get_evidence(REPORT_DATA)
    assert ev.kind == "tdx"
    assert ev.provider == "configfs-tsm/tdx_guest"
    assert ev.quote.endswith(REPORT_DATA) and ev.quote.startswith(b"FAKEQUOTE")
    assert ev.extra["generation"] == 1
    assert fs.requests == {} and fs.removed == fs.created and len(fs.created) == 1


def test_configfs_tsm_unique_directory_per_request(tmp_path: Path) -> None:
    fs = FakeConfigfs(tmp_path, provider="sev_guest")
    provider = ConfigfsTsmProvider(tmp_path, fs=fs)
    a = provider.get_evidence(REPORT_DATA)
    b = provider.get_evidence(bytes(64))
    assert a.kind == b.kind == "sev-snp"
    assert len(set(fs.created)) == 2
    assert fs.requests == {}


class FakeSevGuest(FakeConfigfs):
    """configfs-tsm with provider ``sev_guest``: outblob is an SEV-SNP report signed by the
    stand-in AMD chain over the inblob, auxblob the GHCB certificate table with that chain."""

    def __init__(self, root: Path, amd, table: bytes | None) -> None:
        super().__init__(root, provider="sev_guest")
        self.amd, self.table = amd, table
        self.key = None

    def exists(self, path: Path) -> bool:
        if path.name == "auxblob" and path.parent in self.requests:
            return self.table is not None
        return super().exists(path)

    def read(self, path: Path) -> bytes:
        req = self.requests[path.parent]
        if path.name == "outblob":
            from snputil import sign_report, synthetic_report

            return sign_report(synthetic_report(report_data=bytes(req["inblob"])), self.key)
        if path.name == "auxblob":
            assert self.table is not None
            return self.table
        return super().read(path)


def test_configfs_tsm_sev_guest_report_with_certificate_table(tmp_path: Path) -> None:
    """The SNP path end to end on a fake kernel: report + auxblob -> verified, bound, policed."""
    from datetime import UTC, datetime

    from snputil import FakeAmd, der, milan_fields, synthetic_report

    from teefl.security.tee.policy import enforce_policy, policy_block
    from teefl.security.tee.snp import build_cert_table
    from teefl.security.tee.snp.collateral import SnpCollateral

    amd = FakeAmd()
    vcek, key = amd.vcek(*milan_fields(synthetic_report()))
    table = build_cert_table([("vcek", der(vcek)), ("ask", der(amd.ask)), ("ark", der(amd.ark))])
    fs = FakeSevGuest(tmp_path, amd, table)
    fs.key = key
    ev = ConfigfsTsmProvider(tmp_path, fs=fs).get_evidence(REPORT_DATA)
    assert (ev.kind, ev.provider) == ("sev-snp", "configfs-tsm/sev_guest")
    assert ev.extra["auxblob"] == table and len(ev.quote) == 1184
    assert Evidence.from_dict(ev.to_dict()) == ev  # survives the wire (base64 in extra)
    assert fs.requests == {}
    when = datetime(2024, 6, 1, tzinfo=UTC)
    trusting = SnpCollateral(trusted_arks=amd.trusted)  # nothing but the guest's table
    verdict = verify_evidence(ev, now=when, snp_collateral=trusting)
    assert verdict.report_data == REPORT_DATA
    policy = Policy.model_validate(policy_block(verdict))
    enforce_policy(verdict, policy, REPORT_DATA, require_pinned=True)
    with pytest.raises(AttestationError, match="report data does not bind the TLS key"):
        enforce_policy(verdict, policy, bytes(64), require_pinned=True)
    # AMD's roots only (the default): the same table is a forger's chain
    with pytest.raises(AttestationError, match="not a trusted AMD root"):
        verify_evidence(ev, now=when)
    # a guest without a certificate table and a verifier without files: nothing to check with
    bare = FakeSevGuest(tmp_path, amd, None)
    bare.key = key
    ev = ConfigfsTsmProvider(tmp_path, fs=bare).get_evidence(REPORT_DATA)
    assert "auxblob" not in ev.extra
    with pytest.raises(AttestationError, match="no VCEK for this report"):
        verify_evidence(ev, now=when, snp_collateral=trusting)


def test_configfs_tsm_concurrent_user_detected(tmp_path: Path) -> None:
    fs = FakeConfigfs(tmp_path, race=True)
    with pytest.raises(EvidenceError, match="concurrent configfs-tsm user detected"):
        ConfigfsTsmProvider(tmp_path, fs=fs).get_evidence(REPORT_DATA)
    assert fs.requests == {}, "request directory must be removed on failure"


def test_configfs_tsm_oversize_inblob_refused(tmp_path: Path) -> None:
    fs = FakeConfigfs(tmp_path)
    provider = ConfigfsTsmProvider(tmp_path, fs=fs)
    with pytest.raises(EvidenceError, match="exactly 64 bytes"):
        provider.get_evidence(bytes(65))
    with pytest.raises(EvidenceError, match="exactly 64 bytes"):
        provider.get_evidence(bytes(63))
    assert fs.created == []  # refused before touching the kernel


def test_configfs_tsm_kernel_einval_is_reported_and_cleaned(tmp_path: Path) -> None:
    fs = FakeConfigfs(tmp_path)

    def bad_write(path: Path, data: bytes) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    fs.write = bad_write  # type: ignore[method-assign]
    with pytest.raises(EvidenceError, match="refused the report data"):
        ConfigfsTsmProvider(tmp_path, fs=fs).get_evidence(REPORT_DATA)
    assert fs.requests == {} and len(fs.removed) == 1


def test_configfs_tsm_outblob_failure_cleans_up(tmp_path: Path) -> None:
    fs = FakeConfigfs(tmp_path)
    fs.fail_outblob = True
    with pytest.raises(EvidenceError, match="produced no quote"):
        ConfigfsTsmProvider(tmp_path, fs=fs).get_evidence(REPORT_DATA)
    assert fs.requests == {}


def test_configfs_tsm_missing(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="configfs-tsm not available"):
        ConfigfsTsmProvider(tmp_path).get_evidence(REPORT_DATA)


def test_configfs_tsm_plain_files_real_fs(tmp_path: Path) -> None:
    """The default TsmFs on a plain directory: mkdir gives no attributes, and the directory is
    still removed after the failure."""
    (tmp_path / REPORT_DIR).mkdir(parents=True)
    with pytest.raises(EvidenceError):
        ConfigfsTsmProvider(tmp_path).get_evidence(REPORT_DATA)
    assert list((tmp_path / REPORT_DIR).iterdir()) == []


def make_gramine(root: Path, att_type: str | None, quote: bytes = b"SGXQUOTE") -> Path:
    att = root / "dev/attestation"
    att.mkdir(parents=True)
    if att_type is not None:
        (att / "attestation_type").write_text(att_type)
    (att / "quote").write_bytes(quote)
    return att


def test_gramine_provider_writes_report_data_and_reads_quote(tmp_path: Path) -> None:
    att = make_gramine(tmp_path, "dcap")
    ev = GramineProvider(tmp_path).get_evidence(REPORT_DATA)
    assert (att / "user_report_data").read_bytes() == REPORT_DATA
    assert ev == Evidence("sgx", b"SGXQUOTE", "gramine/dcap", {"attestation_type": "dcap"})


def test_gramine_provider_refuses_gramine_direct(tmp_path: Path) -> None:
    make_gramine(tmp_path, "none")
    with pytest.raises(EvidenceError, match="gramine-direct cannot"):
        GramineProvider(tmp_path).get_evidence(REPORT_DATA)


def test_gramine_provider_outside_gramine(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="not running inside Gramine"):
        GramineProvider(tmp_path).get_evidence(REPORT_DATA)


def test_gramine_provider_checks_size(tmp_path: Path) -> None:
    make_gramine(tmp_path, "dcap")
    with pytest.raises(EvidenceError, match="64 bytes"):
        GramineProvider(tmp_path).get_evidence(b"short")


def test_default_provider_choice(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="no attestation source"):
        default_provider(tmp_path)
    (tmp_path / REPORT_DIR).mkdir(parents=True)
    assert isinstance(default_provider(tmp_path), ConfigfsTsmProvider)
    make_gramine(tmp_path, "dcap")
    assert isinstance(default_provider(tmp_path), GramineProvider)


def test_evidence_dict_round_trip() -> None:
    ev = Evidence(
        "sev-snp", b"\x00\x01quote", "configfs-tsm/sev_guest", {"auxblob": b"certs", "n": 1}
    )
    assert Evidence.from_dict(ev.to_dict()) == ev


# ---------------------------------------------------------------------------------------------
# Simulated
# ---------------------------------------------------------------------------------------------


def test_simulated_refused_without_opt_in() -> None:
    with pytest.raises(TeeflError, match="simulated attestation is disabled"):
        SimulatedProvider()
    with pytest.raises(AttestationError, match="simulated attestation is disabled"):
        SimulatedVerifier()


def sim_policy(provider: SimulatedProvider, **over) -> Policy:
    """A policy pinning ``provider``'s key and the simulated measurements (what a plan must do)."""
    pins = {k: [v.hex()] for k, v in provider.measurements.items()}
    return Policy(
        allow_simulated=True,
        simulated_keys=[simulated_key_fingerprint(provider.public_key)],
        **{**pins, **over},
    )


def test_simulated_round_trip_with_binding(caplog: pytest.LogCaptureFixture) -> None:
    nonce = bytes(32)
    rd = report_data_for(b"fake spki", nonce, bytes(32))
    with caplog.at_level(logging.WARNING, logger="teefl.tee"):
        provider = SimulatedProvider(allow_simulated=True)
        verifier = SimulatedVerifier(allow_simulated=True, trusted_keys=[provider.public_key])
        ev = provider.get_evidence(rd)
        verdict = verify_evidence(ev, simulated_verifier=verifier)
    assert caplog.text.count("SIMULATED ATTESTATION IN USE") >= 4  # loud, on every use
    assert verdict.tee_type == "simulated" and verdict.report_data == rd
    assert verdict.details["signing_key_sha256"] == simulated_key_fingerprint(provider.key)
    assert check_policy(verdict, sim_policy(provider), rd, require_pinned=True) == []
    assert check_policy(verdict, Policy(), rd) == [
        "simulated evidence not accepted (policy allow_simulated is false)"
    ]
    assert check_policy(verdict, sim_policy(provider), bytes(64)) == [
        "report data does not bind the TLS key"
    ]


def test_unpinned_simulated_policy_refused() -> None:
    """allow_simulated without the keys and measurements it accepts is not a policy."""
    provider = SimulatedProvider(allow_simulated=True)
    with pytest.raises(ValueError, match=r"missing: simulated_keys .*, mrtd, rtmr0"):
        Policy(allow_simulated=True)
    fp = simulated_key_fingerprint(provider.public_key)
    with pytest.raises(ValueError, match="missing: rtmr0, rtmr1, rtmr2, rtmr3"):
        Policy(allow_simulated=True, simulated_keys=[fp], mrtd=["00" * 48])
    # evidence signed by any other simulated key is refused, whatever it carries
    other = SimulatedProvider(allow_simulated=True)
    verdict = SimulatedVerifier(allow_simulated=True).verify(other.get_evidence(REPORT_DATA).quote)
    failures = check_policy(verdict, sim_policy(provider), REPORT_DATA, require_pinned=True)
    assert failures == [
        f"simulated signing key {simulated_key_fingerprint(other.key)[:16]}… not in policy "
        "simulated_keys"
    ]


def test_simulated_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "sim.pem"
    SimulatedProvider(allow_simulated=True, key_file=key_file)
    key_file.chmod(0o644)
    with pytest.raises(TeeflError) as err:
        SimulatedProvider(allow_simulated=True, key_file=key_file)
    assert str(err.value) == (
        f"simulated attestation key {key_file} is accessible by group or others (mode 0644); "
        f"run: chmod 600 {key_file}"
    )


def test_simulated_tamper_and_untrusted_key(tmp_path: Path) -> None:
    key_file = tmp_path / "sim.pem"
    provider = SimulatedProvider(allow_simulated=True, key_file=key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    same = SimulatedProvider(allow_simulated=True, key_file=key_file)
    assert same.public_key.public_numbers() == provider.public_key.public_numbers()
    verifier = SimulatedVerifier(allow_simulated=True, trusted_keys=[provider.public_key])
    ev = provider.get_evidence(REPORT_DATA)
    bad = bytearray(ev.quote)
    bad[20] ^= 1
    with pytest.raises(AttestationError, match="signature invalid"):
        verifier.verify(bytes(bad))
    other = SimulatedProvider(allow_simulated=True)
    with pytest.raises(AttestationError, match="untrusted key"):
        verifier.verify(other.get_evidence(REPORT_DATA).quote)


def test_simulated_measurements_checked_by_policy() -> None:
    provider = SimulatedProvider(allow_simulated=True)
    verdict = SimulatedVerifier(allow_simulated=True).verify(
        provider.get_evidence(REPORT_DATA).quote
    )
    good = sim_policy(provider)
    assert check_policy(verdict, good, REPORT_DATA) == []
    wrong = sim_policy(provider, mrtd=["00" * 48])
    failures = check_policy(verdict, wrong, REPORT_DATA)
    assert len(failures) == 1 and failures[0].startswith("MRTD ") and "not in policy" in failures[0]


def test_verify_evidence_refuses_simulated_when_not_allowed() -> None:
    ev = SimulatedProvider(allow_simulated=True).get_evidence(REPORT_DATA)
    with pytest.raises(AttestationError, match="not allowed"):
        verify_evidence(ev)
