"""Shared machinery of the benchmark scripts (not a benchmark itself).

What is here, and why it is measured this way:

- ``raw_echo``: the physical reference. A client process sends the payload over one TCP (or TLS 1.3)
  connection to a server process, which receives it into a buffer and sends it back; the client
  times send + receive. Both sides use buffers allocated once and reused, so this is what the
  machine can do, not what a careful program does.
- ``fed_transfer``: teefl's real transfer path. An aggregator process runs the real
  `teefl.server.aggregator.Aggregator` (its gRPC server, round state machine, streaming FedAvg
  and checkpoints) and a collaborator process runs the real
  `teefl.client.collaborator.Collaborator` loop with the registered ``noop`` workload
  (`teefl.workload.noop`, chosen in the plan by `bench_plan`), which returns the received model
  unchanged. The figure is read from the collaborator's own ``download`` and
  ``upload`` spans in its events file -- the communication time a real run reports. Round 1 is a
  warm-up.

Run as a script, this module is the child process of those measurements
(``raw-server``, ``agg``, ``col``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

#: payloads the benchmarks move: name -> (teefl model name or "synthetic", human label)
MODELS = {
    "resnet18": "ResNet-18",
    "mobilenet_v3_small": "MobileNetV3-Small",
    "synthetic200": "synthetic 200 MB",
    "synthetic6": "synthetic 6 MB",
}


# -- reporting ---------------------------------------------------------------------------------
def machine() -> str:
    """CPU model (lscpu), cores, and the versions that shape the figures."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    import grpc
    import torch

    return (
        f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}"
    )


def load() -> str:
    """The load average: this machine is shared, and the figures mean less when it is high."""
    one, five, fifteen = os.getloadavg()
    cores = os.cpu_count()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min, {cores} cores)"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(x: float) -> str:
    return f"{x * 1000:8.1f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


# -- payloads ----------------------------------------------------------------------------------
def build_module(spec: str):
    """The torch module whose state dict is the payload (same in every process)."""
    import torch
    from torch import nn

    if spec == "synthetic200":
        torch.manual_seed(0)
        # 12 x (2048x2048 + 2048) float32 = 201 MB in 24 tensors
        return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(12)])
    if spec == "synthetic6":
        torch.manual_seed(0)
        # 1240x1240 + 1240 float32 = 6.2 MB in 2 tensors: MobileNetV3-Small's size, 1/122 of
        # its tensors (does a small payload cost more per byte because of its tensor count?)
        return nn.Sequential(nn.Linear(1240, 1240))
    if spec.startswith("linear"):  # "linear<N>": a tiny model for scale tests
        n = int(spec.removeprefix("linear") or 16)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, n), nn.ReLU(), nn.Linear(n, 10))
    from teefl.workload.models import build_model

    return build_model(spec, 3, 10, seed=0)


def noop_workload(spec: str) -> dict[str, Any]:
    """The plan's ``workload`` section whose model is `build_module` (spec)'s: the ``noop``
    workload, which trains nothing, so a round is the transfer alone."""
    if spec == "synthetic200":
        options: dict[str, Any] = {"model": "linear_stack", "layers": 12, "width": 2048}
    elif spec == "synthetic6":
        options = {"model": "linear_stack", "layers": 1, "width": 1240}
    elif spec.startswith("linear"):
        options = {"model": "mlp", "inputs": 3 * 32 * 32, "hidden": int(spec[6:] or 16)}
    else:
        options = {"model": spec, "channels": 3, "classes": 10}
    return {"name": "noop", "options": options}


def payload_of(spec: str) -> bytes:
    from teefl.wire import codec

    return bytes(codec.encode_state(build_module(spec).state_dict()))


# -- raw sockets -------------------------------------------------------------------------------
#: bytes per recv_into call: 256 KiB pieces were the fastest here (asking for the whole
#: remaining payload at once was up to ~1.5x slower), and teefl's data plane receives the same way
RECV_PIECE = 256 << 10


