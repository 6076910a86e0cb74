"""FedAvg summed window by window at the close (``federation.memory: flat``) is FedAvg: the same
mean as the running sum, bit for bit, whatever the window, and from updates that live in files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from teefl.store.paged import map_file
from teefl.strategy import windowed
from teefl.strategy.fedavg import FedAvg
from teefl.strategy.running import RunningFedAvg
from teefl.strategy.windowed import WindowedFedAvg
from teefl.wire import codec
from teefl.wire.checks import FlatUpdate, UpdateRejected


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 7, generator=g),
        "b": torch.randn(13, generator=g),
        "h": torch.randn(41, generator=g).to(torch.bfloat16),
        "n": torch.randint(0, 1000, (3,), generator=g),  # a counter: aggregated by maximum
        "e": torch.empty(0),
    }


def _mean(acc, layout: codec.Layout) -> bytes:
    out = layout.allocate()
    acc.result_into(layout.run_views(out))
    return bytes(out)


@pytest.mark.parametrize(
    ("window", "piece"), [(8, 1 << 20), (24, 1), (1000, 7), (1000, 1 << 20), (1 << 20, 50)]
)
def test_windowed_mean_is_the_running_mean_bit_for_bit(
    monkeypatch, window: int, piece: int
) -> None:
    """Several windows per run or one, each summed in several pieces or one."""
    monkeypatch.setattr(windowed, "WINDOW_BYTES", window)
    monkeypatch.setattr(windowed, "SUM_ELEMENTS", piece)
    ref = _state(0)
    layout = codec.Layout.of_state(ref)
    assert layout is not None
    payloads = [codec.encode_state(_state(s)) for s in (1, 2, 3)]
    samples = [7, 1, 30]
    running = RunningFedAvg(ref, layout)
    win = WindowedFedAvg(ref, layout)
    for p, n in zip(payloads, samples, strict=True):
        running.add(FlatUpdate(layout, p), n)
        win.add(FlatUpdate(layout, p), n)
    want = _mean(running, layout)
    assert _mean(win, layout) == want
    # and by hand: float64 sums rounded once, counters by maximum
    mean = codec.decode_state(want)
    states = [codec.decode_state(p) for p in payloads]
    for k, t in mean.items():
        if t.is_floating_point() and t.numel():
            acc = sum(s[k].double() * n for s, n in zip(states, samples, strict=True))
            assert torch.equal(t, (acc / sum(samples)).to(t.dtype))
        elif t.numel():
            assert torch.equal(t, torch.stack([s[k] for s in states]).amax(0))


def test_updates_that_live_in_files_are_summed_from_their_maps(tmp_path: Path, monkeypatch):
    """The maps' pages are given back window by window (`FlatUpdate.done` calls `release`)."""
    monkeypatch.setattr(windowed, "WINDOW_BYTES", 4096)
    ref = _state(0)
    layout = codec.Layout.of_state(ref)
    assert layout is not None
    win = WindowedFedAvg(ref, layout)
    running = RunningFedAvg(ref, layout)
    released: list[tuple[int, int]] = []
    for s, n in ((4, 2), (5, 3)):
        path = tmp_path / f"u{s}"
        path.write_bytes(codec.encode_state(_state(s)))
        mapped = map_file(path)
        assert mapped is not None
        update = FlatUpdate(layout, mapped)
        assert update.release is not None and update.finite()
        real = update.release
        update.release = lambda a, b, real=real: (released.append((a, b)), real(a, b))
        win.add(update, n)
        running.add(FlatUpdate(layout, bytearray(path.read_bytes())), n)
    assert _mean(win, layout) == _mean(running, layout)
    assert len(released) > 2 * len(layout.runs)  # window by window, not once at the end
    assert win.updates == []  # summed: the maps go


def test_a_non_finite_update_in_a_file_is_seen(tmp_path: Path) -> None:
    state = _state(1)
    state["w"][5, 3] = float("nan")
    path = tmp_path / "bad"
    path.write_bytes(codec.encode_state(state))
    layout = codec.Layout.of_state(state)
    assert layout is not None
    mapped = map_file(path)
    assert mapped is not None
    assert not FlatUpdate(layout, mapped).finite()


def test_only_flat_updates_of_the_layout_are_taken() -> None:
    ref = _state(0)
    layout = codec.Layout.of_state(ref)
    assert layout is not None
    win = WindowedFedAvg(ref, layout)
    with pytest.raises(UpdateRejected, match="layout"):
        win.add(_state(1), 3)
    other = {"w": torch.zeros(2)}
    with pytest.raises(UpdateRejected, match="layout"):
        win.add(FlatUpdate(codec.Layout.of_state(other), codec.encode_state(other)), 3)
    with pytest.raises(UpdateRejected, match="positive"):
        win.add(FlatUpdate(layout, codec.encode_state(_state(1))), 0)


def test_fedavg_sums_at_the_close_only_when_paged() -> None:
    ref = _state(0)
    layout = codec.Layout.of_state(ref)
    strategy = FedAvg()
    assert isinstance(strategy.begin(1, ref, layout), RunningFedAvg)
    strategy.paged = True
    assert isinstance(strategy.begin(2, ref, layout), WindowedFedAvg)
    assert isinstance(strategy.begin(3, ref, None), RunningFedAvg)  # no layout: per tensor
