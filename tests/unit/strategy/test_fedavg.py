"""FedAvg as a running sum equals the hand-computed weighted average; bad updates never land."""

from __future__ import annotations

import pytest
import torch

from teefl.strategy.running import RunningFedAvg
from teefl.wire.checks import UpdateRejected, check_update


def _ref() -> dict[str, torch.Tensor]:
    return {
        "w": torch.zeros(2, 2),
        "bn.running_mean": torch.zeros(2),
        "bn.num_batches_tracked": torch.tensor(0),
    }


def test_weighted_average_by_hand() -> None:
    agg = RunningFedAvg(_ref())
    agg.add(
        {
            "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
            "bn.running_mean": torch.tensor([1.0, 0.0]),
            "bn.num_batches_tracked": torch.tensor(5),
        },
        1,
    )
    agg.add(
        {
            "w": torch.tensor([[3.0, 6.0], [0.0, 8.0]]),
            "bn.running_mean": torch.tensor([4.0, 2.0]),
            "bn.num_batches_tracked": torch.tensor(7),
        },
        3,
    )
    out = agg.result()
    # (1*1 + 3*3)/4 = 2.5, (2 + 18)/4 = 5, (3 + 0)/4 = 0.75, (4 + 24)/4 = 7
    assert torch.equal(out["w"], torch.tensor([[2.5, 5.0], [0.75, 7.0]]))
    assert torch.equal(out["bn.running_mean"], torch.tensor([(1 + 12) / 4, 6 / 4]))
    assert out["bn.num_batches_tracked"].item() == 7
    assert out["w"].dtype == torch.float32


def test_order_does_not_matter() -> None:
    g = torch.Generator().manual_seed(0)
    ups = [({"w": torch.randn(50, generator=g)}, n) for n in (3, 100, 7)]
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        agg = RunningFedAvg({"w": torch.zeros(50)})
        for i in order:
            agg.add(*ups[i])
        results.append(agg.result()["w"])
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])


@pytest.mark.parametrize(
    ("update", "samples", "message"),
    [
        ({"w": torch.zeros(2, 3)}, 1, "missing tensors"),
        (
            {
                "w": torch.zeros(2, 2),
                "bn.running_mean": torch.zeros(2),
                "bn.num_batches_tracked": torch.tensor(0),
                "evil": torch.zeros(1),
            },
            1,
            "unknown tensors",
        ),
        (
            {
                "w": torch.zeros(2, 3),
                "bn.running_mean": torch.zeros(2),
                "bn.num_batches_tracked": torch.tensor(0),
            },
            1,
            "shape",
        ),
        (
            {
                "w": torch.zeros(2, 2, dtype=torch.float64),
                "bn.running_mean": torch.zeros(2),
                "bn.num_batches_tracked": torch.tensor(0),
            },
            1,
            "dtype",
        ),
        (
            {
                "w": torch.tensor([[0.0, float("nan")], [0, 0]]),
                "bn.running_mean": torch.zeros(2),
                "bn.num_batches_tracked": torch.tensor(0),
            },
            1,
            "NaN or Inf",
        ),
        (
            {
                "w": torch.zeros(2, 2),
                "bn.running_mean": torch.zeros(2),
                "bn.num_batches_tracked": torch.tensor(0),
            },
            0,
            "positive",
        ),
    ],
)
def test_bad_updates_leave_the_sum_untouched(update, samples, message) -> None:
    agg = RunningFedAvg(_ref())
    good = {
        "w": torch.ones(2, 2),
        "bn.running_mean": torch.ones(2),
        "bn.num_batches_tracked": torch.tensor(1),
    }
    agg.add(good, 2)
    with pytest.raises(UpdateRejected, match=message):
        agg.add(update, samples)
    assert agg.count == 1 and agg.total_samples == 2
    assert torch.equal(agg.result()["w"], torch.ones(2, 2))


def test_median_and_trimmed_mean_resist_an_outlier() -> None:
    from teefl.strategy.running import make_aggregator

    ref = {"w": torch.zeros(3)}
    values = [1.0, 2.0, 3.0, 4.0, 1000.0]
    med = make_aggregator(ref, "median")
    trim = make_aggregator(ref, "trimmed_mean", trim_ratio=0.2)
    avg = make_aggregator(ref, "fedavg")
    for v in values:
        for agg in (med, trim, avg):
            agg.add({"w": torch.full((3,), v)}, 10)
    assert torch.equal(med.result()["w"], torch.full((3,), 3.0))
    assert torch.equal(trim.result()["w"], torch.full((3,), 3.0))  # mean of 2, 3, 4
    assert avg.result()["w"][0].item() == pytest.approx(202.0)
    even = make_aggregator(ref, "median")
    for v in (1.0, 2.0, 3.0, 10.0):
        even.add({"w": torch.full((3,), v)}, 1)
    assert torch.equal(even.result()["w"], torch.full((3,), 2.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_is_exact_also_when_the_sum_overflows(dtype) -> None:
    big = torch.finfo(dtype).max
    ref = {"w": torch.zeros(4, dtype=dtype)}
    check_update(ref, {"w": torch.full((4,), big, dtype=dtype)})  # finite; the sum overflows
    check_update(ref, {"w": torch.tensor([big, -big, big, -big], dtype=dtype)})
    check_update({"w": torch.zeros(0, dtype=dtype)}, {"w": torch.zeros(0, dtype=dtype)})
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.zeros(4, dtype=dtype)
        t[2] = bad
        with pytest.raises(UpdateRejected, match="NaN or Inf"):
            check_update(ref, {"w": t})
    t = torch.zeros(4, dtype=dtype)
    t[0], t[1] = float("inf"), float("-inf")  # sums to NaN: still refused
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        check_update(ref, {"w": t})


def test_add_skips_the_check_only_when_told() -> None:
    ref = {"w": torch.zeros(2)}
    bad = {"w": torch.tensor([1.0, float("nan")])}
    agg = RunningFedAvg(ref)
    with pytest.raises(UpdateRejected):
        agg.add(bad, 1)
    assert agg.count == 0 and agg.total_samples == 0  # nothing of it was counted
    agg.add({"w": torch.tensor([2.0, 4.0])}, 2, checked=True)
    assert agg.result()["w"].tolist() == [2.0, 4.0]
