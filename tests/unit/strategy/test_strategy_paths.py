"""The strategies on a random model: bit-identical to teefl's aggregation before strategies were
objects (RunningFedAvg, CoordinateRobust) on both the flat and the per-tensor path, the same
result whatever the path or the chunk size, and a saved state that resumes bit-identically."""

from __future__ import annotations

import pytest
import torch

from teefl.errors import TeeflError
from teefl.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    build_strategy,
    decode_state,
    encode_state,
)
from teefl.strategy import pieces as pieces_mod
from teefl.strategy.running import CoordinateRobust, RunningFedAvg
from teefl.strategy.state import StrategyState
from teefl.wire import codec
from teefl.wire.checks import FlatUpdate, UpdateRejected


def _model(g: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small model with what real ones have: several float dtypes, BatchNorm statistics, an
    integer counter, an empty tensor."""
    return {
        "conv.weight": torch.randn(4, 3, 3, generator=g) * scale,
        "conv.bias": torch.randn(4, generator=g) * scale,
        "bn.running_mean": torch.randn(4, generator=g) * scale,
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.randint(0, 100, (), generator=g),
        "fc.weight": torch.randn(5, 4, generator=g).to(torch.float16),
        "head.weight": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


def _updates(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return [(_model(g), int(torch.randint(1, 50, (), generator=g))) for _ in range(n)]


def _as(form: str, layout: codec.Layout, state, i: int):
    """The update as the server hands it over: flat, a state dict, or alternating."""
    if form in ("flat", "flat-to-dict") or (form == "mixed" and i % 2 == 0):
        return FlatUpdate(layout, codec.encode_state(state))
    return state


def _round(make_acc, ref, ups, form):
    layout = codec.Layout.of_state(ref)
    acc = make_acc(ref, None if form == "dict" else layout)
    for i, (state, samples) in enumerate(ups):
        acc.add(_as(form, layout, state, i), samples)
    if form in ("dict", "flat-to-dict"):  # the latter: flat sums, the result scattered
        return acc.result()
    payload = layout.allocate()
    acc.result_into(layout.run_views(payload))
    return {k: v.clone() for k, v in layout.tensor_views(payload).items()}


def _sround(strategy, rnd, ref, ups, form):
    return _round(lambda r, lay: strategy.begin(rnd, r, lay), ref, ups, form)


def _equal(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("form", ["dict", "flat", "mixed", "flat-to-dict"])
def test_fedavg_is_bit_identical_to_running_fedavg(form) -> None:
    g = torch.Generator().manual_seed(0)
    ref = _model(g)
    strategy = FedAvg()
    today: list[RunningFedAvg] = []  # the finished round's, whose sums the next one reuses
    for rnd in (1, 2, 3):
        ups = _updates(rnd, 4)
        new = _sround(strategy, rnd, ref, ups, form)

        def old_way(r, lay, today=today):
            today.append(RunningFedAvg(r, lay, reuse=today[-1] if today else None))
            return today[-1]

        _equal(new, _round(old_way, ref, ups, form))
        ref = new


@pytest.mark.parametrize("form", ["dict", "flat", "mixed", "flat-to-dict"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_median_and_trimmed_mean_are_bit_identical_to_coordinate_robust(
    form, chunk, monkeypatch
) -> None:
    if chunk:
        monkeypatch.setattr(pieces_mod, "CHUNK", chunk)  # stretches that split tensors
    ref = _model(torch.Generator().manual_seed(0))
    ups = _updates(7, 6)
    for strategy, method in (
        (Median(), "median"),
        (TrimmedMean({"trim_ratio": 0.2}), "trimmed_mean"),
    ):
        new = _sround(strategy, 1, ref, ups, form)
        today = CoordinateRobust(ref, method, 0.2)
        for state, samples in ups:
            today.add(state, samples)
        _equal(new, today.result())


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAdam({"eta": 0.05}),
        lambda: FedYogi({"eta": 0.05}),
        lambda: FedAdagrad({"eta": 0.05, "beta_1": 0.5}),
        lambda: MultiKrum({"f": 1, "m": 2}),
        lambda: Krum({"f": 1}),
    ],
)
def test_every_path_and_chunk_size_gives_the_same_model(make, monkeypatch) -> None:
    results = []
    for form, chunk in (
        ("dict", None),
        ("flat", None),
        ("mixed", 5),
        ("flat", 3),
        ("flat-to-dict", 4),
    ):
        monkeypatch.setattr(pieces_mod, "CHUNK", chunk or (1 << 20))
        strategy = make()
        ref = _model(torch.Generator().manual_seed(0))
        for rnd in (1, 2):
            ref = _sround(strategy, rnd, ref, _updates(rnd, 5), form)
        results.append(ref)
    for other in results[1:]:
        _equal(results[0], other)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("form", ["dict", "flat"])
def test_state_round_trip_resumes_bit_identically(name, form) -> None:
    """Three rounds straight, against: one round, its state saved to bytes and restored into a
    fresh strategy (the aggregator killed and restarted), two more rounds."""
    opts = {"eta": 0.03, "tau": 1e-3}
    ref0 = _model(torch.Generator().manual_seed(0))
    straight = build_strategy(name, opts)
    ref = ref0
    for rnd in (1, 2, 3):
        ref = _sround(straight, rnd, ref, _updates(rnd, 3), form)
    want, want_state = ref, straight.state()

    first = build_strategy(name, opts)
    ref = _sround(first, 1, ref0, _updates(1, 3), form)
    saved = encode_state(first.state())
    del first
    resumed = build_strategy(name, opts)
    resumed.restore(decode_state(saved))
    for rnd in (2, 3):
        ref = _sround(resumed, rnd, ref, _updates(rnd, 3), form)
    _equal(ref, want)
    got_state = resumed.state()
    assert got_state.meta == want_state.meta == {"t": 3}
    _equal(got_state.tensors, want_state.tensors)
    # m and v per float tensor of the model, none for the counter or the empty tensor
    assert sorted(got_state.tensors) == sorted(
        f"{k}/{n}" for k in "mv" for n in ref0 if ref0[n].is_floating_point() and ref0[n].numel()
    )


def test_state_format_is_plain_safetensors_with_json_metadata() -> None:
    import json

    from safetensors.torch import load

    s = FedAdam({"eta": 0.1})
    ref = {"w": torch.zeros(3)}
    acc = s.begin(1, ref)
    acc.add({"w": torch.ones(3)}, 2)
    acc.result()
    data = encode_state(s.state())
    assert torch.equal(load(data)["m/w"], torch.full((3,), 0.1))  # 0.1 * (1 - 0)
    hlen = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + hlen])["__metadata__"]
    assert json.loads(meta["teefl.strategy"]) == {
        "format": 1,
        "meta": {"t": 1},
        "strategy": "fedadam",
    }
    # a stateless strategy's state is as small as it gets, and restores
    empty = decode_state(encode_state(Median().state()))
    assert empty == StrategyState("median") or (empty.meta, empty.tensors) == ({}, {})
    Median().restore(empty)


def test_bad_states_are_refused_in_one_line() -> None:
    s = FedAdam()
    for bad, msg in (
        (b"xx", "not a safetensors file"),
        (codec.encode_state({"m/w": torch.zeros(2)}), "no 'teefl.strategy' metadata"),
    ):
        with pytest.raises(TeeflError, match=msg):
            decode_state(bad, "run/strategy.safetensors")
    with pytest.raises(TeeflError, match="belongs to 'fedyogi', not 'fedadam'"):
        s.restore(StrategyState("fedyogi", {"t": 0}))
    with pytest.raises(TeeflError, match="meta"):
        s.restore(StrategyState("fedadam", {"t": "1"}))
    # a state saved for another model stops at the round's begin, naming the difference
    s.restore(StrategyState("fedadam", {"t": 1}, {"m/w": torch.zeros(3), "v/w": torch.zeros(3)}))
    with pytest.raises(TeeflError, match="does not fit the model"):
        s.begin(2, {"w": torch.zeros(4)})
    with pytest.raises(TeeflError, match="keeps no state"):
        Median().restore(StrategyState("median", {"t": 1}))


def test_rejected_updates_leave_a_kept_round_untouched() -> None:
    ref = {"w": torch.zeros(2)}
    other = codec.Layout.of_state({"w": torch.zeros(3)})
    for strategy in (Median(), Krum(), FedAdam()):
        acc = strategy.begin(1, ref, codec.Layout.of_state(ref))
        acc.add({"w": torch.ones(2)}, 1)
        for bad, samples in (
            ({"w": torch.tensor([0.0, float("nan")])}, 1),
            ({"w": torch.zeros(3)}, 1),
            ({"w": torch.ones(2)}, 0),
            (FlatUpdate(other, codec.encode_state({"w": torch.zeros(3)})), 1),
        ):
            with pytest.raises(UpdateRejected):
                acc.add(bad, samples)
        assert acc.count == 1
