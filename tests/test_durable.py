"""Durable writes: the O_DIRECT path for page-aligned payloads and its fall-backs.

Every case checks the file's bytes, because a direct write that drops or shifts a block would
still "succeed"; the direct path's use is asserted where the file system supports O_DIRECT.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch

from teefl.federation import codec, durable
from teefl.federation.durable import DIRECT_ALIGN, RoundStore, write_atomic


def _direct_supported(directory: Path) -> bool:
    try:
        fd = os.open(directory / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    (directory / ".probe").unlink()
    return True


def _filled(size: int) -> codec.PagePayload:
    buf = codec.PagePayload(size)
    memoryview(buf)[:] = os.urandom(size)
    return buf


def test_page_payload_is_aligned_zeroed_and_compares_by_content() -> None:
    buf = codec.PagePayload(3 * 4096 + 5)
    view = memoryview(buf)
    assert len(buf) == 3 * 4096 + 5 and not any(view)
    import ctypes

    assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 4096 == 0
    buf[:3] = b"abc"
    assert buf == bytes(buf) and bytes(buf) == buf and bytearray(buf) == buf
    assert buf != b"abc" and buf != "not bytes"
    with pytest.raises(TypeError):
        hash(buf)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 4096, 5 * 4096 + 777])
def test_direct_write_gives_the_exact_bytes(tmp_path: Path, size: int, monkeypatch) -> None:
    monkeypatch.setattr(durable, "WRITE_SLICE", 2 * 4096)  # several direct slices, then the tail
    data, path = _filled(size), tmp_path / "ckpt"
    pauses: list[int] = []
    write_atomic(path, data, fsync=True, pause=lambda: pauses.append(1))
    assert path.read_bytes() == bytes(data)
    # one pause per slice, direct and buffered together
    direct = size // DIRECT_ALIGN * DIRECT_ALIGN
    expect = -(-direct // (2 * 4096)) + (-(-(size - direct) // (2 * 4096)))
    assert len(pauses) == expect
    assert not list(tmp_path.glob(".*tmp*"))


def test_direct_path_is_taken_for_aligned_memory_only(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    data = _filled(4 * 4096 + 100)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        assert durable._write_direct(fd, view, None) == 4 * 4096
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT  # cleared for the tail
        assert durable._write_direct(fd, view[1:], None) == 0  # memory one byte off a page
        assert durable._write_direct(fd, memoryview(bytes(data)), None) == 0  # read-only
        assert durable._write_direct(fd, view[:4095], None) == 0  # less than one block
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes()[: 4 * 4096] == bytes(data)[: 4 * 4096]


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(durable.os, "pwrite", pwrite)
    data = _filled(6 * 4096 + 9)
    write_atomic(tmp_path / "ckpt", data)
    assert (tmp_path / "ckpt").read_bytes() == bytes(data)
    if _direct_supported(tmp_path):
        assert refused == [0]


def test_other_write_errors_are_not_swallowed(tmp_path: Path, monkeypatch) -> None:
    def pwrite(fd: int, data, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space"):
        write_atomic(tmp_path / "ckpt", _filled(3 * 4096))
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.iterdir())


def test_checkpoint_of_a_layout_payload_round_trips(tmp_path: Path) -> None:
    state = {"w": torch.randn(3000, 7), "b": torch.arange(5, dtype=torch.int64)}
    payload = codec.encode_state(state)
    assert isinstance(payload, codec.PagePayload)
    store = RoundStore(tmp_path)
    store.save_checkpoint(1, payload, final=True, crc32c=codec.crc32c(payload))
    rnd, back = store.load_state()  # type: ignore[misc]
    assert rnd == 1 and back == bytes(payload)
    assert store.final_path().read_bytes() == bytes(payload)
    for name, t in codec.decode_state(back).items():
        assert torch.equal(t, state[name])
