"""Updates received into their files (``federation.memory: flat``): the bytes land in the file,
the process does not keep them resident, and offsets past 4 GiB work (a sparse file: no RAM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from teefl.store import paged
from teefl.store.paged import MappedUpdateFile, map_file


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _receive(target: MappedUpdateFile, data_at, piece: int = 1 << 20) -> None:
    """What `assembly.Assembler` does: each piece into the map, then the sink."""
    view = memoryview(target.mem)
    for off in range(0, target.size, piece):
        n = min(piece, target.size - off)
        view[off : off + n] = data_at(off, n)
        target.write(view[off : off + n], off)
    view.release()


def test_a_received_update_is_in_its_file_not_in_the_process(tmp_path: Path) -> None:
    size = 256 << 20
    final = tmp_path / "col1.safetensors"
    target = MappedUpdateFile(final, tmp_path / "col1.json", size)
    before = _rss()
    _receive(target, lambda off, n: bytes([off >> 20 & 0xFF]) * n)
    grew = _rss() - before
    # at most a release step (and the piece being received) stays resident, not 256 MiB
    assert grew < paged.RELEASE_STEP + (8 << 20), grew
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


def test_offsets_past_4_gib_land_where_they_belong(tmp_path: Path) -> None:
    """A 4 GiB + 8 KiB update file, sparse: only the pages written are ever allocated."""
    size = (4 << 30) + 8192
    final = tmp_path / "big"
    target = MappedUpdateFile(final, tmp_path / "big.json", size)
    view = memoryview(target.mem)
    view[(2 << 30) + 1 : (2 << 30) + 4] = b"mid"
    view[size - 5 :] = b"tail!"
    target.write(view[size - 5 :], size - 5)  # gives back everything before it
    view.release()
    target.commit({"samples": 1}, {"crc32c": 0}, True)
    assert final.stat().st_size == size
    assert final.stat().st_blocks * 512 < (64 << 20)  # still sparse: never held whole
    with open(final, "rb") as fh:
        fh.seek((2 << 30) + 1)
        assert fh.read(3) == b"mid"
        fh.seek(size - 5)
        assert fh.read() == b"tail!"
    mapped = map_file(final)
    assert mapped is not None and len(mapped) == size
    assert mapped[size - 5 :] == b"tail!"


def test_a_spilled_copy_is_the_payload_and_leaves_no_file(tmp_path: Path) -> None:
    """A collaborator's kept update under flat memory (`Keeper` with ``copy=spill``): the
    bytes at the time of the copy, in a file no directory names, not in the process's RSS."""
    from teefl.client.keeper import Keeper
    from teefl.wire import teefl_pb2

    resident = bytearray(os.urandom(8 << 20))
    want = bytes(resident)
    keeper = Keeper(resident, copy=lambda p: paged.spill(p, tmp_path))
    before = _rss()
    keeper.acked(1, teefl_pb2.Header(round=1), resident)
    assert _rss() - before < (4 << 20)  # not a second copy in memory
    resident[:] = bytes(len(resident))  # the next download overwrites the model
    _, kept = keeper.copy(1)
    assert isinstance(kept, paged.MappedPayload) and kept[:] == want
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing left behind, even after a crash