def _recv_exact(sock: Any, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got : min(n, got + RECV_PIECE)])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def _raw_server(args: argparse.Namespace) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(args.cert, args.key)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gRPC does
    if ctx is not None:
        conn = ctx.wrap_socket(conn, server_side=True)
    buf = bytearray(0)
    head = bytearray(8)
    while True:
        try:
            _recv_exact(conn, memoryview(head))
        except ConnectionError:
            return
        n = int.from_bytes(head, "little")
        if n == 0:
            return
        if args.stream:  # the bytes pass through one reused window: no payload held
            buf = buf if len(buf) == STREAM_WINDOW else bytearray(STREAM_WINDOW)
            _stream_recv(conn, buf, n)
            _stream_send(conn, buf, n)
            continue
        if len(buf) != n:
            buf = bytearray(n)
        _recv_exact(conn, memoryview(buf))
        conn.sendall(buf)


#: the window a streaming raw echo moves its bytes through (`raw_stream`)
STREAM_WINDOW = 64 << 20


def _stream_recv(sock: Any, buf: bytearray, n: int) -> None:
    view = memoryview(buf)
    while n > 0:
        k = min(n, len(view))
        _recv_exact(sock, view[:k])
        n -= k


def _stream_send(sock: Any, buf: bytearray, n: int) -> None:
    view = memoryview(buf)
    while n > 0:
        k = min(n, len(view))
        sock.sendall(view[:k])
        n -= k


