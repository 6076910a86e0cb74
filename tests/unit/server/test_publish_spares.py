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
