"""The next round's mean goes into an earlier round's payload once nobody refers to it; under
flat memory the close waits for the checkpoint still writing that payload rather than make a
third model (`Publisher.spare`)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from teefl.server.publish import Publisher
from teefl.wire import codec

NETWORK = SimpleNamespace(chunk_size=1 << 20, compression="none", compression_level=3)


def _layout() -> codec.Layout:
    layout = codec.Layout.of_state({"w": torch.zeros(1000), "b": torch.zeros(10)})
    assert layout is not None
    return layout


def test_flat_waits_for_the_checkpoint_of_an_earlier_payload_instead_of_a_third() -> None:
    layout = _layout()
    pub = Publisher("crc32c", NETWORK, flat=True)
    earlier = layout.allocate()
    writer = [earlier]  # the checkpoint writer, still writing it
    pub.retire(earlier)
    del earlier
    waits = []

    def wait() -> bool:  # the checkpoint is written: the writer lets go of the payload
        waits.append(1)
        writer.clear()
        return True

    got = pub.spare(layout, wait=wait)
    assert waits == [1]
    assert not writer and not pub.spares.bufs  # the earlier payload itself, taken
    assert bytes(got[: len(layout.head)]) == layout.head


def test_with_no_checkpoint_to_wait_for_a_payload_is_made() -> None:
    layout = _layout()
    pub = Publisher("crc32c", NETWORK, flat=True)
    held = layout.allocate()
    pub.retire(held)  # referenced (say, by a download) and no checkpoint queued
    got = pub.spare(layout, wait=lambda: False)
    assert got is not held and pub.spares.bufs == [held]


def test_fast_memory_never_waits() -> None:
    layout = _layout()
    pub = Publisher("crc32c", NETWORK, flat=False)
    held = layout.allocate()
    pub.retire(held)
    called = []
    got = pub.spare(layout, wait=lambda: called.append(1) or True)
    assert got is not held and not called


def test_a_close_never_waits_for_a_checkpoint_already_counted_written(tmp_path) -> None:
    """The writer counts a checkpoint written, then marks its queue item done, then wakes the
    waiters. A close that looks in between must not wait for a write that has happened: no
    other checkpoint would ever wake it, and the run would hang in its close."""
    import threading

    from teefl.server.checkpointer import Checkpointer
    from teefl.server.rounds import Rounds

    cond = threading.Condition()
    counted = threading.Event()
    release = threading.Event()

    def wake() -> None:
        with cond:
            cond.notify_all()

    ckpt = Checkpointer(
        store=None, recorder=None, run_dir=tmp_path, rounds=2, members=1, strategy="fedavg",
        failed=lambda reason: None, durable=lambda rnd: None, written=wake,
    )  # fmt: skip
    ckpt.write = lambda *item: None  # the writing itself is not under test
    done = ckpt.queue.task_done

    def task_done() -> None:  # hold the writer between its count and the queue's
        counted.set()
        release.wait(10)
        done()

    ckpt.queue.task_done = task_done
    ckpt.put(1, bytearray(8), b"", 0, None)
    assert counted.wait(10) and ckpt.completed == 1
    closer = SimpleNamespace(checkpointer=ckpt, failed=None, cond=cond)
    answer = []
    t = threading.Thread(
        target=lambda: answer.append(_checkpointed(Rounds, closer, cond)), daemon=True
    )
    t.start()
    t.join(5)
    release.set()
    t.join(10)
    assert answer == [False], "the close waited for a checkpoint already written"


def _checkpointed(rounds_type, closer, cond) -> bool:
    with cond:
        return rounds_type._checkpointed(closer)
