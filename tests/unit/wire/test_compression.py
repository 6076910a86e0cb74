"""``network.compression: zstd``: the frame codec, the plan, the aggregator's data plane, and a
federation whose final model is the uncompressed one's, bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import zstandard

from fedutil import SYNTHETIC, FakeContext, join_request, read_jsonl, run_plan
from teefl.errors import TeeflError
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.server.aggregator import Aggregator, final_state
from teefl.transport import framing, socket_client
from teefl.wire import assembly, codec, compression, teefl_pb2


# -- the codec ---------------------------------------------------------------------------------
def test_frame_round_trips_and_records_its_size() -> None:
    payload = codec.encode_state({"w": torch.randn(300, 7), "n": torch.arange(3)})
    frame = compression.compress(payload, 3)
    assert zstandard.frame_content_size(frame) == len(payload)
    assert compression.decompress(frame, len(payload), 1 << 20) == bytes(payload)


@pytest.mark.parametrize(
    "case", ["size lie", "over limit", "trailing", "garbage", "truncated", "no size"]
)
def test_hostile_frames_are_refused_before_allocating(case: str) -> None:
    raw = os.urandom(1000) + bytes(50_000)
    frame, size, limit = compression.compress(raw), len(raw), 1 << 20
    if case == "size lie":
        size += 1
    elif case == "over limit":
        limit = size - 1
    elif case == "trailing":
        frame += b"\0"
    elif case == "garbage":
        frame = b"not zstd" * 8
    elif case == "truncated":
        frame = frame[:-4]
    elif case == "no size":  # a frame that hides its size could decompress to anything
        frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(codec.PayloadError):
        compression.decompress(frame, size, limit)


def test_compression_needs_the_socket_data_plane() -> None:
    plan = plan_from_dict({**SYNTHETIC, "network": {"compression": "zstd"}})
    assert plan.network.compression == "zstd" and plan.network.compression_level == 1
    with pytest.raises(TeeflError, match="data_plane: socket"):
        plan_from_dict({**SYNTHETIC, "network": {"compression": "zstd", "data_plane": "grpc"}})
    with pytest.raises(TeeflError, match="compression"):
        plan_from_dict({**SYNTHETIC, "network": {"compression": "lzma"}})


# -- the aggregator's data plane -------------------------------------------------------------------
def _served(tmp_path: Path, compression: str):
    net = {"compression": compression}
    plan = plan_from_dict({**SYNTHETIC, "collaborators": ["col1"], "network": net})
    agg = Aggregator(plan, tmp_path, "dp", EventRecorder(tmp_path, "dp", "aggregator", "agg"))
    server = agg.data_server("127.0.0.1")
    assert server is not None
    token = agg.grpc.Join(join_request(plan, "col1"), FakeContext()).session_token
    return agg, server, socket_client.connect("127.0.0.1", agg.data_port, "col1", token, None)


def _frame_header(payload, frame, **kw) -> teefl_pb2.Header:
    return teefl_pb2.Header(
        collaborator="col1",
        round=1,
        total_size=len(frame),
        crc32c=codec.crc32c(frame),
        num_samples=10,
        format=codec.FORMAT,
        encoding="zstd",
        raw_size=len(payload),
        **kw,
    )


def test_compressed_download_and_upload(tmp_path: Path) -> None:
    agg, server, sock = _served(tmp_path, "zstd")
    try:
        with sock:
            req = teefl_pb2.ModelRequest(collaborator="col1", round=1)
            framing.send_frame(sock, framing.GET, req.SerializeToString())
            h = teefl_pb2.Header.FromString(framing.expect(sock, framing.MODEL))
            assert h.encoding == "zstd" and h.raw_size == len(agg.payload)
            assert h.total_size < h.raw_size  # the frame is what travels
            asm = assembly.Assembler(
                h.total_size, b"", 1 << 30, check="crc32c", expected_crc32c=h.crc32c
            )
            asm.receive(framing.reader(sock), 4096, None)
            assert compression.decompress(asm.finish(), h.raw_size, 1 << 30) == bytes(agg.payload)

            state = {k: v + 1 if v.is_floating_point() else v for k, v in agg.global_state.items()}
            payload = codec.encode_state(state)
            frame = compression.compress(payload)
            header = _frame_header(payload, frame)
            framing.send_frame(sock, framing.PUT, header.SerializeToString())
            framing.expect(sock, framing.GO)
            framing.send_payload(sock, frame)
            ack = teefl_pb2.UpdateAck.FromString(framing.expect(sock, framing.ACK))
            assert ack.accepted, ack.message
        # stored decompressed, with a digest of what is stored (a restart replays it as is)
        d = agg.run_dir / "updates" / "round-0001"
        assert (d / "col1.safetensors").read_bytes() == bytes(payload)
        meta = json.loads((d / "col1.json").read_text())
        assert meta["crc32c"] == codec.crc32c(payload)
        assert [u.name for u in agg.store.load_updates(1)] == ["col1"]
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["not in the plan", "size lie", "corrupt frame"])
def test_refused_compressed_uploads_leave_nothing(tmp_path: Path, case: str) -> None:
    agg, server, sock = _served(tmp_path, "none" if case == "not in the plan" else "zstd")
    try:
        with sock:
            payload = codec.encode_state(agg.global_state)
            frame = compression.compress(payload)
            h = _frame_header(payload, frame)
            if case == "size lie":
                h.raw_size += 8
            elif case == "corrupt frame":
                frame = frame[:-8] + bytes(8)
                h.crc32c = codec.crc32c(frame)  # intact on the wire, broken inside
            framing.send_frame(sock, framing.PUT, h.SerializeToString())
            if case == "not in the plan":  # refused from the header alone
                with pytest.raises(framing.RemoteError, match=r"network\.compression"):
                    framing.expect(sock, framing.GO)
            else:
                framing.expect(sock, framing.GO)
                framing.send_payload(sock, frame)
                with pytest.raises(framing.RemoteError, match="zstd") as err:
                    framing.expect(sock, framing.ACK)
                assert err.value.code == "INVALID_ARGUMENT"
        assert not agg.received and not agg.store.load_updates(1)
    finally:
        server.stop()


# -- a whole federation ---------------------------------------------------------------------------
@pytest.mark.slow
def test_compressed_federation_trains_the_same_model(tmp_path: Path) -> None:
    finals, wire = {}, {}
    for method, transport in (("none", "none"), ("zstd", "tls")):
        data = {**SYNTHETIC, "network": {"compression": method}}
        run, _ = run_plan(tmp_path / method, data, transport)
        finals[method] = final_state(run)
        events = read_jsonl(run / "events" / "collaborator-col1.jsonl")
        wire[method] = [
            e["bytes"] for e in events if e.get("phase") in ("download", "upload") and e["round"]
        ]
    for key, t in finals["none"].items():
        assert torch.equal(t, finals["zstd"][key]), key
    # the spans count the bytes that travelled: fewer with the frames
    assert len(wire["none"]) == len(wire["zstd"]) > 0
    assert all(z < n for z, n in zip(wire["zstd"], wire["none"], strict=True)), wire
