"""The wire codec: bit-exact round trips, chunking at every boundary, refusal of bad streams."""

from __future__ import annotations

import pytest
import torch

from teefl.wire import assembly, codec
from teefl.workload.models import build_model


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_round_trip_bit_exact(name: str) -> None:
    state = build_model(name, 3, 10, seed=1).state_dict()
    payload = codec.encode_state(state)
    back = codec.decode_state(payload)
    assert set(back) == set(state)
    for key, t in state.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape
        assert _bits(back[key]) == _bits(t), key


def _bits(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor: equality here is bit-exactness (NaN payloads, -0.0 included)."""
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def test_odd_tensors_survive() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "empty": torch.zeros(0, 3),
        "noncontig": base.t(),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(3, 3).to(torch.float16),
        "i64": torch.tensor([1, -(2**40), 2**62]),
        "scalar": torch.tensor(3.5),
    }
    back = codec.decode_state(codec.encode_state(state))
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k], t), k


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 4096])
def test_assembler_every_chunk_boundary(chunk: int) -> None:
    payload = codec.encode_state({"w": torch.randn(100), "b": torch.randn(3)})
    asm = assembly.Assembler(len(payload), codec.sha256(payload), limit=1 << 20)
    for piece in codec.iter_chunks(payload, chunk):
        asm.add(bytes(piece))
    assert bytes(asm.finish()) == payload


def test_assembler_refuses_bad_streams() -> None:
    payload = b"x" * 100
    digest = codec.sha256(payload)
    with pytest.raises(codec.PayloadError, match="exceeds limit"):
        assembly.Assembler(100, digest, limit=99)
    asm = assembly.Assembler(100, digest, limit=1000)
    asm.add(payload[:50])
    with pytest.raises(codec.PayloadError, match="truncated"):
        asm.finish()
    asm = assembly.Assembler(100, digest, limit=1000)
    with pytest.raises(codec.PayloadError, match="more than the announced"):
        asm.add(payload + b"y")
    asm = assembly.Assembler(100, digest, limit=1000)
    asm.add(b"y" * 100)
    with pytest.raises(codec.PayloadError, match="SHA-256"):
        asm.finish()


def test_decode_rejects_garbage() -> None:
    with pytest.raises(codec.PayloadError, match="malformed safetensors"):
        codec.decode_state(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
