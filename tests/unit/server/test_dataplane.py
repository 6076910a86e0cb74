"""The data plane (model and updates over one TCP/TLS socket): framing, receiving at every
chunk boundary, the checks before any model byte flows, and what a refused or broken upload
leaves behind (nothing)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from fedutil import SYNTHETIC, join_request
from fedutil import FakeContext as _Ctx
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.security import certificates, pki
from teefl.server.aggregator import Aggregator
from teefl.store.files import BufferPool
from teefl.store.rounds import RoundStore
from teefl.transport import framing, socket_client
from teefl.wire import assembly, codec, teefl_pb2


# -- framing and receiving -----------------------------------------------------------------------
def test_frames_round_trip_and_garbage_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        framing.send_frame(a, framing.GET, b"hello")
        framing.send_frame(a, framing.OK)
        assert framing.recv_frame(b) == (framing.GET, b"hello")
        assert framing.recv_frame(b) == (framing.OK, b"")
        framing.send_error(a, "FAILED_PRECONDITION", "round 3 is not open")
        with pytest.raises(framing.RemoteError) as err:
            framing.expect(b, framing.MODEL)
        assert err.value.code == "FAILED_PRECONDITION"
        framing.send_frame(a, framing.OK)
        with pytest.raises(framing.Closed, match="unexpected frame"):
            framing.expect(b, framing.MODEL)
    for garbage in (
        b"\x63" + (5).to_bytes(4, "little") + b"abcde",  # unknown kind
        bytes([framing.PUT]) + (framing.MAX_FRAME + 1).to_bytes(4, "little"),  # too big
    ):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(garbage)
            with pytest.raises(framing.Closed, match="not a teefl peer"):
                framing.recv_frame(b)
    a, b = socket.socketpair()
    with b:
        a.sendall(bytes([framing.ACK]))  # a header cut short
        a.close()
        with pytest.raises(framing.Closed, match="closed"):
            framing.recv_frame(b)


class _Trickle:
    """A recv_into that hands out at most ``sizes[i]`` bytes per call, cycling."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos, self.calls = data, sizes, 0, 0

    def __call__(self, view: memoryview) -> int:
        n = min(len(view), self.sizes[self.calls % len(self.sizes)], len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        self.calls += 1
        return n


@pytest.mark.parametrize("check", codec.CHECKS)
@pytest.mark.parametrize("sizes", [[1], [7, 1, 300], [4096], [1 << 20]])
@pytest.mark.parametrize("step", [1, 3, 1000, 1 << 22])
def test_receive_at_every_boundary(check: str, sizes: list[int], step: int) -> None:
    data = os.urandom(5000)
    asm = assembly.Assembler(
        len(data), codec.sha256(data), 1 << 20, check=check, expected_crc32c=codec.crc32c(data)
    )
    ticks = []
    asm.receive(_Trickle(data, sizes), step, lambda: ticks.append(asm.filled))
    assert bytes(asm.finish()) == data
    assert ticks[-1] == len(data) and ticks == sorted(ticks)
    assert len(ticks) == -(-len(data) // step)


@pytest.mark.parametrize("check", ["crc32c", "sha256"])
def test_receive_detects_corruption_and_truncation(check: str) -> None:
    data = os.urandom(3000)
    bad = bytearray(data)
    bad[1234] ^= 0x10
    asm = assembly.Assembler(
        len(data), codec.sha256(data), 1 << 20, check=check, expected_crc32c=codec.crc32c(data)
    )
    asm.receive(_Trickle(bytes(bad), [512]), 1000, None)
    with pytest.raises(codec.PayloadError, match="corrupted in transit"):
        asm.finish()
    asm = assembly.Assembler(len(data), codec.sha256(data), 1 << 20, check=check, expected_crc32c=1)
    with pytest.raises(codec.PayloadError, match="truncated"):
        asm.receive(_Trickle(data[:2000], [512]), 1000, None)


def test_crc_check_needs_a_crc_and_buffer_must_fit() -> None:
    with pytest.raises(codec.PayloadError, match="no CRC32C"):
        assembly.Assembler(10, b"x" * 32, 100, check="crc32c")
    with pytest.raises(ValueError, match="announced size"):
        assembly.Assembler(10, b"x" * 32, 100, check="none", buffer=bytearray(9))
    with pytest.raises(codec.PayloadError, match="exceeds limit"):
        assembly.Assembler.check_announced(101, b"x" * 32, 100)


def test_crc32c_is_the_castagnoli_checksum() -> None:
    assert codec.crc32c(b"123456789") == 0xE3069283  # the standard check value


# -- the update file -----------------------------------------------------------------------------
def test_update_file_commits_in_place_and_spares_are_reused(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    data = os.urandom(4096)
    f = store.open_update(1, "col1", bytearray(len(data)))
    assert f is not None
    f.buffer[:] = data  # filled without the sink: commit writes it
    f.commit({"samples": 3}, {"sha256": codec.sha256(data)}, verified=True)
    [saved] = store.load_updates(1)
    assert saved.payload == data and saved.meta["samples"] == 3
    inode = (tmp_path / "updates/round-0001/col1.safetensors").stat().st_ino
    store.drop_updates(1)
    assert not (tmp_path / "updates/round-0001").exists()
    g = store.open_update(2, "col1", bytearray(len(data)))  # the dropped file, overwritten
    assert g is not None
    g.buffer[:] = data[::-1]
    g.commit({"samples": 1}, {"crc32c": codec.crc32c(data[::-1])}, verified=True)
    assert (tmp_path / "updates/round-0002/col1.safetensors").stat().st_ino == inode
    assert store.load_updates(2)[0].payload == data[::-1]
    h = store.open_update(3, "col2", bytearray(100))
    assert h is not None
    h.abort()
    assert not list((tmp_path / "updates/round-0003").iterdir())


@pytest.mark.parametrize("cut", [0, 1, 4095, 4096, 4097, 9999])
def test_update_file_is_written_while_received(tmp_path: Path, cut: int) -> None:
    """The assembler's sink writes every piece through, in order, at every boundary; a
    shorter spare file is extended and a longer one cut to the update's size."""
    store = RoundStore(tmp_path)
    spare = tmp_path / "updates/spare"
    spare.mkdir(parents=True)
    (spare / "col1.safetensors").write_bytes(b"x" * 20000)  # longer than the update
    data = os.urandom(10000)
    f = store.open_update(1, "col1", bytearray(len(data)))
    assert f is not None
    asm = assembly.Assembler(
        len(data),
        b"",
        1 << 20,
        check="crc32c",
        expected_crc32c=codec.crc32c(data),
        buffer=f.buffer,
        sink=f.write,
    )
    asm.add(data[:cut])
    pos = cut

    def recv(view: memoryview) -> int:  # a socket handing out at most 3000 bytes per call
        nonlocal pos
        piece = data[pos : pos + min(len(view), 3000)]
        view[: len(piece)] = piece
        pos += len(piece)
        return len(piece)

    asm.receive(recv, 4096, None)
    asm.finish()
    assert f.written == len(data)
    f.commit({"samples": 1}, {"crc32c": codec.crc32c(data)}, verified=True)
    assert (tmp_path / "updates/round-0001/col1.safetensors").read_bytes() == data
    g = store.open_update(2, "col1", bytearray(10))
    assert g is not None
    with pytest.raises(ValueError, match="expected"):
        g.write(memoryview(b"ab"), 5)  # out of order: refused, never a hole in the file
    g.abort()


def test_buffer_pool_reuses_and_bounds_its_buffers() -> None:
    pool = BufferPool(keep=2)
    a, b, c = pool.take(10), pool.take(10), pool.take(10)
    assert len({id(a), id(b), id(c)}) == 3
    for buf in (a, b, c):
        pool.give(buf)
    assert len(pool.free) == 2  # no more than keep are held
    got = pool.take(10)
    assert got is b or got is c
    assert len(pool.take(20)) == 20  # another size: a new one


def test_unverified_update_with_a_false_digest_is_dropped_on_replay(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    data = os.urandom(100)
    store.save_update(1, "col1", data, {"samples": 1}, {"crc32c": 7}, verified=False)
    store.save_update(1, "col3", data, {"samples": 1}, {"sha256": b"\0" * 32}, verified=False)
    assert store.load_updates(1) == []  # the senders' claims were false: not trusted
    assert not list((tmp_path / "updates/round-0001").iterdir())
    store.save_update(1, "col2", data, {"samples": 1}, {"sha256": b"\0" * 32}, verified=True)
    with pytest.raises(Exception, match="fails its checksum"):
        store.load_updates(1)


def test_sealed_storage_receives_into_memory(tmp_path: Path) -> None:
    assert RoundStore(tmp_path, seal_key=b"k" * 32).open_update(1, "col1", bytearray(9)) is None
    assert RoundStore(tmp_path).open_update(1, "col1", bytearray()) is None


# -- against a real aggregator -------------------------------------------------------------------
@pytest.fixture(params=["memory", "disk"])
def served(tmp_path, request):
    """An aggregator with its data plane on loopback (no gRPC server: Join is called directly),
    staging updates in shared memory (a folder of the test's own) or writing them to disk."""
    fed = {"update_staging": request.param, "staging_dir": str(tmp_path / "shm")}
    plan = plan_from_dict({**SYNTHETIC, "collaborators": ["col1", "col2"], "federation": fed})
    run = tmp_path / "run"
    agg = Aggregator(plan, run, "dp", EventRecorder(run, "dp", "aggregator", "agg"))
    assert (agg.staging is not None) == (request.param == "memory")
    server = agg.data_server("127.0.0.1")
    assert server is not None
    yield agg
    _wait(lambda: agg.rounds.adding == 0)  # an acknowledged update is moved to disk after the ack
    server.stop()
    if agg.staging is not None:
        agg.staging.close()
        assert not list((tmp_path / "shm").rglob("*.*")), "a staged file was left behind"


def _join(agg: Aggregator, name: str) -> bytes:
    reply = agg.grpc.Join(join_request(agg.plan, name), _Ctx())
    assert reply.data_port == agg.data_port and len(reply.session_token) == 32
    return reply.session_token


def _connect(agg: Aggregator, name: str, token: bytes):
    return socket_client.connect("127.0.0.1", agg.data_port, name, token, None)


def _header(agg: Aggregator, name: str, payload, **kw) -> teefl_pb2.Header:
    return teefl_pb2.Header(
        collaborator=name,
        round=kw.pop("round", 1),
        total_size=len(payload),
        sha256=codec.sha256(payload),
        crc32c=codec.crc32c(payload),
        num_samples=10,
        format=codec.FORMAT,
        **kw,
    )


def _put(sock, header: teefl_pb2.Header, payload) -> teefl_pb2.UpdateAck:
    framing.send_frame(sock, framing.PUT, header.SerializeToString())
    framing.expect(sock, framing.GO)
    framing.send_payload(sock, payload)
    return teefl_pb2.UpdateAck.FromString(framing.expect(sock, framing.ACK))


def _files(agg: Aggregator) -> list[str]:
    """The update files in the run directory, and any update staged in shared memory."""
    d = agg.run_dir / "updates"
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if d.exists() else []
    if agg.staging is not None:  # free slots are named *-slot-N, staged updates *.safetensors
        files += sorted(f"staged:{p.name}" for p in agg.staging.directory.glob("*.*"))
    return files


def test_connection_needs_the_token_of_the_latest_join(served: Aggregator) -> None:
    with pytest.raises(framing.RemoteError, match="Join first") as err:
        _connect(served, "col1", b"\0" * 32)  # never joined
    assert err.value.code == "UNAUTHENTICATED"
    old = _join(served, "col1")
    new = _join(served, "col1")
    with pytest.raises(framing.RemoteError, match="outdated"):
        _connect(served, "col1", old)
    with pytest.raises(framing.RemoteError, match="not a collaborator") as err:
        _connect(served, "mallory", new)
    assert err.value.code == "PERMISSION_DENIED"
    with pytest.raises(framing.RemoteError, match="outdated"):
        _connect(served, "col2", new)  # col1's token does not open col2's connection
    _connect(served, "col1", new).close()


def test_download_is_the_published_payload(served: Aggregator) -> None:
    sock = _connect(served, "col1", _join(served, "col1"))
    with sock:
        req = teefl_pb2.ModelRequest(collaborator="col1", round=1)
        framing.send_frame(sock, framing.GET, req.SerializeToString())
        h = teefl_pb2.Header.FromString(framing.expect(sock, framing.MODEL))
        assert h.sha256 == b""  # payload_check auto: nobody checks a SHA-256, none is made
        asm = assembly.Assembler(
            h.total_size, h.sha256, 1 << 30, check="crc32c", expected_crc32c=h.crc32c
        )
        asm.receive(framing.reader(sock), 4096, None)
        assert bytes(asm.finish()) == bytes(served.payload)
        assert h.crc32c == codec.crc32c(served.payload)
        req.round = 2  # not open yet: refused, and the connection stays usable
        framing.send_frame(sock, framing.GET, req.SerializeToString())
        with pytest.raises(framing.RemoteError, match="not open") as err:
            framing.expect(sock, framing.MODEL)
        assert err.value.code == "FAILED_PRECONDITION"
        req.round = 1
        framing.send_frame(sock, framing.GET, req.SerializeToString())
        h = teefl_pb2.Header.FromString(framing.expect(sock, framing.MODEL))
        assert h.total_size == len(served.payload)


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_upload_is_stored_counted_and_summed_then_duplicates_are_not(served: Aggregator) -> None:
    state = {k: v + 1 if v.is_floating_point() else v for k, v in served.global_state.items()}
    payload = codec.encode_state(state)
    with _connect(served, "col1", _join(served, "col1")) as sock:
        ack = _put(sock, _header(served, "col1", payload), payload)
        assert ack.accepted and ack.message == "accepted"
        assert "col1" in served.received
        _wait(lambda: served.rounds.adding == 0 and served.model.fedavg.count == 1)
        assert _files(served) == ["round-0001/col1.json", "round-0001/col1.safetensors"]
        stored = (served.run_dir / "updates/round-0001/col1.safetensors").read_bytes()
        assert stored == bytes(payload)
        # a second upload of the same round is answered at once, without its data
        framing.send_frame(sock, framing.PUT, _header(served, "col1", payload).SerializeToString())
        dup = teefl_pb2.UpdateAck.FromString(framing.expect(sock, framing.ACK))
        assert dup.accepted and "already counted" in dup.message
    assert served.model.fedavg.count == 1


@pytest.mark.parametrize("fault", ["corrupt", "nan", "size", "stale", "evaluate_only"])
def test_refused_upload_leaves_nothing_and_the_connection_in_step(
    served: Aggregator, fault: str
) -> None:
    state = {k: v.clone() for k, v in served.global_state.items()}
    if fault == "nan":
        next(v for v in state.values() if v.is_floating_point()).view(-1)[3] = float("nan")
    payload = codec.encode_state(state)
    header = _header(served, "col1", payload)
    if fault == "corrupt":
        header.crc32c ^= 1
    elif fault == "size":
        header.total_size = served.publisher.update_limit + 1
    elif fault == "stale":
        header.round = 7
    elif fault == "evaluate_only":
        header.evaluate_only = True
    with _connect(served, "col1", _join(served, "col1")) as sock:
        framing.send_frame(sock, framing.PUT, header.SerializeToString())
        with pytest.raises(framing.RemoteError) as err:
            if framing.expect(sock, framing.GO) == b"":
                framing.send_payload(sock, payload)
                framing.expect(sock, framing.ACK)
        expected = {
            "corrupt": "CRC32C",
            "nan": "NaN",
            "size": "exceeds limit",
            "stale": "not open",
            "evaluate_only": "gRPC",
        }[fault]
        assert expected in err.value.message
        assert err.value.code == ("FAILED_PRECONDITION" if fault == "stale" else "INVALID_ARGUMENT")
        assert "col1" not in served.received and _files(served) == []
        good = codec.encode_state(served.global_state)  # the same connection still works
        assert _put(sock, _header(served, "col1", good), good).accepted


def test_upload_broken_mid_stream_is_discarded(served: Aggregator) -> None:
    payload = codec.encode_state(served.global_state)
    sock = _connect(served, "col1", _join(served, "col1"))
    framing.send_frame(sock, framing.PUT, _header(served, "col1", payload).SerializeToString())
    framing.expect(sock, framing.GO)
    sock.sendall(memoryview(payload)[: len(payload) // 2])
    sock.close()
    _wait(lambda: not served.rounds.inflight)
    assert "col1" not in served.received and _files(served) == []
    events = (served.run_dir / "events").rglob("*.jsonl")
    assert any("update_broken" in p.read_text() for p in events)


def test_round_closes_only_after_the_deferred_adds(served: Aggregator) -> None:
    payloads = {}
    for i, name in enumerate(("col1", "col2")):
        st = {k: v + i if v.is_floating_point() else v for k, v in served.global_state.items()}
        payloads[name] = (st, codec.encode_state(st))
    socks = {n: _connect(served, n, _join(served, n)) for n in payloads}
    threads = [
        threading.Thread(target=_put, args=(socks[n], _header(served, n, p), p))
        for n, (_, p) in payloads.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    _wait(lambda: served.round == 2)
    for name, t in served.global_state.items():  # the mean of +0 and +1 (equal weights)
        ref = payloads["col1"][0][name]
        if ref.is_floating_point():
            torch.testing.assert_close(t, ref + 0.5)
    for s in socks.values():
        s.close()


# -- TLS: the collaborator's certificate and the attested key -----------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue_aggregator(d, ["127.0.0.1"])
    for name in ("col1", "col2"):
        pki.issue_collaborator(d, name)
    return d


def test_mtls_data_connection_needs_the_collaborators_own_certificate(tmp_path, certs) -> None:
    server_cert, server_key = certificates.aggregator_paths(certs)
    plan = plan_from_dict(
        {
            **SYNTHETIC,
            "collaborators": ["col1", "col2"],
            "security": {
                "transport": "mtls",
                "tls": {
                    "ca": str(certs / "ca.crt"),
                    "server_cert": str(server_cert),
                    "server_key": str(server_key),
                    "client_dir": str(certs),
                },
            },
        }
    )
    agg = Aggregator(plan, tmp_path, "dp", EventRecorder(tmp_path, "dp", "aggregator", "agg"))
    server = agg.data_server("127.0.0.1")
    try:
        token = agg.identity.open_session("col1").token  # as Join would (its gRPC CN check aside)
        col2 = framing.client_context(
            certs / "ca.crt", *certificates.collaborator_paths(certs, "col2")
        )
        with pytest.raises(framing.RemoteError, match="does not match") as err:
            socket_client.connect("127.0.0.1", agg.data_port, "col1", token, col2)
        assert err.value.code == "PERMISSION_DENIED"
        no_cert = framing.client_context(certs / "ca.crt", None, None)
        with pytest.raises((framing.Closed, ConnectionError, OSError)):
            s = socket_client.connect("127.0.0.1", agg.data_port, "col1", token, no_cert)
            framing.recv_frame(s)  # TLS 1.3 reports a refused client certificate late
        col1 = framing.client_context(
            certs / "ca.crt", *certificates.collaborator_paths(certs, "col1")
        )
        with pytest.raises(Exception, match="attestation was bound to"):
            socket_client.connect(
                "127.0.0.1", agg.data_port, "col1", token, col1, expected_spki=b"another key"
            )
        socket_client.connect("127.0.0.1", agg.data_port, "col1", token, col1).close()
    finally:
        server.stop()


def test_payload_check_sha256_is_enforced_end_to_end(tmp_path: Path) -> None:
    plan = plan_from_dict({**SYNTHETIC, "network": {"payload_check": "sha256"}})
    agg = Aggregator(plan, tmp_path, "dp", EventRecorder(tmp_path, "dp", "aggregator", "agg"))
    assert agg.publisher.digest == codec.sha256(agg.payload)  # published: collaborators check it
    server = agg.data_server("127.0.0.1")
    try:
        with _connect(agg, "col1", _join(agg, "col1")) as sock:
            payload = codec.encode_state(agg.global_state)
            header = _header(agg, "col1", payload)
            header.sha256 = b"\1" * 32  # the CRC32C is right: only the SHA-256 can catch it
            framing.send_frame(sock, framing.PUT, header.SerializeToString())
            framing.expect(sock, framing.GO)
            framing.send_payload(sock, payload)
            with pytest.raises(framing.RemoteError, match="SHA-256"):
                framing.expect(sock, framing.ACK)
            header.sha256 = b""
            framing.send_frame(sock, framing.PUT, header.SerializeToString())
            with pytest.raises(framing.RemoteError, match="no valid SHA-256"):
                framing.expect(sock, framing.GO)
            assert _put(sock, _header(agg, "col1", payload), payload).accepted
        meta = (tmp_path / "updates/round-0001/col1.json").read_text()
        assert '"sha256"' in meta and '"verified": true' in meta
    finally:
        server.stop()


def test_sha256_may_be_left_out_only_where_nobody_checks_it() -> None:
    for check in ("none", "crc32c"):
        assembly.Assembler.check_announced(10, b"", 100, check)
        with pytest.raises(codec.PayloadError):
            assembly.Assembler.check_announced(10, b"short", 100, check)
    with pytest.raises(codec.PayloadError, match="no valid SHA-256"):
        assembly.Assembler.check_announced(10, b"", 100, "sha256")


def test_update_of_the_models_layout_is_summed_flat_and_others_per_tensor(
    served: Aggregator,
) -> None:
    from teefl.wire.checks import FlatUpdate, UpdateRejected

    def decoded(state):
        payload = codec.encode_state(state)
        asm = assembly.Assembler(len(payload), b"", 1 << 30, check="none")
        asm.add(payload)
        return served.model.decode_update(asm.finish())[1]

    same = {k: v + 1 if v.is_floating_point() else v for k, v in served.global_state.items()}
    assert isinstance(decoded(same), FlatUpdate)
    nan = {k: v.clone() for k, v in served.global_state.items()}
    name = next(k for k, v in nan.items() if v.is_floating_point())
    nan[name].view(-1)[0] = float("nan")
    with pytest.raises(UpdateRejected, match=f"{name}.*NaN"):  # the exact check names it
        decoded(nan)
    extra = dict(same, extra=torch.zeros(1))
    with pytest.raises(UpdateRejected, match="unknown tensors"):
        decoded(extra)
    # both kinds sum into the same FedAvg: the mean of +1 and +3 is +2
    served.model.fedavg.add(decoded(same), 1, checked=True)
    ref = served.global_state
    served.model.fedavg.add({k: v + 3 if v.is_floating_point() else v for k, v in ref.items()}, 1)
    mean = served.model.fedavg.result()
    for k, v in ref.items():
        want = v + 2 if v.is_floating_point() else v
        assert torch.allclose(mean[k], want), k
