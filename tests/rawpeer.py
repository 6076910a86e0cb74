"""A real aggregator process and raw peers of it: what a hostile or buggy party can send.

The aggregator runs as `teefl aggregator` (its log, its events, its threads and memory are those
of the real process); the peers are plain sockets and gRPC stubs in the test, holding a
member's valid name and token where the attack needs one (a Join, as a collaborator makes it).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import grpc

from fedutil import (
    SYNTHETIC,
    Parties,
    free_port,
    join_request,
    read_jsonl,
    session_metadata,
    with_transport,
    write_plan,
)
from teefl.transport import framing
from teefl.wire import codec, teefl_pb2, teefl_pb2_grpc


class Aggregator:
    """A `teefl aggregator` process with collaborators ``col1`` and ``col2``."""

    def __init__(
        self,
        tmp: Path,
        transport: str = "none",
        federation: dict[str, Any] | None = None,
        network: dict[str, Any] | None = None,
        model: str = "small_cnn",
        preexec: Any = None,
    ) -> None:
        self.tmp, self.transport = tmp, transport
        self.port = free_port()
        network = {"data_port": free_port(), **(network or {})}
        self.data_port = network["data_port"]  # fixed: raw peers need no Join to find it
        data: dict[str, Any] = {
            **SYNTHETIC,
            "collaborators": ["col1", "col2"],
            "model": {"name": model},
            "network": {"host": "127.0.0.1", "port": self.port, **network},
            "federation": {"rounds": 2, "round_timeout": 600, **(federation or {})},
            "security": {"transport": "none"},
        }
        if model != "small_cnn":
            data["dataset"] = {
                "name": "synthetic",
                "synthetic": {"shape": [3, 32, 32], "classes": 4, "train_size": 64},
            }
        plan = write_plan(tmp / "plan.yaml", data)
        self.certs = with_transport(plan, data, transport, tmp / "pki")
        self.plan_path = plan
        self.sessions: dict[str, tuple] = {}  # name -> call metadata of its latest Join
        self.run_dir = tmp / "run"
        self.log = tmp / "aggregator.log"
        self.parties = Parties(plan, self.run_dir, self.log)
        if preexec is None:
            self.proc = self.parties.aggregator()
        else:  # started by hand to run ``preexec`` in the child (e.g. a lower descriptor limit)
            import os
            import subprocess
            import sys

            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "teefl", "aggregator", "--plan", str(plan)),
                    *("--run-dir", str(self.run_dir), "--run-id", "rel"),
                ],
                stdout=self.parties._fh,
                stderr=self.parties._fh,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=preexec,
            )
            self.parties.procs["aggregator"] = self.proc
        self.parties.wait_running(timeout=300)  # a loaded CI host imports torch slowly
        self.channels: list[grpc.Channel] = []

    # -- gRPC -----------------------------------------------------------------------------------
    def channel(self, name: str = "col1") -> grpc.Channel:
        target = f"127.0.0.1:{self.port}"
        if self.certs is None:
            ch = grpc.insecure_channel(target)
        else:
            cert, key = self._client_cert(name)
            creds = grpc.ssl_channel_credentials(
                self.certs.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
            )
            ch = grpc.secure_channel(target, creds)
        self.channels.append(ch)
        return ch

    def stub(self, name: str = "col1") -> teefl_pb2_grpc.FederationStub:
        return teefl_pb2_grpc.FederationStub(self.channel(name))

    def join(self, name: str) -> tuple[int, bytes]:
        """Join as ``name``, as its collaborator would: (data port, data token)."""
        from teefl.plan import load_plan

        reply = self.stub(name).Join(join_request(load_plan(self.plan_path), name), timeout=30)
        assert len(reply.session_token) == 32
        self.sessions[name] = session_metadata(reply)
        return reply.data_port, reply.session_token

    def md(self, name: str) -> tuple:
        """The call metadata of ``name``'s latest Join (joining first if it has none)."""
        if name not in self.sessions:
            self.join(name)
        return self.sessions[name]

    # -- data plane -----------------------------------------------------------------------------
    def _client_cert(self, name: str) -> tuple[Path, Path]:
        assert self.certs is not None
        d = Path(self.certs.client_dir)
        return d / f"{name}.crt", d / f"{name}.key"

    def tls_context(self, name: str = "col1") -> ssl.SSLContext | None:
        if self.certs is None:
            return None
        cert, key = self._client_cert(name) if self.transport == "mtls" else (None, None)
        return framing.client_context(Path(self.certs.ca), cert, key)

    def raw(self, name: str = "col1", rcvbuf: int | None = None) -> Any:
        """A data-plane connection, TLS handshake done where the plan says TLS, nothing sent."""
        s = socket.socket()
        if rcvbuf is not None:  # before connect: the window the peer is offered stays small
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(30)
        s.connect(("127.0.0.1", self.data_port))
        ctx = self.tls_context(name)
        return s if ctx is None else ctx.wrap_socket(s, server_hostname="127.0.0.1")

    def connect(self, name: str, token: bytes, rcvbuf: int | None = None) -> Any:
        """An authorised data connection of ``name`` (HELLO answered OK)."""
        s = self.raw(name, rcvbuf)
        hello = json.dumps({"collaborator": name, "token": token.hex()}).encode()
        framing.send_frame(s, framing.HELLO, hello)
        framing.expect(s, framing.OK)
        return s

    def model(self, sock: Any) -> tuple[teefl_pb2.Header, bytes]:
        """Download the open round's model on an authorised connection."""
        req = teefl_pb2.ModelRequest(collaborator="", round=1)
        framing.send_frame(sock, framing.GET, req.SerializeToString())
        h = teefl_pb2.Header.FromString(framing.expect(sock, framing.MODEL))
        buf = bytearray(h.total_size)
        framing.recv_exact(sock, memoryview(buf))
        return h, bytes(buf)

    # -- what the aggregator wrote --------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        path = self.run_dir / "events" / "aggregator.jsonl"
        return read_jsonl(path) if path.exists() else []

    def wait_event(self, pred, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if pred(e):
                    return e
            time.sleep(0.05)
        raise AssertionError("event not seen; log:\n" + self.log_text()[-3000:])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict[str, int]:
        """The aggregator process's threads, resident memory and its peak (kB), from /proc."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def stop(self) -> None:
        for ch in self.channels:
            ch.close()
        self.parties.stop()


def update_header(name: str, payload: bytes, **over: Any) -> teefl_pb2.Header:
    h: dict[str, Any] = dict(
        collaborator=name,
        round=1,
        total_size=len(payload),
        crc32c=codec.crc32c(payload),
        num_samples=10,
        format=codec.FORMAT,
    )
    h.update(over)
    return teefl_pb2.Header(**h)


def read_all(sock: Any, timeout: float) -> tuple[list[tuple[int, bytes]], bool]:
    """Frames the aggregator sends until it closes the connection or ``timeout`` passes:
    (frames, closed)."""
    sock.settimeout(timeout)
    frames = []
    try:
        while True:
            frames.append(framing.recv_frame(sock))
    except framing.Closed as exc:
        return frames, "timed out" not in str(exc)
    except (OSError, ssl.SSLError):
        return frames, True
