"""Durable writes: the O_DIRECT path for page-aligned payloads and its fall-backs.

Every case checks the file's bytes, because a direct write that drops or shifts a block would
still "succeed"; the direct path's use is asserted where the file system supports O_DIRECT.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from teefl.errors import TeeflError
from teefl.store import atomic
from teefl.store.atomic import DIRECT_ALIGN, write_atomic
from teefl.store.rounds import RoundStore
from teefl.wire import codec


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
    monkeypatch.setattr(atomic, "WRITE_SLICE", 2 * 4096)  # several direct slices, then the tail
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
        assert atomic.write_direct(fd, view, None) == 4 * 4096
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT  # cleared for the tail
        assert atomic.write_direct(fd, view[1:], None) == 0  # memory one byte off a page
        assert atomic.write_direct(fd, memoryview(bytes(data)), None) == 0  # read-only
        assert atomic.write_direct(fd, view[:4095], None) == 0  # less than one block
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

    monkeypatch.setattr(atomic.os, "pwrite", pwrite)
    data = _filled(6 * 4096 + 9)
    write_atomic(tmp_path / "ckpt", data)
    assert (tmp_path / "ckpt").read_bytes() == bytes(data)
    if _direct_supported(tmp_path):
        assert refused == [0]


def test_other_write_errors_are_not_swallowed(tmp_path: Path, monkeypatch) -> None:
    def pwrite(fd: int, data, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "pwrite", pwrite)
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


# -- sealed runs: resume metadata authenticated, files bound to run, round and party -------------
KEY = bytes(range(32))


def _ckpt(i: int) -> bytes:
    return bytes(codec.encode_state({"w": torch.full((64,), float(i))}))


def _sealed_run(tmp_path: Path, rounds: int = 3) -> RoundStore:
    store = RoundStore(tmp_path, seal_key=KEY, run_id="r1")
    for r in range(1, rounds + 1):
        store.save_checkpoint(r, _ckpt(r), final=False, crc32c=codec.crc32c(_ckpt(r)))
    return store


def test_a_sealed_run_resumes_from_its_own_checkpoint(tmp_path: Path) -> None:
    store = _sealed_run(tmp_path)
    assert store.load_state() == (3, _ckpt(3))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["checkpoint"] == "model/round-0003.safetensors.sealed" and "mac" in state
    # the owner still opens any checkpoint with the key alone (teefl model decrypt)
    from teefl.security.sealed import read_sealed

    assert read_sealed(tmp_path / "model/round-0002.safetensors.sealed", KEY) == _ckpt(2)


def test_an_older_checkpoint_swapped_in_is_refused(tmp_path: Path) -> None:
    _sealed_run(tmp_path)
    model = tmp_path / "model"
    shutil.copy(model / "round-0001.safetensors.sealed", model / "round-0003.safetensors.sealed")
    with pytest.raises(
        TeeflError, match="holds round 1's checkpoint of run 'r1', expected round 3"
    ):
        RoundStore(tmp_path, seal_key=KEY, run_id="r1").load_state()


def test_another_runs_checkpoint_is_refused(tmp_path: Path) -> None:
    _sealed_run(tmp_path / "a")
    with pytest.raises(TeeflError, match=r"state\.json.*fails its authentication"):
        RoundStore(tmp_path / "a", seal_key=KEY, run_id="r2").load_state()
    _sealed_run(tmp_path / "b")  # the same round of another run (same key), state.json and all
    shutil.copy(tmp_path / "b/state.json", tmp_path / "a/state.json")  # same MAC: same run id
    other = RoundStore(tmp_path / "c", seal_key=KEY, run_id="r9")
    other.save_checkpoint(3, _ckpt(7), final=False, crc32c=codec.crc32c(_ckpt(7)))
    shutil.copy(
        tmp_path / "c/model/round-0003.safetensors.sealed",
        tmp_path / "a/model/round-0003.safetensors.sealed",
    )
    with pytest.raises(TeeflError, match="of run 'r9', expected round 3's checkpoint of run 'r1'"):
        RoundStore(tmp_path / "a", seal_key=KEY, run_id="r1").load_state()


@pytest.mark.parametrize(
    "edit",
    [
        {"completed_round": 2, "checkpoint": "model/round-0002.safetensors.sealed"},  # rollback
        {"crc32c": 0},
        {"final": True, "checkpoint": "model/final.safetensors.sealed"},
        {"mac": None},
    ],
)
def test_a_tampered_state_json_is_refused(tmp_path: Path, edit: dict) -> None:
    _sealed_run(tmp_path)
    path = tmp_path / "state.json"
    state = {**json.loads(path.read_text()), **edit}
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not None}))
    with pytest.raises(TeeflError, match=r"cannot resume from .*state\.json: .*authentication"):
        RoundStore(tmp_path, seal_key=KEY, run_id="r1").load_state()


@pytest.mark.parametrize(
    "where", ["../../secret.safetensors", "/etc/passwd", "model/round-0001.safetensors"]
)
def test_state_json_never_names_another_file(tmp_path: Path, where: str) -> None:
    store = RoundStore(tmp_path / "run")
    store.save_checkpoint(2, _ckpt(2), final=False)
    path = tmp_path / "run/state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "checkpoint": where}))
    with pytest.raises(TeeflError, match=r"expected 'model/round-0002\.safetensors'"):
        store.load_state()


def _sealed_updates(tmp_path: Path) -> RoundStore:
    store = RoundStore(tmp_path, seal_key=KEY, run_id="r1")
    for rnd in (1, 2):
        for name in ("col1", "col2"):
            data = _ckpt(10 * rnd + int(name[-1]))
            store.save_update(rnd, name, data, {"samples": 10, "metrics": {}}, {}, True)
    return store


def _dropped(store: RoundStore, rnd: int) -> tuple[list[str], list[tuple[str, str]]]:
    drops: list[tuple[str, str]] = []
    saved = store.load_updates(rnd, drop=lambda name, why: drops.append((name, why)))
    return [u.name for u in saved], drops


def test_sealed_updates_are_stored_sealed_and_replayed(tmp_path: Path) -> None:
    store = _sealed_updates(tmp_path)
    d = tmp_path / "updates/round-0002"
    assert sorted(p.name for p in d.iterdir()) == [
        "col1.json",
        "col1.safetensors.sealed",
        "col2.json",
        "col2.safetensors.sealed",
    ]
    assert _ckpt(21) not in (d / "col1.safetensors.sealed").read_bytes()
    saved = store.load_updates(2)
    assert [(u.name, u.payload, u.meta["samples"]) for u in saved] == [
        ("col1", _ckpt(21), 10),
        ("col2", _ckpt(22), 10),
    ]
    assert all("mac" not in u.meta for u in saved)


def test_sealed_update_metadata_edited_is_dropped(tmp_path: Path) -> None:
    store = _sealed_updates(tmp_path)
    meta = tmp_path / "updates/round-0002/col1.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "samples": 1_000_000}))
    names, drops = _dropped(store, 2)
    assert names == ["col2"] and drops[0][0] == "col1"
    assert "col1.json fails its authentication" in drops[0][1]
    assert not meta.exists() and not meta.with_name("col1.safetensors.sealed").exists()


@pytest.mark.parametrize("what", ["payload", "both"])
def test_another_rounds_update_renamed_into_place_is_dropped(tmp_path: Path, what: str) -> None:
    store = _sealed_updates(tmp_path)
    src, dst = tmp_path / "updates/round-0001", tmp_path / "updates/round-0002"
    shutil.copy(src / "col1.safetensors.sealed", dst / "col1.safetensors.sealed")
    if what == "both":
        shutil.copy(src / "col1.json", dst / "col1.json")
    names, drops = _dropped(store, 2)
    assert names == ["col2"] and [n for n, _ in drops] == ["col1"]
    expect = "holds col1's update for round 1" if what == "payload" else "fails its authentication"
    assert expect in drops[0][1]


def test_another_collaborators_update_renamed_into_place_is_dropped(tmp_path: Path) -> None:
    store = _sealed_updates(tmp_path)
    d = tmp_path / "updates/round-0002"
    shutil.copy(d / "col2.safetensors.sealed", d / "col1.safetensors.sealed")
    names, drops = _dropped(store, 2)
    assert names == ["col2"] and "holds col2's update for round 2" in drops[0][1]


def test_a_staged_path_is_never_read_in_a_sealed_run(tmp_path: Path) -> None:
    """Even metadata that authenticates (as if the aggregator wrote it) never makes a sealed
    store read a staged file: its payload is the sealed one in the run directory."""
    from teefl.security.sealed import sign_metadata

    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / "x.safetensors").write_bytes(_ckpt(99))
    store = RoundStore(tmp_path / "run", seal_key=KEY, run_id="r1", staging_dir=shm)
    assert store.staging_dir is None
    store.save_update(1, "col1", _ckpt(1), {"samples": 3}, {}, True)
    meta = tmp_path / "run/updates/round-0001/col1.json"
    doc = {k: v for k, v in json.loads(meta.read_text()).items() if k != "mac"}
    ctx = {"run": "r1", "kind": "update", "party": "col1", "round": 1}
    meta.write_text(json.dumps(sign_metadata({**doc, "staged": "x.safetensors"}, store.mkey, ctx)))
    (saved,) = store.load_updates(1)
    assert saved.payload == _ckpt(1)
    assert (shm / "x.safetensors").read_bytes() == _ckpt(99)  # neither read nor moved nor removed
    store.discard_update(1, "col1")
    assert (shm / "x.safetensors").exists()


@pytest.mark.parametrize("staged", ["OUTSIDE", "../victim", "..", "sub/../../victim"])
def test_a_staged_path_outside_the_staging_directory_is_never_read_or_removed(
    tmp_path: Path, staged: str
) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"not an update")
    staged = str(victim) if staged == "OUTSIDE" else staged
    store = RoundStore(tmp_path / "run", staging_dir=shm)
    d = tmp_path / "run/updates/round-0001"
    d.mkdir(parents=True)
    import hashlib

    digest = hashlib.sha256(b"not an update").hexdigest()  # it would even match
    (d / "col1.json").write_text(json.dumps({"samples": 1, "sha256": digest, "staged": staged}))
    names, drops = _dropped(store, 1)
    assert names == [] and "outside the staging directory" in drops[0][1]
    assert victim.read_bytes() == b"not an update"
    assert not (d / "col1.json").exists()


# -- what a dead aggregator leaves behind ---------------------------------------------------------
def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


def test_clean_up_removes_what_dead_processes_left(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.save_checkpoint(1, _ckpt(1), final=False)
    for rnd in (1, 2):
        store.save_update(rnd, "col1", _ckpt(rnd), {"samples": 1}, {}, True)
    dead, me = _dead_pid(), os.getpid()
    litter = [
        tmp_path / "model" / f".round-0002.safetensors.tmp-{dead}",
        tmp_path / "model" / f".round-0002.safetensors.tmp-{me}",  # none of ours exists yet
        tmp_path / "updates/round-0002" / f".col2.safetensors.tmp-{dead}-140000",
        tmp_path / f".state.json.tmp-{dead}",
        tmp_path / f".run.json.tmp-{dead}",
    ]
    alive = tmp_path / f".run.json.tmp-{os.getppid()}"  # a live launcher's, mid-write
    for p in [*litter, alive]:
        p.write_bytes(b"half")
    (tmp_path / "metrics.jsonl").write_text(
        '{"round": 1, "a": 1}\n{"round": 1, "a": 2}\n{"round": 2}\n{"round": "final"}\n{"rou'
    )
    store.clean_up(1)
    assert not any(p.exists() for p in litter) and alive.exists()
    assert not (tmp_path / "updates/round-0001").exists()  # its checkpoint is durable
    assert [u.name for u in store.load_updates(2)] == ["col1"]  # the open round's: kept
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1, "a": 1}\n'


def test_after_the_final_round_no_spare_stays(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    store.save_update(1, "col1", _ckpt(1), {"samples": 1}, {}, True)
    store.drop_updates(1)
    assert (tmp_path / "updates/spare/col1.safetensors").exists()  # reused by round 2
    store.save_update(2, "col1", _ckpt(2), {"samples": 1}, {}, True)
    store.drop_updates(2, last=True)
    assert not (tmp_path / "updates").exists()
    # a crash between the final checkpoint and that drop: the next start clears them
    store.save_update(2, "col1", _ckpt(2), {"samples": 1}, {}, True)
    store.drop_updates(1)
    store.save_checkpoint(2, _ckpt(2), final=True)
    RoundStore(tmp_path).clean_up(2, final=True)
    assert not (tmp_path / "updates").exists()


# -- modes ---------------------------------------------------------------------------------------
def test_everything_the_store_writes_is_the_owners_alone(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        store = RoundStore(tmp_path / "run")
        store.save_checkpoint(1, _ckpt(1), final=True)
        store.save_update(2, "col1", _ckpt(2), {"samples": 1}, {}, True)
        f = store.open_update(2, "col2", bytearray(_ckpt(2)))
        assert f is not None
        f.commit({"samples": 1}, {}, True)
        store.drop_updates(2)
        write_atomic(tmp_path / "run/port", b"1")
    finally:
        os.umask(old)
    for p in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