def raw_stream(size: int, reps: int) -> list[float]:
    """Seconds per round trip of ``size`` bytes over a plain socket (send all, receive all
    back), both ends moving them through one reused window: the raw time for a payload too big
    to hold twice (large_model.py). No memory is written fresh on either end, so this is a
    stricter baseline than any transfer that lands its bytes in a model."""
    argv = [PY, str(HERE / "_common.py"), "raw-server", "--stream"]
    with child(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(STREAM_WINDOW)
        times = []
        try:
            for _ in range(reps + 1):  # +1 warm-up
                t0 = time.perf_counter()
                sock.sendall(size.to_bytes(8, "little"))
                _stream_send(sock, buf, size)
                _stream_recv(sock, buf, size)
                times.append(time.perf_counter() - t0)
            sock.sendall((0).to_bytes(8, "little"))
        finally:
            sock.close()
        return times[1:]


def raw_echo(payload: bytes, reps: int, tls: tuple[Path, Path, Path] | None = None) -> list[float]:
    """Seconds per round trip (send all, receive all back) of ``payload``; ``tls`` = (ca, cert,
    key) for TLS 1.3 with Python's ssl (OpenSSL)."""
    argv = [PY, str(HERE / "_common.py"), "raw-server"]
    if tls:
        argv += ["--cert", str(tls[1]), "--key", str(tls[2])]
    with child(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        sock: Any = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gRPC does
        if tls:
            ctx = ssl.create_default_context(cafile=str(tls[0]))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        back = bytearray(len(payload))
        view = memoryview(back)
        head = len(payload).to_bytes(8, "little")
        times = []
        try:
            for _ in range(reps + 1):  # +1 warm-up
                t0 = time.perf_counter()
                sock.sendall(head)
                sock.sendall(payload)
                _recv_exact(sock, view)
                times.append(time.perf_counter() - t0)
            sock.sendall((0).to_bytes(8, "little"))
        finally:
            sock.close()
        if back != payload:
            raise RuntimeError("raw echo returned different bytes")
        return times[1:]


# -- child processes ---------------------------------------------------------------------------
@contextlib.contextmanager
def child(argv: list[str], timeout: float = 600, **kw: Any) -> Iterator[subprocess.Popen]:
    """A child process in its own session, always killed (with its group) on the way out."""
    proc = subprocess.Popen(argv, start_new_session=True, **kw)
    try:
        yield proc
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -- teefl federations -------------------------------------------------------------------------
def pki_for(directory: Path, names: list[str]) -> dict[str, str]:
    """Certificates for a loopback federation (teefl's own PKI); the plan's security.tls block."""
    from teefl.plan import plan_from_dict
    from teefl.security import plan_pki

    plan = plan_from_dict({"collaborators": names, "security": {"transport": "mtls"}})
    p = plan_pki.issue_for_plan(plan, directory)
    return {
        "ca": str(p.ca),
        "server_cert": str(p.server_cert),
        "server_key": str(p.server_key),
        "client_dir": str(p.client_dir),
    }


def bench_plan(
    spec: str,
    transport: str,
    rounds: int,
    names: list[str],
    tls: dict[str, str] | None,
    chunk_size: int | None = None,
    compression: str = "none",
    federation: dict[str, Any] | None = None,
    workload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``federation``: more keys of that section; ``workload``: instead of `noop_workload`."""
    plan: dict[str, Any] = {
        "name": "bench",
        "collaborators": names,
        "federation": {"rounds": rounds, "round_timeout": 600, **(federation or {})},
        "training": {"threads": 1, "device": "cpu"},
        "network": {"host": "127.0.0.1", "port": 0},
        "security": {"transport": transport},
        "workload": workload or noop_workload(spec),
    }
    if chunk_size:
        plan["network"]["chunk_size"] = chunk_size
    if compression != "none":
        plan["network"]["compression"] = compression
    if transport != "none":
        assert tls is not None
        plan["security"]["tls"] = tls
    return plan


@dataclass
class FedResult:
    """Per measured round (warm-up dropped), seconds."""

    download: list[float] = field(default_factory=list)
    upload: list[float] = field(default_factory=list)
    #: the part of each upload span spent by the aggregator closing the round (FedAvg result,
    #: serialize, checkpoint) before it acknowledges the last update
    close: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)
    bytes: int = 0
    agg_peak_rss: int = 0
    agg_base_rss: int = 0
    #: the aggregator's RSS before it built the model (imports done)
    agg_pre_model_rss: int = 0
    #: per collaborator: (RSS before it built the model, peak RSS), from its stats file
    col_rss: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: per phase (aggregator's and collaborator's spans, measured rounds): durations in seconds
    spans: dict[str, list[float]] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def comm(self) -> list[float]:
        return [d + u for d, u in zip(self.download, self.upload, strict=True)]

    @property
    def comm_open(self) -> list[float]:
        """download + upload without the round-closing work the ack waits for."""
        return [c - k for c, k in zip(self.comm, self.close, strict=True)]


def _events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def fed_transfer(
    spec: str,
    transport: str,
    reps: int,
    workdir: Path,
    *,
    collaborators: int = 1,
    chunk_size: int | None = None,
    patches: Sequence[str] = (),
    timeout: float = 600,
    warmup: int = 1,
    rss_timeline: bool = False,
    compression: str = "none",
    federation: dict[str, Any] | None = None,
    workload: dict[str, Any] | None = None,
) -> FedResult:
    """Run ``warmup`` + ``reps`` rounds of a no-training federation; the collaborators' spans
    per measured round. ``rss_timeline``: the aggregator also samples its RSS every 5 ms (a
    thread that costs it some CPU and GIL hand-offs, so only scale.py asks for it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"col{i + 1}" for i in range(collaborators)]
    tls = pki_for(workdir / "pki", names) if transport != "none" else None
    import yaml

    plan = bench_plan(
        spec, transport, reps + warmup, names, tls, chunk_size, compression, federation, workload
    )
    plan_path = workdir / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(plan), encoding="utf-8")
    run_dir = workdir / "run"
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    common = ["--plan", str(plan_path), "--run-dir", str(run_dir), "--spec", spec]
    for p in patches:
        common += ["--patch", p]
    agg_argv = [PY, str(HERE / "_common.py"), "agg", *common, "--port-file", str(port_file)]
    if rss_timeline:
        agg_argv.append("--rss-timeline")
    t0 = time.monotonic()
    log = open(workdir / "agg.log", "wb")  # noqa: SIM115
    with contextlib.ExitStack() as stack:
        stack.callback(log.close)
        agg = stack.enter_context(child(agg_argv, timeout, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            if agg.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aggregator did not start: {(workdir / 'agg.log').read_text()}")
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        cols = []
        for name in names:
            argv = [PY, str(HERE / "_common.py"), "col", *common, "--name", name]
            argv += ["--address", address]
            clog = open(workdir / f"{name}.log", "wb")  # noqa: SIM115
            stack.callback(clog.close)
            cols.append(stack.enter_context(child(argv, timeout, stdout=clog, stderr=clog)))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in (agg, *cols)]
            if all(c == 0 for c in codes):
                break
            if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                logs = "\n".join(
                    f"-- {f.name}:\n{f.read_text(errors='replace')[-2000:]}"
                    for f in sorted(workdir.glob("*.log"))
                )
                raise RuntimeError(f"federation failed (exit codes {codes}):\n{logs}")
            time.sleep(0.05)
    wall = time.monotonic() - t0
    # the aggregator acknowledges the last update before it closes the round
    return _collect(run_dir, names, wall, False, warmup)


def _collect(
    run_dir: Path, names: list[str], wall: float, closing_in_ack: bool, warmup: int
) -> FedResult:
    agg = _events(run_dir / "events" / "aggregator.jsonl")
    closing: dict[int, float] = {}
    for e in agg:
        if (
            e.get("type") == "span"
            and e["round"]
            and (e["phase"] == "checkpoint" or (e["phase"] == "aggregate" and e.get("final")))
        ):
            closing[e["round"]] = closing.get(e["round"], 0.0) + e["t_end"] - e["t_start"]
    rounds_t = {}
    for e in agg:
        if e.get("type") == "info" and e.get("what") == "round_closed":
            rounds_t[e["round"]] = e["t"]
    res = FedResult(wall=wall)
    stats_file = run_dir / "agg_stats.json"
    if stats_file.exists():
        stats = json.loads(stats_file.read_text())
        res.agg_peak_rss = int(stats["peak_rss"])
        res.agg_base_rss = int(stats["base_rss"])
        res.agg_pre_model_rss = int(stats.get("pre_model_rss", 0))
    for name in names:
        col_file = run_dir / f"col_stats-{name}.json"
        if col_file.exists():
            c = json.loads(col_file.read_text())
            res.col_rss[name] = (int(c["pre_model_rss"]), int(c["peak_rss"]))
    last_upload_end: dict[int, float] = {}
    per_round: dict[int, dict[str, list[float]]] = {}
    for name in names:
        for e in _events(run_dir / "events" / f"collaborator-{name}.jsonl"):
            if e.get("type") != "span" or not e.get("round"):
                continue
            r = e["round"]
            d = per_round.setdefault(r, {"download": [], "upload": [], "up_end": []})
            if e["phase"] in ("download", "upload"):
                d[e["phase"]].append(e["t_end"] - e["t_start"])
                if e["phase"] == "download":
                    res.bytes = max(res.bytes, e["bytes"])
            if e["phase"] == "upload":
                last_upload_end[r] = max(last_upload_end.get(r, 0.0), e["t_end"])
    measured = sorted(per_round)[warmup:]
    first = measured[0] if measured else 0
    procs = [("agg", agg)] + [
        ("col", _events(run_dir / "events" / f"collaborator-{n}.jsonl")) for n in names
    ]
    for who, evs in procs:
        for e in evs:
            if e.get("type") == "span" and (e.get("round") or 0) >= first > 0:
                key = f"{who}:{e['phase']}" + (":close" if e.get("final") else "")
                res.spans.setdefault(key, []).append(e["t_end"] - e["t_start"])
    for r in measured:
        d = per_round[r]
        res.download.append(median(d["download"]))
        res.upload.append(median(d["upload"]))
        # with one collaborator its upload is always the round's last, whose ack waits for the
        # round to close; with several, the median collaborator's upload does not
        last = len(names) == 1 and closing_in_ack
        res.close.append(closing.get(r, 0.0) if last else 0.0)
    opened = {r + 1: t for r, t in rounds_t.items()}
    for r in measured:
        if r in opened and r in rounds_t:
            res.rounds.append(rounds_t[r] - opened[r])
    return res


# -- child: aggregator -------------------------------------------------------------------------
def _apply_patches(patches: list[str]) -> None:
    """Candidate changes, applied in the child only, so their effect can be measured before
    anyone edits the code (see docs/benchmarks.md). The earlier `ack-first` and
    `zero-copy-receive` candidates were measured this way and are now part of the aggregator."""
    from teefl.server import aggregator as agg_mod
    from teefl.server import checkpointer as ckpt_mod

    for p in patches:
        if p.startswith("grpc:"):
            # extra gRPC channel/server options "grpc:name=value,name=value" (tuning experiments)
            from teefl.transport import channels

            extra = []
            for item in p.removeprefix("grpc:").split(","):
                key, _, val = item.partition("=")
                extra.append((key, int(val) if val.lstrip("-").isdigit() else val))
            for mod in (channels, agg_mod):
                for fn in ("server_options", "channel_options"):
                    if hasattr(mod, fn):
                        orig_fn = getattr(mod, fn)
                        setattr(mod, fn, lambda plan, _f=orig_fn, _x=extra: [*_f(plan), *_x])
        elif p == "no-checkpoint":
            # a diagnostic, not a candidate: how much the background per-round checkpoint
            # costs the transfers of a loop without training (docs/benchmarks.md)
            def no_checkpoint(self, rnd, *a, **k):
                self.store.drop_updates(rnd)

            ckpt_mod.Checkpointer.write = no_checkpoint
        elif p == "disk-staging":
            # the path before shared-memory staging (plan federation.update_staging: disk):
            # each received piece written to the run directory before the ack
            agg_mod.open_staging = lambda plan, directory: None
        else:
            raise SystemExit(f"unknown patch {p!r}")


def _agg_main(args: argparse.Namespace) -> None:
    import resource
    import threading

    from teefl.measure.events import EventRecorder
    from teefl.measure.host import tune_malloc
    from teefl.plan import load_plan, require_transport
    from teefl.server.aggregator import Aggregator

    tune_malloc()  # as `teefl aggregator` does
    _apply_patches(args.patch)
    plan = load_plan(args.plan)
    require_transport(plan)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = EventRecorder(run_dir, "bench", "aggregator", "aggregator")
    t_start = time.monotonic()
    pre_model_rss = _rss()
    agg = Aggregator(plan, run_dir, "bench", rec)  # the noop workload builds the spec's model
    import gc

    gc.collect()
    base_rss = _rss()
    # the kernel tracks the peak itself (no sampling thread in the measured process, and no
    # spike shorter than a sampling period missed): reset it to now, read it at the end
    kernel_peak = _reset_peak()
    peak = [base_rss]
    stop = threading.Event()

    timeline: list[tuple[float, int]] = []  # (monotonic s, RSS) whenever it moved by >= 1 MiB

    def sample():
        last = 0
        while not stop.wait(0.005):
            rss = _rss()
            peak[0] = max(peak[0], rss)
            if abs(rss - last) >= 1 << 20:
                timeline.append((time.monotonic(), rss))
                last = rss

    if args.rss_timeline or not kernel_peak:
        threading.Thread(target=sample, daemon=True).start()
    try:
        agg.serve("127.0.0.1", 0, Path(args.port_file), t_start)
    finally:
        stop.set()
        rec.close()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if kernel_peak:
            peak[0] = max(peak[0], _status_kib("VmHWM") * 1024)
        (run_dir / "agg_stats.json").write_text(
            json.dumps(
                {
                    "pre_model_rss": pre_model_rss,
                    "base_rss": base_rss,
                    "peak_rss": peak[0],
                    "peak_from": "kernel (VmHWM)" if kernel_peak else "5 ms samples",
                    "ru_maxrss": maxrss,
                    "model_bytes": len(agg.payload),
                    "rss_timeline": timeline,
                }
            )
        )


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- child: collaborator -----------------------------------------------------------------------
def _col_main(args: argparse.Namespace) -> None:
    from teefl.client.collaborator import Collaborator
    from teefl.plan import load_plan, require_transport

    _apply_patches(args.patch)
    plan = load_plan(args.plan)
    require_transport(plan)
    import gc

    gc.collect()
    pre_model_rss = _rss()
    _reset_peak()
    Collaborator(plan, args.name, args.address, Path(args.run_dir)).run()  # the noop workload
    stats = {"pre_model_rss": pre_model_rss, "peak_rss": _status_kib("VmHWM") * 1024}
    (Path(args.run_dir) / f"col_stats-{args.name}.json").write_text(json.dumps(stats))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    raw = sub.add_parser("raw-server")
    raw.add_argument("--cert")
    raw.add_argument("--key")
    raw.add_argument("--stream", action="store_true")
    for name in ("agg", "col"):
        p = sub.add_parser(name)
        p.add_argument("--plan", required=True)
        p.add_argument("--run-dir", required=True)
        p.add_argument("--spec", required=True)
        p.add_argument("--patch", action="append", default=[])
        p.add_argument("--port-file")
        p.add_argument("--rss-timeline", action="store_true")
        p.add_argument("--name")
        p.add_argument("--address")
    args = ap.parse_args(argv)
    if args.cmd == "raw-server":
        _raw_server(args)
    elif args.cmd == "agg":
        _agg_main(args)
    else:
        _col_main(args)


def scratch(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"teefl-{prefix}-")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
