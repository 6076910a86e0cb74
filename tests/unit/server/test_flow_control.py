"""The aggregator's memory bounds: pre-serialized download chunks, a bounded number of downloads
streaming at once, and uploads that send no data before they hold a receive slot."""

from __future__ import annotations

import threading

import pytest

from fedutil import SYNTHETIC, join_request, session_metadata
from fedutil import FakeContext as _Ctx
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.server.aggregator import Aggregator
from teefl.server.grpc_adapter import UPLOAD_GO, _chunk_to_wire
from teefl.transport.grpc_client import GrpcClient
from teefl.wire import codec, teefl_pb2


@pytest.fixture
def agg(tmp_path) -> Aggregator:
    plan = plan_from_dict(
        {
            **SYNTHETIC,
            "federation": {"rounds": 2, "max_concurrent_downloads": 2},
            # the gRPC streams carry model data only when the plan says so
            "network": {"chunk_size": 4096, "data_plane": "grpc"},
        }
    )
    agg = Aggregator(plan, tmp_path, "fc", EventRecorder(tmp_path, "fc", "aggregator", "agg"))
    # one session per member (the fair-share tests act as several)
    agg.mds = [session_metadata(agg.grpc.Join(join_request(plan, n), _Ctx())) for n in agg.names]
    agg.md = agg.mds[0]
    return agg


def _parse(messages: list) -> tuple[teefl_pb2.Header, bytes]:
    first = messages[0]
    assert isinstance(first, teefl_pb2.Chunk) and first.HasField("header")
    buf = bytearray()
    for raw in messages[1:]:
        chunk = teefl_pb2.Chunk.FromString(_chunk_to_wire(raw))
        assert chunk.offset == len(buf)
        buf += chunk.data
    return first.header, bytes(buf)


