"""TEE detection against fake device trees (no TEE hardware needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from teefl.errors import TeeflError
from teefl.security.tee.detect import LABEL_PRECEDENCE, detect_tee

PLAIN_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov avx2"


def make_tree(
    root: Path,
    *,
    flags: str = PLAIN_FLAGS,
    files: tuple[str, ...] = (),
    texts: dict[str, str] | None = None,
    dirs: tuple[str, ...] = (),
) -> Path:
    """A fake / with /proc/cpuinfo (two CPUs) and the given device files and directories."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    cpu = "processor\t: {n}\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\n"
    (root / "proc/cpuinfo").write_text(cpu.format(n=0, flags=flags) + cpu.format(n=1, flags=flags))
    for rel in files:
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    for rel, text in (texts or {}).items():
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for rel in dirs:
        (root / rel.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return root


TSM = "/sys/kernel/config/tsm/report"


def test_plain_host_is_none(tmp_path: Path) -> None:
    info = detect_tee(make_tree(tmp_path))
    assert info.label == "none"
    assert info.source == "detected"
    assert info.evidence == []
    assert info.contradictions == ()
    d = info.to_dict()
    assert d["label"] == "none" and d["findings"] == []


def test_empty_root_is_none(tmp_path: Path) -> None:
    assert detect_tee(tmp_path).label == "none"


def test_sgx_capable_host(tmp_path: Path) -> None:
    root = make_tree(tmp_path, flags=PLAIN_FLAGS + " sgx sgx_lc", files=("/dev/sgx_enclave",))
    info = detect_tee(root)
    assert info.label == "sgx-host"
    assert info.sgx_host
    assert "file /dev/sgx_enclave exists" in info.evidence
    assert "cpuinfo flag sgx" in info.evidence


def test_tdx_guest_all_markers(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        flags=PLAIN_FLAGS + " tdx_guest",
        files=("/dev/tdx_guest",),
        texts={f"{TSM}/existing/provider": "tdx_guest\n"},
    )
    info = detect_tee(root)
    assert info.label == "tdx"
    assert info.ambient == "tdx"
    assert set(info.evidence) == {
        "cpuinfo flag tdx_guest",
        "file /dev/tdx_guest exists",
        "configfs-tsm provider tdx_guest",
    }
    assert info.tsm_providers == ("tdx_guest",)


def test_tdx_from_cpuinfo_only(tmp_path: Path) -> None:
    info = detect_tee(make_tree(tmp_path, flags=PLAIN_FLAGS + " tdx_guest"))
    assert info.label == "tdx"
    assert info.evidence == ["cpuinfo flag tdx_guest"]


def test_sev_snp_guest(tmp_path: Path) -> None:
    root = make_tree(tmp_path, files=("/dev/sev-guest",), texts={f"{TSM}/r1/provider": "sev_guest"})
    info = detect_tee(root)
    assert info.label == "sev-snp"
    assert "file /dev/sev-guest exists" in info.evidence
    assert "configfs-tsm provider sev_guest" in info.evidence


def test_sev_snp_cpu_flag_alone_is_a_host_note(tmp_path: Path) -> None:
    info = detect_tee(make_tree(tmp_path, flags=PLAIN_FLAGS + " sev sev_es sev_snp"))
    assert info.label == "none"
    assert any("sev_snp" in n for n in info.notes)


def test_gramine_direct_without_attestation_type(tmp_path: Path) -> None:
    info = detect_tee(make_tree(tmp_path, dirs=("/dev/attestation",)))
    assert info.label == "gramine-direct"
    assert info.isolation == "gramine-direct"
    assert "file /dev/attestation exists" in info.evidence


def test_gramine_direct_attestation_type_none(tmp_path: Path) -> None:
    info = detect_tee(make_tree(tmp_path, texts={"/dev/attestation/attestation_type": "none"}))
    assert info.label == "gramine-direct"
    assert info.attestation_type == "none"


def test_gramine_sgx_dcap(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        flags=PLAIN_FLAGS + " sgx",
        texts={"/dev/attestation/attestation_type": "dcap\n"},
    )
    info = detect_tee(root)
    assert info.label == "gramine-sgx"
    assert info.isolation == "gramine-sgx"
    assert "/dev/attestation/attestation_type is 'dcap'" in info.evidence
    assert info.contradictions == ()


def test_gramine_direct_inside_tdx_is_labelled_tdx(tmp_path: Path) -> None:
    root = make_tree(tmp_path, flags=PLAIN_FLAGS + " tdx_guest", dirs=("/dev/attestation",))
    info = detect_tee(root)
    assert info.label == "tdx"
    assert info.isolation == "gramine-direct"
    assert info.contradictions == ()
    assert [f.kind for f in info.findings] == ["tdx", "gramine-direct"]


def test_tdx_and_sev_markers_contradict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tree(tmp_path, files=("/dev/tdx_guest", "/dev/sev-guest"))
    with caplog.at_level(logging.WARNING, logger="teefl.tee"):
        info = detect_tee(root)
    assert info.label == "tdx"  # precedence: tdx before sev-snp
    assert LABEL_PRECEDENCE.index("tdx") < LABEL_PRECEDENCE.index("sev-snp")
    assert any("TDX and SEV-SNP" in c for c in info.contradictions)
    assert info.warnings and "precedence" in info.warnings[0]
    assert "contradictory TEE evidence" in caplog.text


def test_gramine_sgx_without_sgx_contradicts(tmp_path: Path) -> None:
    root = make_tree(tmp_path, texts={"/dev/attestation/attestation_type": "dcap"})
    info = detect_tee(root)
    assert info.label == "gramine-sgx"
    assert any("no SGX CPU flag" in c for c in info.contradictions)
    assert info.warnings


def test_stated_label_recorded_as_stated(tmp_path: Path) -> None:
    root = make_tree(tmp_path, files=("/dev/tdx_guest",))
    info = detect_tee(root, stated_label="TDX")
    assert info.label == "tdx"
    assert info.source == "stated"
    assert info.detected_label == "tdx"
    assert info.warnings == ()
    d = info.to_dict()
    assert d["source"] == "stated" and d["stated_label"] == "tdx"
    assert d["findings"][0]["kind"] == "tdx"


def test_stated_label_disagreeing_keeps_findings(tmp_path: Path) -> None:
    info = detect_tee(make_tree(tmp_path), stated_label="sev-snp")
    assert info.label == "sev-snp"
    assert info.source == "stated"
    assert info.detected_label == "none"
    assert any("differs from detected" in w for w in info.warnings)


def test_stated_label_validated(tmp_path: Path) -> None:
    with pytest.raises(TeeflError, match="invalid TEE label"):
        detect_tee(tmp_path, stated_label="not a label!")


def test_tsm_probe_directory_is_removed(tmp_path: Path) -> None:
    # An empty report directory (no request dirs): the detector may create a probe directory to
    # read `provider`; a plain directory gets no provider file, and the probe must be gone after.
    root = make_tree(tmp_path, dirs=(TSM,))
    info = detect_tee(root)
    assert info.label == "none"
    assert list((root / TSM.lstrip("/")).iterdir()) == []
    # read-only mode creates nothing at all
    assert detect_tee(root, probe_tsm=False).label == "none"
