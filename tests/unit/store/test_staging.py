"""Updates staged in shared memory (staging.py): slots kept and named only while they hold an
acknowledged update, what a restart finds, and the finiteness check made while receiving."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from teefl.store.rounds import RoundStore
from teefl.store.staging import StagingArea
from teefl.wire import assembly, codec
from teefl.wire.checks import FiniteScan, FlatUpdate
from teefl.workload.models import build_model


def _names(area: StagingArea) -> list[str]:
    return sorted(os.listdir(area.directory))


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


# -- slots ---------------------------------------------------------------------------------------
def test_slots_are_kept_for_their_size_and_freed_on_close(tmp_path: Path) -> None:
    area = StagingArea(tmp_path / "shm", keep=2)
    a = area.take(10_000)
    assert a is not None and len(a.mem) == 10_000
    a.mem[:5] = b"hello"
    area.give(a)
    assert area.take(10_000) is a  # kept from round to round, its pages with it
    b, c = area.take(10_000), area.take(20_000)
    for slot in (a, b, c):
        area.give(slot)
    assert len(area.free) == 2 and a not in area.free  # at most `keep`, the oldest goes
    assert len(_names(area)) == 2 and all("-slot-" in n for n in _names(area))
    area.close()
    assert _names(area) == []  # free slots are not data: nothing outlives a clean close


def test_a_named_slot_holds_its_bytes_under_that_name_until_unlinked(tmp_path: Path) -> None:
    area = StagingArea(tmp_path / "shm", keep=2)
    slot = area.take(4096)
    slot.mem[:] = b"u" * 4096
    path = slot.link(slot.name_for(3, "col1"))
    assert path.read_bytes() == b"u" * 4096 and "round-0003-col1" in path.name
    slot.unlink()
    assert not path.exists() and slot.name is None
    area.give(slot)
    again = area.take(4096)
    assert again is slot and again.link(again.name_for(4, "col1")).exists()  # named again
    again.unlink()
    area.give(again)
    area.close()


def test_a_slot_still_named_is_never_reused_and_survives_close(tmp_path: Path) -> None:
    area = StagingArea(tmp_path / "shm", keep=2)
    slot = area.take(4096)
    slot.mem[:3] = b"acq"
    path = slot.link(slot.name_for(1, "col2"))
    area.give(slot)  # its move to the run directory failed: the only copy of an acked update
    assert slot not in area.free
    area.close()
    assert path.read_bytes()[:3] == b"acq"


def test_free_slots_of_dead_aggregators_are_swept_their_staged_updates_kept(
    tmp_path: Path,
) -> None:
    d = tmp_path / "shm"
    d.mkdir(mode=0o700)
    dead = _dead_pid()
    (d / f"{dead}-abcd-slot-1").write_bytes(b"x")
    (d / f"{dead}-abcd-round-0002-col1.safetensors").write_bytes(b"acked")
    (d / f"{os.getpid()}-ef01-slot-9").write_bytes(b"alive")
    area = StagingArea(d, keep=1)
    assert _names(area) == sorted(
        [f"{dead}-abcd-round-0002-col1.safetensors", f"{os.getpid()}-ef01-slot-9"]
    )
    area.close()


def test_the_sweep_keeps_a_staged_update_whatever_its_collaborators_name(tmp_path: Path) -> None:
    """Only exact free-slot names are swept: a staged update of a dead process for a
    collaborator called ``a-slot-1`` is an acknowledged update, kept for the restart."""
    d = tmp_path / "shm"
    d.mkdir(mode=0o700)
    dead = _dead_pid()
    staged = f"{dead}-0a1b2c3d-round-0001-a-slot-1.safetensors"
    (d / staged).write_bytes(b"acked")
    (d / f"{dead}-0a1b2c3d-probe").write_bytes(b"")  # a probe its death interrupted
    area = StagingArea(d, keep=1)
    assert _names(area) == [staged]
    area.close()


def test_unusable_staging_directories_fall_back(tmp_path: Path, caplog) -> None:
    (tmp_path / "file").write_text("not a directory")
    with caplog.at_level(logging.INFO, logger="teefl.staging"):
        assert StagingArea.open(tmp_path / "file" / "shm", keep=1) is None
        assert StagingArea.open(Path("/proc/teefl-nowhere"), keep=1) is None
    assert "written to the run directory" in caplog.text


def test_a_symlinked_staging_directory_is_refused(tmp_path: Path, caplog) -> None:
    # another local user plants the staging directory's name as a link (here to a directory
    # that even passes the owner check): no slot is ever made through it
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "shm"
    link.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="teefl.staging"):
        assert StagingArea.open(link, keep=1) is None
    assert "is a symbolic link" in caplog.text
    assert list(target.iterdir()) == []


def test_a_staging_directory_others_can_enter_is_refused(tmp_path: Path, caplog) -> None:
    d = tmp_path / "shm"
    d.mkdir()
    d.chmod(0o755)  # existed before us with another mode: refused, not changed
    with caplog.at_level(logging.WARNING, logger="teefl.staging"):
        assert StagingArea.open(d, keep=1) is None
    assert "mode 0755, not 0700" in caplog.text and "chmod 700" in caplog.text
    assert (d.stat().st_mode & 0o777) == 0o755 and list(d.iterdir()) == []


def test_a_staging_directory_we_create_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o222)  # mkdir(0o700) alone would give 0500
    try:
        area = StagingArea(tmp_path / "shm", keep=1)
    finally:
        os.umask(old)
    assert (area.directory.stat().st_mode & 0o777) == 0o700
    area.close()


def test_a_full_tmpfs_refuses_a_slot_and_leaves_nothing(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    area = StagingArea(tmp_path / "shm", keep=1)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING, logger="teefl.staging"):
        assert area.take(1 << 20) is None  # the update is then received the disk way
        assert area.take(1 << 20) is None
    assert caplog.text.count("cannot stage") == 1  # said once, not at every upload
    assert _names(area) == []
    area.close()


# -- what the run directory and a restart see ----------------------------------------------------
def _store(tmp_path: Path) -> RoundStore:
    """A run's store that reads staged updates from the test's staging directory only."""
    return RoundStore(tmp_path / "run", staging_dir=tmp_path / "shm")


def _staged(tmp_path: Path, data: bytes, rnd: int = 1):
    store = _store(tmp_path)
    area = StagingArea(tmp_path / "shm", keep=2)
    slot = area.take(len(data))
    slot.mem[:] = data
    staged = store.commit_staged(
        rnd, "col1", slot, {"samples": 7}, {"crc32c": codec.crc32c(data)}, True
    )
    return store, area, staged


def test_a_restart_reads_a_staged_update_and_moves_it_to_the_run_directory(
    tmp_path: Path,
) -> None:
    data = os.urandom(10_000)
    _, area, staged = _staged(tmp_path, data)
    meta_file = tmp_path / "run/updates/round-0001/col1.json"
    staged_name = json.loads(meta_file.read_text())["staged"]
    assert "/" not in staged_name  # a name in the staging directory, never a path
    where = tmp_path / "shm" / staged_name
    assert where.read_bytes() == data  # acknowledged from here: nothing in the run dir yet
    assert not (tmp_path / "run/updates/round-0001/col1.safetensors").exists()
    # the aggregator dies here; a new one on the same run directory replays the round
    (saved,) = _store(tmp_path).load_updates(1)
    assert saved.payload == data and saved.meta["samples"] == 7 and "staged" not in saved.meta
    assert (tmp_path / "run/updates/round-0001/col1.safetensors").read_bytes() == data
    assert not where.exists() and "staged" not in json.loads(meta_file.read_text())
    (again,) = _store(tmp_path).load_updates(1)  # and once more: the same
    assert again.payload == data
    staged.slot.name = None  # its file went with the replay
    area.close()


def test_settle_moves_it_and_frees_the_slot(tmp_path: Path) -> None:
    data = os.urandom(5000)
    store, area, staged = _staged(tmp_path, data)
    staged.settle()
    assert (tmp_path / "run/updates/round-0001/col1.safetensors").read_bytes() == data
    assert staged.slot.name is None and all("-slot-" in n for n in _names(area))
    (saved,) = store.load_updates(1)  # the metadata still names the staged file, now gone
    assert saved.payload == data
    area.give(staged.slot)
    area.close()


def test_a_staged_update_whose_file_is_gone_was_never_committed(tmp_path: Path, caplog) -> None:
    data = os.urandom(5000)
    store, area, staged = _staged(tmp_path, data)
    staged.slot.unlink()  # as a crash between the metadata and the rename leaves it
    with caplog.at_level(logging.WARNING, logger="teefl.durable"):
        assert store.load_updates(1) == []
    assert "which is gone" in caplog.text
    assert not (tmp_path / "run/updates/round-0001/col1.json").exists()
    area.give(staged.slot)
    area.close()


def test_a_corrupted_staged_update_is_not_trusted(tmp_path: Path) -> None:
    data = os.urandom(5000)
    store, area, staged = _staged(tmp_path, data)
    staged.slot.mem[:1] = bytes([data[0] ^ 1])
    with pytest.raises(Exception, match="fails its checksum"):
        store.load_updates(1)
    staged.slot.unlink()
    area.give(staged.slot)
    area.close()


def test_discarding_a_staged_update_removes_its_file(tmp_path: Path) -> None:
    store, area, staged = _staged(tmp_path, os.urandom(5000))
    staged.slot.unlink()  # back to a free slot first, as the aggregator does
    store.discard_update(1, "col1")
    assert store.load_updates(1) == [] and all("-slot-" in n for n in _names(area))
    area.give(staged.slot)
    area.close()


# -- the finiteness check made while receiving ---------------------------------------------------
def _payload(name: str = "mobilenet_v3_small", dtype: torch.dtype | None = None):
    model = build_model(name, 3, 10, seed=0)
    if dtype is not None:
        model = model.to(dtype)
    state = model.state_dict()
    return codec.Layout.of_state(state), bytearray(codec.encode_state(state))


def _scanned(layout: codec.Layout, payload: bytearray, piece: int) -> FiniteScan:
    scan = FiniteScan(layout)
    asm = assembly.Assembler(len(payload), b"", 1 << 40, check="none", buffer=bytearray(payload))
    scan.buffer = asm.buf
    view = memoryview(payload)
    pos = 0

    def recv_into(dst: memoryview) -> int:
        nonlocal pos
        n = min(len(dst), 7919)  # the socket returns odd amounts; pieces stay whole
        dst[:n] = view[pos : pos + n]
        pos += n
        return n

    asm.sink = scan
    asm.receive(recv_into, piece, None)
    return scan


@pytest.mark.parametrize("piece", [4096, assembly.HASH_PIECE, 4 << 20])
def test_scan_while_receiving_agrees_with_the_whole_check(piece: int) -> None:
    layout, payload = _payload()
    assert _scanned(layout, payload, piece).finite()
    float_bytes = [(b, b + n * d.itemsize) for d, b, n in layout.runs if d.is_floating_point]
    begin, end = float_bytes[0]
    # a NaN at the first and last float, and on both sides of a piece boundary
    for at in (begin, end - 4, begin + assembly.HASH_PIECE - 4, begin + assembly.HASH_PIECE):
        bad = bytearray(payload)
        bad[at : at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
        assert not FlatUpdate(layout, bad).finite()
        assert not _scanned(layout, bad, piece).finite(), at


def test_scan_proves_nothing_where_it_did_not_see_every_element() -> None:
    layout, payload = _payload()
    first = next(b for d, b, _ in layout.runs if d == torch.float32)
    cut = first + 1001  # inside a float32 element
    scan = FiniteScan(layout)
    scan(memoryview(payload)[:cut], 0)  # a piece ending inside an element
    scan(memoryview(payload)[cut:], cut)
    assert not scan.finite()
    whole = FiniteScan(layout)
    whole(memoryview(payload)[: cut - 1], 0)  # element-aligned: fine
    whole(memoryview(payload)[cut - 1 :], cut - 1)
    assert whole.finite()
    half = FiniteScan(layout)
    half(memoryview(payload)[: len(payload) // 2], 0)  # the rest never arrived
    assert not half.finite()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_scan_checks_bfloat16_exactly(bad: float) -> None:
    """NumPy has no bfloat16: its bits are read as uint16, exponent all ones = not finite."""
    layout, payload = _payload("small_cnn", torch.bfloat16)
    assert _scanned(layout, payload, assembly.HASH_PIECE).finite()
    begin = next(b for d, b, _ in layout.runs if d == torch.bfloat16)
    wrong = bytearray(payload)
    wrong[begin + 6 : begin + 8] = (
        torch.tensor([bad], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    )
    assert not _scanned(layout, wrong, assembly.HASH_PIECE).finite()
    assert not FlatUpdate(layout, wrong).finite()
    big = bytearray(payload)  # the largest finite bfloat16 is finite
    big[begin : begin + 2] = (
        torch.tensor([3.0e38], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    )
    assert _scanned(layout, big, assembly.HASH_PIECE).finite()


def test_a_slot_whose_file_was_removed_under_it_commits_nothing(tmp_path: Path) -> None:
    store = RoundStore(tmp_path / "run")
    area = StagingArea(tmp_path / "shm", keep=2)
    slot = area.take(4096)
    os.unlink(area.directory / slot.free_name)  # e.g. swept by a process in another namespace
    with pytest.raises(FileNotFoundError):
        store.commit_staged(1, "col1", slot, {"samples": 1}, {"crc32c": 0}, True)
    assert not (tmp_path / "run/updates/round-0001/col1.json").exists()  # not acknowledged
    area.give(slot)
    assert slot not in area.free  # never staged again
    area.close()


def test_scan_of_bfloat16_in_pieces_of_changing_size() -> None:
    """The bfloat16 check reuses one scratch array for every piece: a piece smaller than an
    earlier one is judged on its own elements only, wherever its bad element lies."""
    layout, payload = _payload("small_cnn", torch.bfloat16)
    begin, end = next((b, b + n * 2) for d, b, n in layout.runs if d == torch.bfloat16)
    cuts = [begin, begin + 4096, begin + 4096 + 64, begin + 4096 + 64 + 2048, end]
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()

    def scan(data: bytearray) -> FiniteScan:
        s = FiniteScan(layout)
        view = memoryview(data)
        s(view[:begin], 0)
        for lo, hi in itertools.pairwise(cuts):
            s(view[lo:hi], lo)
        s(view[end:], end)
        return s

    assert scan(payload).finite()
    for at in (begin + 4096 + 62, begin + 4096 + 64, cuts[3] - 2, end - 2):
        bad = bytearray(payload)
        bad[at : at + 2] = nan
        assert not scan(bad).finite(), at
