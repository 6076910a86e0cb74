"""Keys released only to attested parties (issue 17, item 3), as a user runs it: the owner's
`teefl keys serve` in its own process, a federation whose aggregator has
``at_rest: {mode: sealed, key_from: ...}`` and no key file, and the simulated provider standing
in for its TEE (allow_simulated: tests only).

The attested aggregator gets the key and writes sealed checkpoints that the owner opens with the
key file only they hold; the key's bytes (raw, hex, base64) appear in no file of the run, in no
party's log and in no output of the key service. An aggregator whose measurement is outside the
owner's policy gets nothing and stops with one line, and the audit log says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.numpy import load_file

from fedutil import run_dir_of, teefl, write_plan
from identutil import secure_plan, sim_key
from keysutil import files_holding, key_client, owner_setup
from teefl.security.keys.audit import read_audit

pytestmark = pytest.mark.slow
TEEFL = (sys.executable, "-m", "teefl")


@contextlib.contextmanager
def key_service(config: Path, out: Path, timeout: float = 60) -> Iterator[int]:
    """`teefl keys serve CONFIG` in its own process (output to ``out``); yields its port once
    it serves, and stops it (SIGTERM, then SIGKILL) on the way out."""
    port_file = config.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    with open(out, "w") as fh:
        proc = subprocess.Popen(
            [*TEEFL, "keys", "serve", str(config), "--port-file", str(port_file)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the key service did not start:\n" + out.read_text()
            time.sleep(0.05)
        yield int(port_file.read_text())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def key_from_plan(tmp: Path, port: int, **sections: Any) -> Path:
    """A 2-collaborator mTLS plan (federation attestation off) whose aggregator fetches its
    sealing key from the key service at ``port``, attesting with the simulated provider."""
    plan, data, _ = secure_plan(tmp, collaborators=2, federation={"rounds": 2}, **sections)
    cert, key = key_client(tmp / "pki")
    data["security"]["attestation"] = {
        "provider": "simulated",
        "allow_simulated": True,
        "simulated_key": str(sim_key(tmp)),
    }
    data["security"]["at_rest"] = {
        "mode": "sealed",
        "key_from": f"127.0.0.1:{port}",
        "client_cert": str(cert),
        "client_key": str(key),
        "key_timeout": 20,
    }
    return write_plan(plan, data)


def test_attested_aggregator_gets_the_key_and_it_leaks_nowhere(tmp_path: Path) -> None:
    secure_plan(tmp_path)  # the federation's PKI, where the owner issues the service's certs
    config, key = owner_setup(tmp_path, tmp_path / "pki")
    service_out = tmp_path / "keys-serve.log"
    with key_service(config, service_out) as port:
        plan = key_from_plan(tmp_path, port)
        assert "owner.key" not in plan.read_text()  # the aggregator names no key file
        res = teefl("run", str(plan), "--runs-dir", "runs", "--no-progress", cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
    run = run_dir_of(tmp_path / "runs")
    sealed = sorted((run / "model").glob("*.sealed"))
    assert any(p.name.startswith("final") for p in sealed), sorted(
        p.name for p in (run / "model").iterdir()
    )
    assert not list((run / "model").glob("*.safetensors")), "a plaintext model in a sealed run"
    final = next(p for p in sealed if p.name.startswith("final"))
    opened = tmp_path / "final.safetensors"
    res = teefl(
        "model", "decrypt", str(final), str(opened), "--key-file", "owner.key", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert load_file(str(opened))  # the owner's key opens what the aggregator sealed

    events = [
        json.loads(x) for x in (run / "events" / "aggregator.jsonl").read_text().split("\n") if x
    ]
    released = [e for e in events if e.get("what") == "sealing_key_released"]
    assert released and released[0]["key_service"] == f"127.0.0.1:{port}"
    audit = read_audit(tmp_path / "keys-audit.jsonl")
    releases = [r for r in audit if r["event"] == "release"]
    assert len(releases) == 1 and releases[0]["party"] == "aggregator"
    assert releases[0]["key_id"] == released[0]["key_id"]
    assert "released sealing_key to aggregator" in service_out.read_text()

    # the key's bytes, in any spelling, in no file of the run (logs, events, plan, checkpoints,
    # verdicts), in no output of teefl run, of the key service, or in its audit log
    console = tmp_path / "console.txt"
    console.write_text(res.stdout + res.stderr)
    leaks = files_holding(key, run, console, service_out, tmp_path / "keys-audit.jsonl")
    assert leaks == [], leaks


def test_aggregator_outside_the_owners_policy_gets_nothing(tmp_path: Path) -> None:
    secure_plan(tmp_path)
    config, key = owner_setup(tmp_path, tmp_path / "pki", policy={"mrtd": ["66" * 48]})
    service_out = tmp_path / "keys-serve.log"
    with key_service(config, service_out) as port:
        plan = key_from_plan(tmp_path, port)
        run = tmp_path / "run"
        res = subprocess.run(
            [*TEEFL, "aggregator", "--plan", str(plan), "--run-dir", str(run)],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert f"the key service at 127.0.0.1:{port} refused the sealing key" in errors[0]
    assert "MRTD ceb1711265785cbe" in errors[0] and "not in policy" in errors[0]
    refusal = read_audit(tmp_path / "keys-audit.jsonl")[-1]
    assert refusal["event"] == "refusal" and refusal["party"] == "aggregator"
    assert "MRTD ceb1711265785cbe" in refusal["reason"]
    assert "refused release of aggregator" in service_out.read_text()
    assert not list(run.rglob("*.sealed"))
    console = tmp_path / "console.txt"
    console.write_text(res.stdout + res.stderr)
    assert files_holding(key, run, console, service_out, tmp_path / "keys-audit.jsonl") == []


def test_bad_input_is_one_line_each(tmp_path: Path) -> None:
    """The key file missing on the service; the service unreachable from the aggregator."""
    from fedutil import free_port

    secure_plan(tmp_path)
    config, _ = owner_setup(tmp_path, tmp_path / "pki")
    (tmp_path / "owner.key").unlink()
    res = teefl("keys", "serve", str(config), cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    assert (
        res.stderr.strip().splitlines()[-1] == f"error: key file {tmp_path / 'owner.key'} not found"
    )

    plan = key_from_plan(tmp_path, free_port())
    data = yaml.safe_load(plan.read_text())
    data["security"]["at_rest"]["key_timeout"] = 2
    write_plan(plan, data)
    res = subprocess.run(
        [*TEEFL, "aggregator", "--plan", str(plan), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is unreachable (connection refused)" in errors[0], res.stderr
