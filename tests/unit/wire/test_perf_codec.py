"""Correctness of the zero-copy codec: one-copy encode, header-checked zero-copy decode, hashing on
arrival -- at every chunk boundary, for every dtype, and for hostile headers."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from teefl.wire import assembly, codec


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _odd_state() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "empty": torch.zeros(0, 3),
        "empty_i64": torch.zeros(2, 0, dtype=torch.int64),
        "noncontig": base.t(),
        "strided": torch.arange(40, dtype=torch.float64)[::3],
        "expanded": torch.tensor([1.5, -2.5]).expand(3, 2),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(3, 3).to(torch.float16),
        "i64": torch.tensor([1, -(2**40), 2**62]),
        "i32": torch.tensor([7, -7], dtype=torch.int32),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "a.b.c": torch.ones(1),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k, t in a.items():
        assert b[k].dtype == t.dtype and b[k].shape == t.shape, k
        assert _bits(b[k]) == _bits(t), k


def test_every_dtype_and_layout_round_trips_bit_exact() -> None:
    state = _odd_state()
    _same(state, codec.decode_state(codec.encode_state(state)))


def test_payload_is_standard_safetensors_both_ways() -> None:
    state = _odd_state()
    # safetensors reads what we write ...
    _same(state, st_load(bytes(codec.encode_state(state))))
    # ... and we read what safetensors writes
    flat = {k: v.contiguous() for k, v in state.items()}
    _same(state, codec.decode_state(st_save(flat)))
    _same(state, codec.decode_state(codec.ReceivedPayload(st_save(flat))))


def test_tensor_data_is_aligned_to_its_element_size() -> None:
    payload = codec.encode_state(_odd_state())
    hlen = struct.unpack("<Q", payload[:8])[0]
    assert (8 + hlen) % 8 == 0
    header = json.loads(payload[8 : 8 + hlen])
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}
    for info in header.values():
        assert info["data_offsets"][0] % sizes.get(info["dtype"], 1) == 0


@pytest.mark.parametrize("chunk", [1, 3, 8, 64, 1000, 4096, 1 << 20])
def test_assembler_then_decode_at_every_chunk_size(chunk: int) -> None:
    state = _odd_state()
    payload = codec.encode_state(state)
    asm = assembly.Assembler(len(payload), codec.sha256(payload), limit=1 << 20)
    for piece in codec.iter_chunks(payload, chunk):
        asm.add(bytes(piece))
    _same(state, codec.decode_state(asm.finish()))


def test_assembler_split_at_every_position() -> None:
    state = {"w": torch.randn(7), "b": torch.tensor([1, 2], dtype=torch.int64)}
    payload = bytes(codec.encode_state(state))
    digest = codec.sha256(payload)
    for cut in range(len(payload) + 1):
        asm = assembly.Assembler(len(payload), digest, limit=1 << 20)
        asm.add(payload[:cut])
        asm.add(memoryview(payload)[cut:])  # memoryviews are accepted as chunks too
        assert bytes(asm.finish()) == payload
        _same(state, codec.decode_state(asm.buf))


def test_assembler_detects_a_flipped_byte_anywhere() -> None:
    payload = bytes(codec.encode_state({"w": torch.randn(16)}))
    digest = codec.sha256(payload)
    for pos in range(0, len(payload), 13):
        bad = bytearray(payload)
        bad[pos] ^= 1
        asm = assembly.Assembler(len(bad), digest, limit=1 << 20)
        for piece in codec.iter_chunks(bad, 10):
            asm.add(bytes(piece))
        with pytest.raises(codec.PayloadError, match="SHA-256"):
            asm.finish()


def test_decoded_tensors_never_alias_caller_memory() -> None:
    state = {"w": torch.arange(8, dtype=torch.float32)}
    raw = bytearray(codec.encode_state(state))
    back = codec.decode_state(raw)  # a plain bytearray: the caller may reuse it
    raw[-32:] = b"\xff" * 32
    assert torch.equal(back["w"], state["w"])
    back["w"] += 1  # and writing the tensor does not change the caller's buffer
    assert bytes(raw[-32:]) == b"\xff" * 32
    frozen = bytes(codec.encode_state(state))
    out = codec.decode_state(frozen)
    out["w"].zero_()
    assert codec.decode_state(frozen)["w"].equal(state["w"])  # immutable bytes stay immutable


def test_received_buffer_is_shared_once_then_copied() -> None:
    state = {"w": torch.arange(4, dtype=torch.float32)}
    payload = codec.encode_state(state)
    asm = assembly.Assembler(len(payload), codec.sha256(payload), limit=1 << 20)
    asm.add(bytes(payload))
    buf = asm.finish()
    first = codec.decode_state(buf)
    second = codec.decode_state(buf)
    first["w"].zero_()
    assert torch.equal(second["w"], state["w"])  # the second decode got its own copy


def test_assembler_refuses_data_after_finish() -> None:
    payload = bytes(codec.encode_state({"w": torch.ones(2)}))
    asm = assembly.Assembler(len(payload), codec.sha256(payload), limit=1 << 20)
    asm.add(payload)
    asm.finish()
    with pytest.raises(codec.PayloadError, match="more than the announced"):
        asm.add(b"x")


def _forge(header: dict, data: bytes, pad: bool = True) -> bytes:
    head = json.dumps(header).encode()
    if pad:
        head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "bytes for"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "no tensor"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "outside"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, "malformed"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "bad entry"),
        ({"a": [1, 2]}, b"", "bad entry"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "gap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)
def test_hostile_headers_are_refused(header: dict, data: bytes, match: str) -> None:
    with pytest.raises(codec.PayloadError, match=match):
        codec.decode_state(_forge(header, data))
    with pytest.raises(codec.PayloadError, match=match):
        codec.decode_state(codec.ReceivedPayload(_forge(header, data)))


def test_header_size_and_json_problems_are_refused() -> None:
    with pytest.raises(codec.PayloadError, match="shorter"):
        codec.decode_state(b"\x01\x00")
    with pytest.raises(codec.PayloadError, match="does not fit"):
        codec.decode_state(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(codec.PayloadError, match="not JSON"):
        codec.decode_state(struct.pack("<Q", 4) + b"{abc")
    with pytest.raises(codec.PayloadError, match="not a JSON object"):
        codec.decode_state(struct.pack("<Q", 2) + b"[]")
    dup = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'  # noqa: E501
    with pytest.raises(codec.PayloadError, match="duplicate"):
        codec.decode_state(struct.pack("<Q", len(dup)) + dup + b"\0")


def test_metadata_and_empty_payloads() -> None:
    out = codec.decode_state(_forge({"__metadata__": {"format": "pt"}}, b""))
    assert out == {}
    assert codec.decode_state(codec.encode_state({})) == {}


def test_large_model_round_trip() -> None:
    from teefl.workload.models import build_model

    state = build_model("mobilenet_v3_small", 3, 10, seed=3).state_dict()
    payload = codec.encode_state(state)
    assert len(payload) == len(st_save({k: v.contiguous() for k, v in state.items()}))
    asm = assembly.Assembler(len(payload), codec.sha256(payload), limit=1 << 30)
    for piece in codec.iter_chunks(payload, 1 << 20):
        asm.add(bytes(piece))
    _same(state, codec.decode_state(asm.finish()))
