"""Federations over none, tls and mtls; intruders are refused before any model byte flows."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from fedutil import SYNTHETIC, final_accuracy, read_jsonl, run_dir_of, run_plan, write_plan
from teefl.security import pki, plan_pki
from teefl.server.aggregator import final_state
from teefl.wire import teefl_pb2, teefl_pb2_grpc


def _run(tmp: Path, transport: str) -> Path:
    run, res = run_plan(tmp, SYNTHETIC, transport)
    if transport != "none":
        assert "throwaway" in res.stdout
    return run


def test_transport_does_not_change_training(tmp_path: Path) -> None:
    runs = {}
    for transport in ("none", "tls", "mtls"):
        (tmp_path / transport).mkdir()
        runs[transport] = _run(tmp_path / transport, transport)
    acc = {t: final_accuracy(r) for t, r in runs.items()}
    assert acc["none"] == acc["tls"] == acc["mtls"], acc
    states = {t: final_state(r) for t, r in runs.items()}
    for key, t in states["none"].items():
        assert torch.equal(t, states["tls"][key]) and torch.equal(t, states["mtls"][key]), key


@pytest.mark.slow
def test_data_plane_does_not_change_training(tmp_path: Path) -> None:
    """The gRPC streams (``network.data_plane: grpc``, here under mtls) and the socket data
    plane (the default, here plaintext) deliver the same bytes: the same final model."""
    finals = {}
    for data_plane, transport in (("grpc", "mtls"), ("socket", "none")):
        data = {**SYNTHETIC, "network": {"data_plane": data_plane}}
        run, _ = run_plan(tmp_path / data_plane, data, transport)
        log = (run / "logs" / "aggregator.log").read_text()
        assert ("data over gRPC" in log) == (data_plane == "grpc"), log[-2000:]
        finals[data_plane] = final_state(run)
    for key, t in finals["grpc"].items():
        assert torch.equal(t, finals["socket"][key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _intrude(port: int, ca: Path, cert: Path, key: Path, claim: str) -> tuple[str, int]:
    """Try to join and fetch the model; returns (refusal message, model bytes received)."""
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    received = 0
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        stub = teefl_pb2_grpc.FederationStub(ch)
        messages = []
        try:
            stub.Join(teefl_pb2.JoinRequest(collaborator=claim), timeout=10)
        except grpc.RpcError as exc:
            messages.append(exc.details())
        try:
            for chunk in stub.GetModel(
                teefl_pb2.ModelRequest(collaborator=claim, round=1), timeout=10
            ):
                received += len(chunk.data)
        except grpc.RpcError as exc:
            messages.append(exc.details())
    assert len(messages) == 2, messages
    return messages[0], received


@pytest.mark.slow
def test_mtls_refuses_impostors_and_they_change_nothing(tmp_path: Path) -> None:
    # baseline: the same federation with nobody knocking
    (tmp_path / "base").mkdir()
    base = _run(tmp_path / "base", "mtls")

    port = _free_port()
    data = {**SYNTHETIC, "network": {"host": "127.0.0.1", "port": port}}
    plan_path = write_plan(tmp_path / "plan.yaml", data)
    from teefl.plan import load_plan

    issued = plan_pki.issue_for_plan(load_plan(plan_path), tmp_path / "pki")
    pki.issue_collaborator(tmp_path / "pki", "mallory")  # same CA, not in the plan
    data["security"] = {
        "transport": "mtls",
        "tls": {
            "ca": str(issued.ca),
            "server_cert": str(issued.server_cert),
            "server_key": str(issued.server_key),
            "client_dir": str(issued.client_dir),
        },
    }
    write_plan(plan_path, data)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teefl",
            "run",
            str(plan_path),
            "--runs-dir",
            "runs",
            "--no-progress",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "runs").glob("*/port")) and time.monotonic() < deadline:
            time.sleep(0.1)
        cdir = issued.client_dir
        # mallory holds a valid certificate of this CA, but is not in the plan
        msg, got = _intrude(port, issued.ca, cdir / "mallory.crt", cdir / "mallory.key", "mallory")
        assert msg == "certificate CN 'mallory' is not a collaborator of this plan" and got == 0
        # mallory claims to be col1
        msg, got = _intrude(port, issued.ca, cdir / "mallory.crt", cdir / "mallory.key", "col1")
        assert (
            msg == ("certificate CN 'mallory' does not match claimed collaborator name 'col1'")
            and got == 0
        )
        # col3 (a member) claims to be col1 to send a second update
        msg, got = _intrude(port, issued.ca, cdir / "col3.crt", cdir / "col3.key", "col1")
        assert "does not match claimed collaborator name 'col1'" in msg and got == 0
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    run = run_dir_of(tmp_path / "runs")
    refused = [
        e for e in read_jsonl(run / "events" / "aggregator.jsonl") if e.get("what") == "refused"
    ]
    assert len(refused) >= 6 and all(e["peer"].startswith("ipv4:127.0.0.1") for e in refused)
    a, b = final_state(base), final_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "an impostor changed the global model"