def test_download_stream_carries_exactly_the_published_payload(agg: Aggregator) -> None:
    ctx = _Ctx(md=agg.md)
    header, data = _parse(list(agg.grpc.GetModel(_request(agg), ctx)))
    assert data == bytes(agg.payload)
    assert header.total_size == len(agg.payload) and header.sha256 == agg.publisher.digest
    assert len(agg.publisher.wire_chunks) == -(-len(agg.payload) // 4096)  # one message per chunk
    state = codec.decode_state(data)
    assert state.keys() == agg.global_state.keys()
    for cb in ctx.callbacks:
        cb()


def test_chunk_serializer_passes_bytes_and_serializes_messages() -> None:
    msg = teefl_pb2.Chunk(data=b"abc", offset=7)
    assert _chunk_to_wire(msg) == msg.SerializeToString()
    raw = msg.SerializeToString()
    assert _chunk_to_wire(raw) is raw


def _request(agg: Aggregator, who: int = 0) -> teefl_pb2.ModelRequest:
    return teefl_pb2.ModelRequest(collaborator=agg.names[who], round=agg.round)


def test_download_slots_are_bounded_and_given_back_when_the_rpc_ends(agg: Aggregator) -> None:
    first, second = _Ctx(md=agg.mds[0]), _Ctx(md=agg.mds[1])
    agg.grpc.GetModel(_request(agg, 0), first)
    agg.grpc.GetModel(_request(agg, 1), second)  # both slots taken (max_concurrent_downloads: 2)
    third_done = threading.Event()

    def third() -> None:
        agg.grpc.GetModel(_request(agg, 2), _Ctx(md=agg.mds[2]))
        third_done.set()

    t = threading.Thread(target=third, daemon=True)
    t.start()
    assert not third_done.wait(0.3), "a third download streamed while two held the slots"
    for cb in first.callbacks:  # the first RPC ends (finished, cancelled or peer gone)
        cb()
    assert third_done.wait(5), "the slot was not given back when the RPC ended"
    t.join(5)


def test_a_slot_is_not_kept_for_an_rpc_that_already_ended(agg: Aggregator) -> None:
    for i in range(5):  # more than the two slots: each is released at once
        agg.grpc.GetModel(_request(agg, i % 3), _Ctx(ended=True, md=agg.mds[i % 3]))
    assert agg.service.download_slots.held == 0


def test_a_members_newer_download_supersedes_its_older_one(agg: Aggregator) -> None:
    """One download per collaborator: its newer request cancels the older one's RPC (a dead
    connection of the collaborator's, or a second stream of a misbehaving one), which gives
    its slot back when it ends; the other slot stays free for the other collaborators."""
    old, new = _Ctx(md=agg.mds[0]), _Ctx(md=agg.mds[0])
    agg.grpc.GetModel(_request(agg, 0), old)
    got = threading.Event()
    t = threading.Thread(
        target=lambda: (agg.grpc.GetModel(_request(agg, 0), new), got.set()), daemon=True
    )
    t.start()
    assert _wait_for(lambda: old.cancelled), "the older download was not cancelled"
    assert not got.wait(0.2), "the newer download started before the older gave its slot back"
    other = _Ctx(md=agg.mds[1])
    agg.grpc.GetModel(_request(agg, 1), other)  # another member: the second slot, at once
    for cb in old.callbacks:  # the cancelled RPC ends
        cb()
    assert got.wait(5), "the newer download did not get the slot the older gave back"
    t.join(5)
    assert agg.service.download_slots.holders(agg.names[0]) == 1


def _wait_for(cond, timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class _FakeCall:
    """Stands in for the gRPC call: initial metadata arrives when the test says so."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.active = True

    def initial_metadata(self):
        self.go.wait(10)
        return ((UPLOAD_GO, "1"),)

    def is_active(self) -> bool:
        return self.active


def _collaborator(tmp_path) -> GrpcClient:
    """A collaborator's gRPC transport (the upload stream is its part)."""
    plan = plan_from_dict({**SYNTHETIC, "network": {"chunk_size": 1024}})
    return GrpcClient(plan, plan.collaborators[0], "127.0.0.1:1")


def test_upload_sends_only_its_header_until_it_holds_a_slot(tmp_path) -> None:
    col = _collaborator(tmp_path)
    payload = bytes(range(256)) * 10  # 2560 bytes: 3 chunks of 1024
    header = teefl_pb2.Header(collaborator=col.name, round=1, total_size=len(payload))
    started, call = threading.Event(), _FakeCall()
    gen = col._upload_stream(header, payload, 1, started, [call])
    assert next(gen).HasField("header")
    got: list = []
    t = threading.Thread(target=lambda: got.extend(gen), daemon=True)
    started.set()
    t.start()
    t.join(0.3)
    assert got == [], "data was sent before the aggregator granted a slot"
    call.go.set()
    t.join(5)
    assert b"".join(c.data for c in got) == payload
    assert [c.offset for c in got] == [0, 1024, 2048]


def test_upload_sends_no_data_when_the_call_ended_while_waiting(tmp_path) -> None:
    col = _collaborator(tmp_path)
    header = teefl_pb2.Header(collaborator=col.name, round=1, total_size=3)
    started, call = threading.Event(), _FakeCall()
    call.active = False
    call.go.set()
    started.set()
    msgs = list(col._upload_stream(header, b"abc", 1, started, [call]))
    assert len(msgs) == 1 and msgs[0].HasField("header")


def test_put_update_grants_the_slot_in_initial_metadata(agg: Aggregator) -> None:
    state = agg.global_state
    payload = bytes(codec.encode_state(state))
    header = teefl_pb2.Header(
        collaborator=agg.names[0],
        round=agg.round,
        total_size=len(payload),
        sha256=codec.sha256(payload),
        crc32c=codec.crc32c(payload),
        num_samples=10,
        format=codec.FORMAT,
    )
    chunks = [teefl_pb2.Chunk(header=header)] + [
        teefl_pb2.Chunk(data=bytes(p), offset=i * 4096)
        for i, p in enumerate(codec.iter_chunks(payload, 4096))
    ]
    ctx = _Ctx(md=agg.md)
    ack = agg.grpc._put_update(iter(chunks), ctx)
    assert ack.accepted, ack.message
    assert ctx.metadata == [((UPLOAD_GO, "1"),)]
