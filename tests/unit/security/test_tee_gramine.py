"""Gramine manifests and launch wrapping, with stand-in Gramine tools (Gramine is not installed)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from gramine_standin import install_stand_ins
from rich.console import Console

import teefl
from teefl.errors import TeeflError
from teefl.security.tee.gramine import sign_manifest, wrap_command
from teefl.security.tee.gramine_manifest import render_manifest

PY = Path(sys.executable)


def render(tmp_path: Path, **over: object) -> dict:
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: t\n")
    certs = tmp_path / "pki"
    certs.mkdir(exist_ok=True)
    (certs / "ca.pem").write_text("ca")
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    kwargs: dict = {
        "python": PY,
        "plan_path": plan,
        "cert_paths": [certs / "ca.pem"],
        "data_dirs": [data],
        "run_dir": tmp_path / "runs" / "r1",
        "sgx": True,
        "threads": 8,
        "argv": ["python", "-m", "teefl.cli", "aggregator", "--plan", str(plan)],
        "checkpoint_dir": tmp_path / "runs" / "r1" / "checkpoints",
    }
    kwargs.update(over)
    text = render_manifest("aggregator", **kwargs)
    return tomllib.loads(text)


def test_manifest_sgx_content(tmp_path: Path) -> None:
    m = render(tmp_path)
    interp = str(PY.resolve())
    assert m["loader"]["entrypoint"]["uri"] == "file:{{ gramine.libos }}"
    assert m["libos"]["entrypoint"] == interp
    assert m["loader"]["argv"][0] == interp
    assert m["loader"]["argv"][1:4] == ["-m", "teefl.cli", "aggregator"]
    env = m["loader"]["env"]
    assert env["OMP_NUM_THREADS"] == "8" and env["MKL_NUM_THREADS"] == "8"
    assert env["MALLOC_ARENA_MAX"] == "1"
    teefl_root = str(Path(teefl.__file__).resolve().parent.parent)
    pythonpath = env["PYTHONPATH"].split(":")
    assert teefl_root in pythonpath
    site = Path(pytest.__file__).resolve().parent.parent  # this venv's site-packages
    assert any(site.is_relative_to(p) for p in pythonpath)

    sgx = m["sgx"]
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["enclave_size"] == "16G" and sgx["max_threads"] == 64
    assert sgx["debug"] is False
    trusted = [t for t in sgx["trusted_files"] if isinstance(t, str)]  # code: hashed at signing
    assert f"file:{interp}" in trusted
    stdlib = Path(os.__file__).resolve().parent
    assert any(stdlib.is_relative_to(t.removeprefix("file:")) for t in trusted)
    assert any(Path(teefl_root).is_relative_to(t.removeprefix("file:")) for t in trusted)
    pinned = _pinned(m)  # the inputs that decide security: trusted, with their hashes
    assert pinned == {
        str(tmp_path / "plan.yaml"): _sha256(tmp_path / "plan.yaml"),
        str(tmp_path / "pki" / "ca.pem"): _sha256(tmp_path / "pki" / "ca.pem"),
    }
    allowed = sgx["allowed_files"]
    assert allowed == [f"file:{(tmp_path / 'data')}/", f"file:{(tmp_path / 'runs' / 'r1')}/"]

    mounts = m["fs"]["mounts"]
    enc = [x for x in mounts if x.get("type") == "encrypted"]
    assert enc == [
        {
            "type": "encrypted",
            "path": str(tmp_path / "runs/r1/checkpoints"),
            "uri": f"file:{tmp_path / 'runs/r1/checkpoints'}",
            "key_name": "_sgx_mrenclave",
        }
    ]
    assert mounts[0] == {"path": "/lib", "uri": "file:{{ gramine.runtimedir() }}"}
    paths = [x["path"] for x in mounts]
    assert len(paths) == len(set(paths))
    # the run directory is under /tmp here, so a tmpfs /tmp (which would hide it) is left out
    assert str(tmp_path).startswith("/tmp/") and "/tmp" not in paths
    assert f"file:{tmp_path / 'plan.yaml'}" in [x["uri"] for x in mounts]
    assert m["fs"]["start_dir"] == str(tmp_path / "runs" / "r1")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pinned(manifest: dict) -> dict[str, str]:
    """Trusted files given with their SHA-256 in the manifest: path -> hash."""
    return {
        t["uri"].removeprefix("file:"): t["sha256"]
        for t in manifest["sgx"]["trusted_files"]
        if isinstance(t, dict)
    }


def _allowed(manifest: dict) -> set[str]:
    return {a.removeprefix("file:").rstrip("/") for a in manifest["sgx"]["allowed_files"]}


def test_manifest_pins_security_inputs_and_keeps_keys_allowed(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "col1.crt").write_text("-----BEGIN CERTIFICATE-----\ncol1\n")
    (pki / "col1.key").write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    (pki / "stray.key").write_text("-----BEGIN EC PRIVATE KEY-----\nsecret\n")
    collateral = tmp_path / "collateral.json"
    collateral.write_text("{}")
    m = render(
        tmp_path,
        cert_paths=[pki / "col1.crt", pki / "stray.key"],  # a key given as a --cert stays secret
        key_paths=[pki / "col1.key"],
        trusted_paths=[collateral],
    )
    pinned = _pinned(m)
    for f in (tmp_path / "plan.yaml", pki / "col1.crt", collateral):
        assert pinned[str(f)] == _sha256(f), f
    assert str(pki / "col1.key") not in pinned and str(pki / "stray.key") not in pinned
    allowed = _allowed(m)
    assert str(pki / "col1.key") in allowed and str(pki / "stray.key") in allowed
    # the plan sits in the run directory here too: pinned by its exact path, which Gramine
    # matches before the allowed directory around it
    assert not {str(tmp_path / "plan.yaml"), str(collateral), str(pki / "col1.crt")} & allowed
    # every input is still visible inside Gramine
    mounted = [x["path"] for x in m["fs"]["mounts"]]
    for f in [*pinned, *allowed]:
        assert any(Path(f).is_relative_to(x) for x in mounted), f
    # another plan, another pinned hash (and so, signed, another MRENCLAVE)
    other = tmp_path / "other.yaml"
    other.write_text("name: other\n")
    assert _pinned(render(tmp_path, plan_path=other))[str(other)] == _sha256(other)
    assert _sha256(other) != pinned[str(tmp_path / "plan.yaml")]
    with pytest.raises(TeeflError, match=r"cannot hash .*missing\.json"):
        render(tmp_path, trusted_paths=[tmp_path / "missing.json"])


def test_manifest_direct_has_no_dcap_and_no_sgx_key(tmp_path: Path) -> None:
    m = render(tmp_path, sgx=False, enclave_size="4G", max_threads=32, threads=2)
    assert "remote_attestation" not in m["sgx"]
    assert m["sgx"]["enclave_size"] == "4G" and m["sgx"]["max_threads"] == 32
    assert not [x for x in m["fs"]["mounts"] if x.get("type") == "encrypted"]
    with pytest.raises(TeeflError, match="only under gramine-sgx"):
        render(tmp_path, sgx=False, checkpoint_key_name="_sgx_mrsigner")
    m2 = render(tmp_path, sgx=False, checkpoint_key_name="teefl_ckpt")
    assert [x["key_name"] for x in m2["fs"]["mounts"] if x.get("type") == "encrypted"] == [
        "teefl_ckpt"
    ]


def test_manifest_validation(tmp_path: Path) -> None:
    with pytest.raises(TeeflError, match="max_threads 16 is too small"):
        render(tmp_path, max_threads=16)
    with pytest.raises(TeeflError, match="enclave size"):
        render(tmp_path, enclave_size="lots")
    with pytest.raises(TeeflError, match="Jinja"):
        render(tmp_path, argv=["python", "{{ evil }}"])
    with pytest.raises(TeeflError, match="unknown role"):
        render_manifest(
            "observer", python=PY, plan_path=None, run_dir=tmp_path, sgx=False, threads=1
        )


def test_manifest_escapes_strings(tmp_path: Path) -> None:
    m = render(tmp_path, argv=["python", "-c", 'print("a\\b")\n'])
    assert m["loader"]["argv"][2] == 'print("a\\b")\n'


# ---------------------------------------------------------------------------------------------
# wrap_command with stand-in Gramine tools
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_gramine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    logs = tmp_path / "logs"
    bin_dir = install_stand_ins(tmp_path / "bin", logs)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return logs


CHILD = (
    "import json, os, sys; "
    "json.dump({'argv': sys.argv[1:], 'omp': os.environ.get('OMP_NUM_THREADS'), "
    "'launcher': os.environ.get('TEEFL_LAUNCHER'), 'cwd': os.getcwd()}, "
    "open(sys.argv[1], 'w'))"
)


def test_wrap_command_runs_python_under_stand_in(tmp_path: Path, fake_gramine: Path) -> None:
    out = tmp_path / "child.json"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [sys.executable, "-c", CHILD, str(out), "hello world"]
    cmd = wrap_command(
        "gramine-direct",
        argv,
        tmp_path / "manifests",
        role="collaborator",
        name="collaborator-1",
        run_dir=run_dir,
        threads=3,
    )
    assert Path(cmd[0]).name == "gramine-direct"
    assert cmd[1:] == [str(tmp_path / "manifests" / "collaborator-1")]
    assert (tmp_path / "manifests" / "collaborator-1.manifest.template").is_file()
    assert (tmp_path / "manifests" / "collaborator-1.manifest").is_file()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(out.read_text())
    assert child == {
        "argv": [str(out), "hello world"],
        "omp": "3",
        "launcher": "gramine-direct",
        "cwd": str(run_dir),
    }
    recorded = (fake_gramine / "direct.log").read_text().splitlines()
    assert recorded == [str(tmp_path / "manifests" / "collaborator-1")]

    # unchanged inputs: no second gramine-manifest run
    wrap_command(
        "gramine-direct",
        argv,
        tmp_path / "manifests",
        name="collaborator-1",
        run_dir=run_dir,
        threads=3,
    )
    assert len((fake_gramine / "manifest.log").read_text().splitlines()) == 1


def test_wrap_command_sgx_signs_once(tmp_path: Path, fake_gramine: Path) -> None:
    argv = [sys.executable, "-c", "pass"]
    mdir = tmp_path / "m"
    cmd = wrap_command("gramine-sgx", argv, mdir, role="aggregator", run_dir=tmp_path)
    assert Path(cmd[0]).name == "gramine-sgx" and cmd[1] == str(mdir / "aggregator")
    assert (mdir / "aggregator.manifest.sgx").read_text().strip() == "signed"
    manifest = tomllib.loads((mdir / "aggregator.manifest").read_text())
    assert manifest["sgx"]["remote_attestation"] == "dcap"
    wrap_command("gramine-sgx", argv, mdir, role="aggregator", run_dir=tmp_path)
    assert len((fake_gramine / "sign.log").read_text().splitlines()) == 1
    with pytest.raises(TeeflError, match="gramine-sgx-gen-private-key"):
        sign_manifest(mdir / "aggregator.manifest", key=tmp_path / "missing.pem")
    key = tmp_path / "enclave-key.pem"
    key.write_text("-----BEGIN RSA PRIVATE KEY-----\n")
    key.chmod(0o644)
    with pytest.raises(TeeflError, match=rf"enclave signing key {key} is accessible .*chmod 600"):
        sign_manifest(mdir / "aggregator.manifest", key=key)


def test_wrap_command_native_is_identity(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "teefl.cli", "--help"]
    assert wrap_command("native", argv, tmp_path) == argv
    assert not any(tmp_path.iterdir())


def test_wrap_command_missing_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(TeeflError) as info:
        wrap_command("gramine-direct", [sys.executable, "-c", "pass"], tmp_path / "m")
    assert str(info.value) == (
        "gramine-direct not found on PATH: install Gramine (https://gramine.readthedocs.io) "
        "or use --launcher native"
    )
    with pytest.raises(TeeflError, match="gramine-sgx not found on PATH"):
        wrap_command("gramine-sgx", [sys.executable], tmp_path / "m")
    with pytest.raises(TeeflError, match="unknown launcher"):
        wrap_command("docker", [sys.executable], tmp_path / "m")


def test_each_party_gets_only_its_own_key_material(tmp_path: Path, fake_gramine: Path) -> None:
    from teefl.federation.launcher import _gramine
    from teefl.federation.setup import issue_throwaway_pki
    from teefl.plan import plan_from_dict

    collateral = tmp_path / "collateral.json"
    collateral.write_text("{}")
    plan = plan_from_dict(
        {
            "collaborators": 2,
            "dataset": {"name": "synthetic"},
            "security": {"transport": "mtls"},
            "runtime": {"launcher": "gramine-direct"},
        }
    )
    plan.security.attestation.collateral = collateral
    run_dir = tmp_path / "run"
    issue_throwaway_pki(plan, run_dir, Console(file=io.StringIO()))
    (run_dir / "plan.yaml").write_text(plan.to_yaml())
    tls = plan.security.tls
    assert tls.client_dir is not None and tls.server_key is not None and tls.ca is not None
    keys = {
        "aggregator": tls.server_key,
        "col1": tls.client_dir / "col1.key",
        "col2": tls.client_dir / "col2.key",
    }
    for process, own in (
        ("aggregator", "aggregator"),
        ("collaborator-col1", "col1"),
        ("collaborator-col2", "col2"),
    ):
        _gramine(plan, process, [sys.executable, "-m", "teefl", "x"], run_dir, None)
        text = (run_dir / "gramine" / f"{process}.manifest.template").read_text()
        m = tomllib.loads(text)
        for party, key in keys.items():
            # a key is readable inside the enclave only where it is the party's own
            assert (str(key) in text) == (party == own), (process, party)
        assert str(keys[own]) in _allowed(m)
        pinned = _pinned(m)
        for f in (run_dir / "plan.yaml", tls.ca, collateral):
            assert pinned[str(f)] == _sha256(f), (process, f)
        assert not set(pinned) & _allowed(m)


def test_the_key_service_client_certificate_is_the_aggregators_alone(
    tmp_path: Path, fake_gramine: Path
) -> None:
    """With at_rest.key_from the aggregator's enclave reads its key-client certificate and key
    (the sealing key arrives in memory); no collaborator's enclave can read them."""
    from teefl.federation.launcher import _gramine
    from teefl.federation.setup import issue_throwaway_pki
    from teefl.plan import AtRestSpec, plan_from_dict
    from teefl.security import certificates, pki

    plan = plan_from_dict(
        {
            "collaborators": 1,
            "dataset": {"name": "synthetic"},
            "security": {"transport": "mtls"},
            "runtime": {"launcher": "gramine-direct"},
        }
    )
    run_dir = tmp_path / "run"
    issue_throwaway_pki(plan, run_dir, Console(file=io.StringIO()))
    assert plan.security.tls.ca is not None
    pki_dir = plan.security.tls.ca.parent
    pki.issue_key_client(pki_dir, "aggregator")
    cert, key = certificates.key_client_paths(pki_dir, "aggregator")
    plan.security.at_rest = AtRestSpec(
        mode="sealed", key_from="k:1", client_cert=cert, client_key=key
    )
    (run_dir / "plan.yaml").write_text(plan.to_yaml())
    for process, own in (("aggregator", True), ("collaborator-col1", False)):
        _gramine(plan, process, [sys.executable, "-m", "teefl", "x"], run_dir, None)
        m = tomllib.loads((run_dir / "gramine" / f"{process}.manifest.template").read_text())
        assert (str(key) in _allowed(m)) == own, process
        assert (str(cert) in _pinned(m)) == own, process


def test_a_user_workload_is_trusted_code_and_its_data_allowed(
    tmp_path: Path, fake_gramine: Path
) -> None:
    """Under Gramine the files the workload digest covers are trusted files (their hashes in
    the manifest, so the enclave measurement vouches for them) and the party's own data
    directory is readable."""
    from teefl.federation.launcher import _gramine
    from teefl.plan import plan_from_dict

    (tmp_path / "task.py").write_text("class Task: ...\n")
    (tmp_path / "data" / "col1").mkdir(parents=True)
    plan = plan_from_dict(
        {
            "collaborators": 1,
            "workload": {"name": "./task.py:Task", "data_root": str(tmp_path / "data")},
            "runtime": {"launcher": "gramine-direct"},
        },
        base=tmp_path,
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.yaml").write_text(plan.to_yaml())
    _gramine(plan, "collaborator-col1", [sys.executable, "-m", "teefl", "x"], run_dir, None)
    m = tomllib.loads((run_dir / "gramine" / "collaborator-col1.manifest.template").read_text())
    assert _pinned(m)[str(tmp_path / "task.py")] == _sha256(tmp_path / "task.py")
    assert any(str(tmp_path / "data" / "col1") in a for a in _allowed(m))
