"""A fair share for every member: one party -- buggy or hostile, holding a member's valid name
and token -- cannot delay the others' uploads, downloads or Join, cannot have a slow upload of
its own cut for being slow, and cannot grow the aggregator's threads or memory without bound.

Each acceptance test runs a real `teefl aggregator`, ``col1`` misbehaving through raw
connections beside a legitimate ``col2``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from rawpeer import Aggregator, update_header
from teefl.server.fairshare import FairShare, Superseded
from teefl.transport import framing
from teefl.wire import teefl_pb2


# -- the primitive -------------------------------------------------------------------------------
class _Cut:
    def __init__(self) -> None:
        self.called = threading.Event()

    def __call__(self) -> None:
        self.called.set()


def _acquire_async(share: FairShare, member: str, cut: _Cut) -> tuple[threading.Thread, list]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(share.acquire(member, cut))
        except Superseded as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_one_member_holds_at_most_its_share() -> None:
    share = FairShare(3)
    cut_a1 = _Cut()
    a1 = share.acquire("a", cut_a1)
    t, out = _acquire_async(share, "a", _Cut())  # a's second: a's first is cancelled
    assert cut_a1.called.wait(5)
    t.join(0.2)
    assert not out and share.holders("a") == 1, "a member got a second slot"
    b, c = share.acquire("b", _Cut()), share.acquire("c", _Cut())  # the others: at once
    assert share.held == 3
    share.release(a1)  # a's first has unwound: its newer request gets the slot
    t.join(5)
    assert out and out[0].held and share.holders("a") == 1
    for ticket in (out[0], b, c):
        share.release(ticket)
    assert share.held == 0 and share.peak == 3


def test_a_newer_request_supersedes_the_older_holder_and_waiter() -> None:
    share = FairShare(1)
    cut_a = _Cut()
    a = share.acquire("a", cut_a)
    tb, out_b = _acquire_async(share, "b", _Cut())  # waits: the only slot is a's
    _until(lambda: len(share._queue) == 1)
    tb2, out_b2 = _acquire_async(share, "b", _Cut())  # b's newer one: b's waiting one gives up
    tb.join(5)
    assert isinstance(out_b[0], Superseded) and not cut_a.called.is_set()
    ta, out_a = _acquire_async(share, "a", _Cut())  # a's newer one: a's holder is cancelled
    assert cut_a.called.wait(5)
    _until(lambda: len(share._queue) == 2)
    share.release(a)
    tb2.join(5)  # arrival order: b's newer request was waiting before a's second
    assert out_b2 and out_b2[0].held and not out_a
    share.release(out_b2[0])
    ta.join(5)
    assert out_a[0].held
    share.release(out_a[0])
    share.release(out_a[0])  # idempotent
    assert share.held == 0


# -- acceptance: a real aggregator, col1 misbehaving beside col2 ---------------------------------
@pytest.fixture
def small(tmp_path: Path):
    agg = Aggregator(tmp_path, federation={"idle_timeout": 60})
    yield agg
    agg.stop()


def _stall_uploads(agg: Aggregator, token: bytes, payload_size: int, n: int = 4) -> list:
    """``n`` connections of col1, each sending a PUT header and, once it gets GO, nothing."""
    socks = []
    header = update_header("col1", b"\0" * payload_size).SerializeToString()
    for _ in range(n):
        s = agg.connect("col1", token)
        framing.send_frame(s, framing.PUT, header)
        socks.append(s)
    time.sleep(1.0)  # every one that will get GO has it
    return socks


def _time_to_go(agg: Aggregator, token: bytes, payload: bytes) -> tuple[float, Any]:
    s = agg.connect("col2", token)
    framing.send_frame(s, framing.PUT, update_header("col2", payload).SerializeToString())
    t0 = time.monotonic()
    framing.expect(s, framing.GO)
    return time.monotonic() - t0, s


def test_stalled_uploads_of_one_member_do_not_delay_anothers_go(small: Aggregator) -> None:
    """22.6: 4 stalled uploads (= max_inflight_updates) of col1 used to hold every receive slot
    until idle_timeout cut them (here 60 s)."""
    _, tok1 = small.join("col1")
    _, tok2 = small.join("col2")
    with small.connect("col2", tok2) as s:
        _, model = small.model(s)
    stalled = _stall_uploads(small, tok1, len(model))
    took, s = _time_to_go(small, tok2, model)
    with s:
        assert took < 1.0, f"col2 waited {took:.1f} s for GO"
        framing.send_payload(s, model)
        ack = teefl_pb2.UpdateAck.FromString(framing.expect(s, framing.ACK))
        assert ack.accepted and ack.message == "accepted"
    for x in stalled:
        x.close()
    assert "Traceback" not in small.log_text()


def test_a_members_long_polls_do_not_delay_a_join(small: Aggregator) -> None:
    """22.6: 16 long polls of col1 held every gRPC worker thread: a Join waited 14 s. Here col1
    keeps 16 polls going (each re-polls as soon as it returns, as a collaborator does)."""
    stop = threading.Event()
    stub, md = small.stub("col1"), small.md("col1")

    def poll() -> None:
        while not stop.is_set():
            try:
                stub.WaitRound(
                    teefl_pb2.WaitRequest(collaborator="col1", after_round=99), metadata=md
                )
            except grpc.RpcError:
                return

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(16)]
    for t in pollers:
        t.start()
    try:
        time.sleep(2.0)
        assert all(t.is_alive() for t in pollers), "the polls were refused, not held"
        joins = []
        for _ in range(3):
            t0 = time.monotonic()
            small.join("col2")
            joins.append(time.monotonic() - t0)
    finally:
        stop.set()
    assert max(joins) < 1.0, joins
    for t in pollers:
        t.join(20)  # the last poll returns within the 15 s keepalive


def test_a_slow_upload_is_not_cut(tmp_path: Path) -> None:
    """22.6: idle is "no byte moved for idle_timeout", however slowly bytes move: an upload
    at 100 KB/s used to be cut because progress was counted in 4 MiB pieces."""
    agg = Aggregator(tmp_path, federation={"idle_timeout": 1.5})
    try:
        _, token = agg.join("col1")
        with agg.connect("col1", token) as s:
            _, model = agg.model(s)
            framing.send_frame(s, framing.PUT, update_header("col1", model).SerializeToString())
            framing.expect(s, framing.GO)
            t0 = time.monotonic()
            step = 10_000  # 10 KB every 0.1 s: 100 KB/s
            for i in range(0, len(model), step):
                s.sendall(model[i : i + step])
                time.sleep(0.1)
            took = time.monotonic() - t0
            ack = teefl_pb2.UpdateAck.FromString(framing.expect(s, framing.ACK))
        assert ack.accepted, ack.message
        assert took > 4 * 1.5, took  # much longer than idle_timeout, bytes moving all along
        assert not any(e.get("what") == "upload_idle_cut" for e in agg.events())
    finally:
        agg.stop()


@pytest.fixture
def resnet(tmp_path: Path):
    """ResNet-18 (45 MB): a download far larger than what the kernel buffers for a reader that
    stops reading."""
    agg = Aggregator(tmp_path, model="resnet18", federation={"idle_timeout": 60})
    yield agg
    agg.stop()


def _stall_readers(agg: Aggregator, token: bytes, n: int = 4) -> list:
    """``n`` connections of col1, each asking for the model and reading nothing."""
    socks = []
    for _ in range(n):
        s = agg.connect("col1", token, rcvbuf=4096)
        req = teefl_pb2.ModelRequest(collaborator="col1", round=1)
        framing.send_frame(s, framing.GET, req.SerializeToString())
        socks.append(s)
    time.sleep(1.0)
    return socks


@pytest.mark.slow  # ResNet-18: a model larger than what the kernel buffers
def test_stalled_readers_of_one_member_do_not_delay_anothers_download(resnet: Aggregator) -> None:
    """22.6: 4 readers of col1 that stop reading (= max_concurrent_downloads) held every send
    slot: a legitimate ResNet-18 download got no answer until they were closed."""
    _, tok1 = resnet.join("col1")
    _, tok2 = resnet.join("col2")
    stalled = _stall_readers(resnet, tok1)
    with resnet.connect("col2", tok2) as s:
        req = teefl_pb2.ModelRequest(collaborator="col2", round=1)
        framing.send_frame(s, framing.GET, req.SerializeToString())
        t0 = time.monotonic()
        h = teefl_pb2.Header.FromString(framing.expect(s, framing.MODEL))
        started = time.monotonic() - t0
        buf = bytearray(h.total_size)
        framing.recv_exact(s, memoryview(buf))
    assert started < 1.0, f"the download started after {started:.1f} s"
    assert h.total_size > 40 << 20
    for x in stalled:
        x.close()


@pytest.mark.slow  # ResNet-18: a model larger than what the kernel buffers
def test_threads_and_memory_stay_bounded_under_attack(resnet: Aggregator) -> None:
    """All of it at once -- 300 unauthorised idle connections, col1's 4 stalled uploads, 4
    stalled readers and 16 long polls -- while col2 downloads and uploads ResNet-18: col2 is
    served at once and the aggregator's threads and memory stay bounded (the old aggregator:
    a thread per idle connection; 223 threads and +153 MB in the run that found it)."""
    _, tok1 = resnet.join("col1")
    _, tok2 = resnet.join("col2")
    with resnet.connect("col2", tok2) as s:  # the baseline includes one served download
        _, model = resnet.model(s)
    before = resnet.status()
    idle = []
    for _ in range(300):
        x = socket.socket()
        x.settimeout(10)
        x.connect(("127.0.0.1", resnet.data_port))
        idle.append(x)
    stop = threading.Event()
    stub, md = resnet.stub("col1"), resnet.md("col1")

    def poll() -> None:
        while not stop.is_set():
            try:
                stub.WaitRound(
                    teefl_pb2.WaitRequest(collaborator="col1", after_round=99), metadata=md
                )
            except grpc.RpcError:
                return

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(16)]
    for t in pollers:
        t.start()
    try:
        uploads = _stall_uploads(resnet, tok1, len(model))
        readers = _stall_readers(resnet, tok1)
        time.sleep(2.0)
        during = resnet.status()
        with resnet.connect("col2", tok2) as s:
            t0 = time.monotonic()
            _, got = resnet.model(s)
            download = time.monotonic() - t0
            assert got == model
        took, s = _time_to_go(resnet, tok2, model)
        with s:
            framing.send_payload(s, model)
            ack = teefl_pb2.UpdateAck.FromString(framing.expect(s, framing.ACK))
        after = resnet.status()
    finally:
        stop.set()
        for x in idle:
            x.close()
    print(
        "aggregator under attack:",
        json.dumps({"before": before, "during": during, "after": after}),
        f"col2 download {download:.2f} s, GO after {took:.2f} s",
    )
    assert ack.accepted, ack.message
    assert download < 5.0 and took < 1.0, (download, took)
    # threads: the gRPC pool (2 per member + 8, made on demand), col1's 2 data connections
    assert during["Threads"] <= before["Threads"] + 20, (before, during)
    # memory: one staged upload slot and socket buffers; no copy per stalled transfer
    grown_mb = (max(during["VmRSS"], after["VmRSS"]) - before["VmRSS"]) / 1024
    assert grown_mb < 200, f"resident memory grew by {grown_mb:.0f} MB"
    for x in [*uploads, *readers]:
        x.close()
    for t in pollers:
        t.join(20)
    assert "Traceback" not in resnet.log_text()
