"""Updates received into their files (``federation.memory: flat``): the bytes land in the file,
the process does not keep them resident, and offsets past 4 GiB work (a sparse file: no RAM)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from teefl.store import paged
from teefl.store.paged import MappedUpdateFile, map_file


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


SLOT = MappedUpdateFile.SLOT


def _receive(target: MappedUpdateFile, data_at, piece: int = 1 << 20) -> None:
    """What `assembly.Assembler` does with the target's window: each piece into it (never
    across a slot's end), then to the file's sink."""
    off = 0
    while off < target.size:
        w = off % len(target.window)
        n = min(piece, target.size - off, SLOT - off % SLOT)
        target.window[w : w + n] = data_at(off, n)
        target.write(memoryview(target.window)[w : w + n], off)
        off += n


def test_a_received_update_is_in_its_file_not_in_the_process(tmp_path: Path) -> None:
    size = 256 << 20
    final = tmp_path / "col1.safetensors"
    target = MappedUpdateFile(final, tmp_path / "col1.json", size)
    chunk = bytearray(1 << 20)
    before = _rss()

    def data_at(off: int, n: int) -> bytearray:
        chunk[:] = bytes([off >> 20 & 0xFF]) * n
        return chunk

    _receive(target, data_at)
    # through one small window, not 256 MiB of it
    assert _rss() - before < len(target.window) + (8 << 20)
    mapped = target.payload()
    assert mapped[200 << 20 : (200 << 20) + 4] == bytes([200]) * 4
    mapped.release_pages(0, size)
    target.commit({"samples": 3}, {"crc32c": 7}, True)
    assert not target.tmp.exists() and final.stat().st_size == size
    with open(final, "rb") as fh:
        fh.seek(200 << 20)
        assert fh.read(4) == bytes([200]) * 4
    meta = json.loads((tmp_path / "col1.json").read_text())
    assert meta["samples"] == 3 and meta["crc32c"] == 7 and meta["verified"] is True


def test_a_refused_update_leaves_nothing(tmp_path: Path) -> None:
    target = MappedUpdateFile(tmp_path / "col1.safetensors", tmp_path / "col1.json", 1 << 20)
    _receive(target, lambda off, n: b"x" * n, piece=4096)
    target.abort()
    assert list(tmp_path.iterdir()) == []


def test_pieces_must_come_in_order(tmp_path: Path) -> None:
    target = MappedUpdateFile(tmp_path / "u", tmp_path / "u.json", 8192)
    with pytest.raises(ValueError, match="expected 0"):
        target.write(memoryview(b"x" * 4096), 4096)
    target.abort()


def test_a_digest_is_computed_where_none_was_claimed(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 << 20)
    target = MappedUpdateFile(tmp_path / "u", tmp_path / "u.json", len(data))
    _receive(target, lambda off, n: data[off : off + n], piece=1 << 16)
    target.commit({"samples": 1}, {}, False)
    meta = json.loads((tmp_path / "u.json").read_text())
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["verified"] is True
    mapped = map_file(tmp_path / "u")
    assert mapped is not None
    assert mapped.digests("sha256") == hashlib.sha256(data).digest()
    import crc32c

    assert mapped.digests("crc32c") == crc32c.crc32c(data)


def test_offsets_past_4_gib_are_mapped_where_they_belong(tmp_path: Path) -> None:
    """A 4 GiB + 8 KiB update file, sparse: only the pages written are ever allocated; its map
    reads them at their offsets and gives the memory back."""
    size = (4 << 30) + 8192
    path = tmp_path / "big"
    with open(path, "wb") as fh:
        fh.truncate(size)
        os.pwrite(fh.fileno(), b"mid", (2 << 30) + 1)
        os.pwrite(fh.fileno(), b"tail!", size - 5)
    assert path.stat().st_blocks * 512 < (64 << 20)  # sparse: never held whole
    mapped = map_file(path)
    assert mapped is not None and len(mapped) == size
    assert mapped[(2 << 30) + 1 : (2 << 30) + 4] == b"mid"
    assert mapped[size - 5 :] == b"tail!"
    before = _rss()
    mapped.release_pages(0, size)
    assert _rss() <= before


@pytest.mark.parametrize("memory", ["page-aligned", "bytearray"])
def test_a_spilled_copy_is_the_payload_and_leaves_no_file(
    tmp_path: Path, memory: str, monkeypatch
) -> None:
    """A collaborator's kept update under flat memory (`Keeper` with ``copy=spill``): the
    bytes at the time of the copy, in a file no directory names, not in the process's RSS --
    written with O_DIRECT from page-aligned memory (a resident model's payload), else through
    the page cache; a ragged tail either way."""
    import mmap

    from teefl.client.keeper import Keeper
    from teefl.wire import teefl_pb2

    size = (8 << 20) + 1234
    resident: Any = mmap.mmap(-1, size) if memory == "page-aligned" else bytearray(size)
    resident[:] = os.urandom(size)
    want = bytes(resident)
    direct: list[int] = []
    real = paged.write_direct
    monkeypatch.setattr(paged, "write_direct", lambda *a: direct.append(real(*a)) or direct[-1])
    keeper = Keeper(resident, copy=lambda p: paged.spill(p, tmp_path))
    before = _rss()
    keeper.acked(1, teefl_pb2.Header(round=1), resident)
    assert _rss() - before < (4 << 20)  # not a second copy in memory
    resident[:] = bytes(len(resident))  # the next download overwrites the model
    _, kept = keeper.copy(1)
    assert isinstance(kept, paged.MappedPayload) and kept[:] == want
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing left behind, even after a crash
    assert direct == [size // 4096 * 4096 if memory == "page-aligned" else 0]


def test_where_o_direct_is_refused_the_file_is_written_the_ordinary_way(tmp_path: Path) -> None:
    """tmpfs refuses O_DIRECT: the same bytes land in the file all the same."""
    import shutil
    import tempfile

    shm = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path
    try:
        data = os.urandom(SLOT + 12345)  # a full slot and a partial one
        target = MappedUpdateFile(shm / "u", shm / "u.json", len(data))
        _receive(target, lambda off, n: data[off : off + n], piece=1 << 16)
        target.commit({"samples": 1}, {"crc32c": 1}, True)
        assert (shm / "u").read_bytes() == data
    finally:
        if shm != tmp_path:
            shutil.rmtree(shm)


def test_slots_around_the_window_and_a_tail_land_where_they_belong(tmp_path: Path) -> None:
    """More slots than the window has, so each is written again while others are in flight;
    then an aligned and a ragged tail."""
    data = os.urandom((MappedUpdateFile.SLOTS + 3) * SLOT + 4096 + 17)
    target = MappedUpdateFile(tmp_path / "u", tmp_path / "u.json", len(data))
    _receive(target, lambda off, n: data[off : off + n], piece=300_000)
    assert bytes(target.payload()) == data
    target.commit({"samples": 1}, {"crc32c": 1}, True)
    assert (tmp_path / "u").read_bytes() == data


def test_a_failed_write_fails_the_upload_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """A slot written in the background that fails (a full disk) fails the receive at its next
    slot or at the end -- never an acknowledgement for bytes that are not in the file."""
    import errno

    calls = []

    def full(fd: int, view: memoryview, offset: int) -> None:
        calls.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(paged, "pwrite_all", full)
    data = os.urandom(MappedUpdateFile.SLOTS * SLOT)
    target = MappedUpdateFile(tmp_path / "u", tmp_path / "u.json", len(data))
    with pytest.raises(OSError, match="No space"):
        _receive(target, lambda off, n: data[off : off + n])
    target.abort()
    assert calls and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spare_size", [SLOT // 2, 3 * SLOT + 999])
def test_a_spare_of_a_closed_round_is_overwritten_to_the_update_exactly(
    tmp_path: Path, spare_size: int
) -> None:
    """A spare file (its blocks allocated) is taken, not copied: renamed into place, cut or
    extended to the update's size, every byte the update's."""
    spare = tmp_path / "spare.safetensors"
    spare.write_bytes(b"\xff" * spare_size)
    data = os.urandom(2 * SLOT + 4096 + 5)
    target = MappedUpdateFile(tmp_path / "u", tmp_path / "u.json", len(data), reuse=spare)
    assert not spare.exists()
    _receive(target, lambda off, n: data[off : off + n], piece=300_000)
    target.commit({"samples": 1}, {"crc32c": 1}, True)
    assert (tmp_path / "u").read_bytes() == data


def test_a_flat_round_store_keeps_its_update_files_as_spares(tmp_path: Path) -> None:
    """A closed round's update files go aside and the next round's upload is received into
    them; after the final round none stays."""
    from teefl.store.rounds import RoundStore

    store = RoundStore(tmp_path, mapped=True)
    data = os.urandom(SLOT + 17)
    for rnd in (1, 2):
        target = store.open_mapped_update(rnd, "col1", len(data))
        assert target is not None
        _receive(target, lambda off, n: data[off : off + n])
        target.commit({"samples": 1}, {"crc32c": 1}, True)
        if rnd == 1:
            first = (tmp_path / "updates/round-0001/col1.safetensors").stat().st_ino
            store.drop_updates(1)
            assert (tmp_path / "updates/spare/col1.safetensors").stat().st_ino == first
    assert (tmp_path / "updates/round-0002/col1.safetensors").stat().st_ino == first
    assert (tmp_path / "updates/round-0002/col1.safetensors").read_bytes() == data
    store.drop_updates(2, last=True)
    assert not (tmp_path / "updates").exists()
