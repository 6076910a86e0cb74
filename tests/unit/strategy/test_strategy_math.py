"""Every strategy against a result computed by hand: tiny tensors, the numbers written out.

Where a number is not a short decimal, the comment gives the formula it was worked out from
(with a calculator, not with the code under test).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from teefl.errors import TeeflError
from teefl.strategy import (
    PROXIMAL_MU,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    ProximalTerm,
    TrimmedMean,
    proximal_term,
)
from teefl.wire import codec
from teefl.wire.checks import FlatUpdate

F64 = torch.float64


def _run(strategy, rnd, ref, updates, flat):
    """One round: begin, add every (state, samples), the result as a dict. ``flat``: updates
    as `FlatUpdate`s and the result written into a payload's run views, as the aggregator's
    zero-copy path does."""
    layout = codec.Layout.of_state(ref)
    acc = strategy.begin(rnd, ref, layout if flat else None)
    assert (acc.layout is not None) == flat
    for state, samples in updates:
        acc.add(FlatUpdate(layout, codec.encode_state(state)) if flat else state, samples)
    if not flat:
        return acc.result()
    payload = layout.allocate()
    acc.result_into(layout.run_views(payload))
    return {k: v.clone() for k, v in layout.tensor_views(payload).items()}


def _bn(w, mean, count):
    return {
        "w": torch.tensor(w),
        "bn.running_mean": torch.tensor(mean),
        "bn.num_batches_tracked": torch.tensor(count),
    }


@pytest.mark.parametrize("flat", [False, True])
def test_fedavg(flat) -> None:
    ref = _bn([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0], 0)
    ups = [
        (_bn([[1.0, 2.0], [3.0, 4.0]], [1.0, 0.0], 5), 1),
        (_bn([[3.0, 6.0], [0.0, 8.0]], [4.0, 2.0], 7), 3),
    ]
    out = _run(FedAvg(), 1, ref, ups, flat)
    # (1*1 + 3*3)/4 = 2.5, (2 + 18)/4 = 5, (3 + 0)/4 = 0.75, (4 + 24)/4 = 7
    assert torch.equal(out["w"], torch.tensor([[2.5, 5.0], [0.75, 7.0]]))
    assert torch.equal(out["bn.running_mean"], torch.tensor([3.25, 1.5]))  # 13/4, 6/4
    assert out["bn.num_batches_tracked"].item() == 7  # a counter: the largest


def _five():
    cols = [[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 1.0], [4.0, 2.0]]
    return [(_bn(c, c, i), 1 + 10 * i) for i, c in enumerate(cols)]


@pytest.mark.parametrize("flat", [False, True])
def test_median(flat) -> None:
    ref = _bn([0.0, 0.0], [0.0, 0.0], 0)
    ups = _five()
    # odd: column 0 sorted 1 2 3 4 100 -> 3; column 1 sorted -5 0 1 2 10 -> 1 (weights ignored)
    out = _run(Median(), 1, ref, ups, flat)
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))
    assert torch.equal(out["bn.running_mean"], torch.tensor([3.0, 1.0]))
    assert out["bn.num_batches_tracked"].item() == 4
    # even (the first four): 1 2 3 100 -> (2+3)/2 = 2.5; -5 0 1 10 -> (0+1)/2 = 0.5
    out = _run(Median(), 1, ref, ups[:4], flat)
    assert torch.equal(out["w"], torch.tensor([2.5, 0.5]))


@pytest.mark.parametrize("flat", [False, True])
def test_trimmed_mean(flat) -> None:
    ref = _bn([0.0, 0.0], [0.0, 0.0], 0)
    # trim_ratio 0.2 of 5: one value dropped at each end.
    # column 0: 1 [2 3 4] 100 -> 3; column 1: -5 [0 1 2] 10 -> 1
    out = _run(TrimmedMean({"trim_ratio": 0.2}), 1, ref, _five(), flat)
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))
    # trim_ratio 0.1 of 5: int(0.5) = 0 dropped, the plain mean: 110/5 = 22, 8/5 = 1.6
    out = _run(TrimmedMean({"trim_ratio": 0.1}), 1, ref, _five(), flat)
    assert torch.allclose(out["w"], torch.tensor([22.0, 1.6]), rtol=0, atol=1e-6)


def test_fedprox_term_and_its_gradient() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([3.0]))
    prox = ProximalTerm(model, 0.4)  # the round's global model
    with torch.no_grad():  # local training moved the weights
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))
        model.bias.copy_(torch.tensor([3.5]))
    term = prox(model)
    # ||w - w_g||^2 = 1^2 + (-2)^2 + 0.5^2 = 5.25; mu/2 * 5.25 = 0.2 * 5.25 = 1.05
    assert term.item() == pytest.approx(1.05, rel=1e-6)
    term.backward()
    # d/dw = mu * (w - w_g) = 0.4 * [1, -2] and 0.4 * 0.5
    assert torch.allclose(model.weight.grad, torch.tensor([[0.4, -0.8]]))
    assert torch.allclose(model.bias.grad, torch.tensor([0.2]))
    # the functional form, on plain tensors: 0.5/2 * (1 + 4) = 1.25
    w = [torch.tensor([1.0, 2.0])]
    assert proximal_term(w, [torch.tensor([0.0, 4.0])], 0.5).item() == 1.25
    assert ProximalTerm(model, 0.0)(model).item() == 0.0


def test_fedprox_server_is_fedavg_and_sends_mu() -> None:
    assert FedProx({"mu": 0.25}).configure(1) == {PROXIMAL_MU: 0.25}
    assert FedAvg().configure(1) == {}
    ref = {"w": torch.zeros(2)}
    ups = [({"w": torch.tensor([1.0, 2.0])}, 1), ({"w": torch.tensor([3.0, 6.0])}, 3)]
    assert torch.equal(
        _run(FedProx({"mu": 0.25}), 1, ref, ups, True)["w"], torch.tensor([2.5, 5.0])
    )


# FedOpt: x0 = [1, 0] (float64); eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 0.01, so
# m0 = 0, v0 = tau^2 = 1e-4. Round 1: [2, 1] x1 sample and [4, -1] x3 samples, mean
# [3.5, -0.5], delta1 = [2.5, -0.5]. Round 2: [1, 0] and [1.25, 1] x1 each, mean [1.125, 0.5].
# A BatchNorm running variance (not stepped: the mean) and a counter (the largest) ride along.
OPT = {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.01}


def _opt_model(w, var, count):
    return {
        "w": torch.tensor(w, dtype=F64),
        "bn.running_var": torch.tensor(var, dtype=F64),
        "bn.num_batches_tracked": torch.tensor(count),
    }


ROUND1 = [(_opt_model([2.0, 1.0], [1.0], 3), 1), (_opt_model([4.0, -1.0], [3.0], 4), 3)]
ROUND2 = [(_opt_model([1.0, 0.0], [2.0], 9), 1), (_opt_model([1.25, 1.0], [4.0], 8), 1)]


def _two_rounds(strategy, flat):
    x1 = _run(strategy, 1, _opt_model([1.0, 0.0], [1.0], 0), ROUND1, flat)
    assert torch.equal(x1["bn.running_var"], torch.tensor([2.5], dtype=F64))  # (1 + 9)/4
    assert x1["bn.num_batches_tracked"].item() == 4
    s1 = strategy.state()
    x2 = _run(strategy, 2, x1, ROUND2, flat)
    assert torch.equal(x2["bn.running_var"], torch.tensor([3.0], dtype=F64))
    assert x2["bn.num_batches_tracked"].item() == 9
    return x1, s1, x2, strategy.state()


def _close(t, values):
    assert torch.allclose(t, torch.tensor(values, dtype=t.dtype), rtol=1e-12, atol=0), (t, values)


@pytest.mark.parametrize("flat", [False, True])
def test_fedadam(flat) -> None:
    x1, s1, x2, s2 = _two_rounds(FedAdam(OPT), flat)
    # round 1: m1 = 0.1 * delta1 = [0.25, -0.05]
    #          v1 = 0.99e-4 + 0.01 * delta1^2 = [0.062599, 0.002599]
    #          x1 = x0 + 0.1 * m1 / (sqrt(v1) + 0.01)
    _close(s1.tensors["m/w"], [0.25, -0.05])
    _close(s1.tensors["v/w"], [0.062599, 0.002599])
    _close(x1["w"], [1.09608070595291, -0.0819935742019278])
    assert s1.meta == {"t": 1}
    # round 2: delta2 = [1.125, 0.5] - x1 = [0.0289192940470897, 0.581993574201928]
    #          m2 = 0.9 m1 + 0.1 delta2, v2 = 0.99 v1 + 0.01 delta2^2,
    #          x2 = x1 + 0.1 m2 / (sqrt(v2) + 0.01)
    _close(s2.tensors["m/w"], [0.227891929404709, 0.0131993574201928])
    _close(s2.tensors["v/w"], [0.0619813732556819, 0.00596017520412335])
    _close(x2["w"], [1.18408325998907, -0.0668570732733858])
    assert s2.meta == {"t": 2}


@pytest.mark.parametrize("flat", [False, True])
def test_fedyogi(flat) -> None:
    x1, s1, x2, s2 = _two_rounds(FedYogi(OPT), flat)
    # round 1: v0 = 1e-4 < delta1^2, so sign(v0 - delta1^2) = -1 and v1 = v0 + 0.01 delta1^2
    #          = [0.0626, 0.0026]; m1 as FedAdam's
    _close(s1.tensors["v/w"], [0.0626, 0.0026])
    _close(x1["w"], [1.09607996802557, -0.0819803902718556])
    # round 2: delta2 = [0.0289200319744256, 0.581980390271856]; coordinate 0: v1 = 0.0626 >
    #          delta2^2 = 0.000836, so v shrinks: 0.0626 - 0.01 * 0.000836 = 0.062591636...;
    #          coordinate 1: v1 < delta2^2, v grows: 0.0026 + 0.01 * 0.3387... = 0.005987...
    _close(s2.tensors["m/w"], [0.227892003197443, 0.0131980390271856])
    _close(s2.tensors["v/w"], [0.062591636317506, 0.00598701174660982])
    _close(x2["w"], [1.18366902003752, -0.0668754737593657])


@pytest.mark.parametrize("flat", [False, True])
def test_fedadagrad(flat) -> None:
    opt = {"eta": 0.1, "tau": 0.01}  # beta_1 defaults to 0: m = delta
    x1, s1, x2, s2 = _two_rounds(FedAdagrad(opt), flat)
    # round 1: m1 = delta1, v1 = 1e-4 + delta1^2 = [6.2501, 0.2501],
    #          x1 = x0 + 0.1 m1 / (sqrt(v1) + 0.01)
    _close(s1.tensors["m/w"], [2.5, -0.5])
    _close(s1.tensors["v/w"], [6.2501, 0.2501])
    _close(x1["w"], [1.0996007999968, -0.0980199980003999])
    # round 2: delta2 = [1.125, 0.5] - x1 = [0.0253992000032, 0.5980199980004]; v2 = v1 + delta2^2
    _close(s2.tensors["m/w"], [0.0253992000032, 0.5980199980004])
    _close(s2.tensors["v/w"], [6.2507451193608, 0.607727918008398])
    _close(x2["w"], [1.10061266024122, -0.0222799482785496])


def test_fedopt_sends_the_client_learning_rate_when_given() -> None:
    assert FedAdam(OPT).configure(1) == {}
    assert FedAdam({**OPT, "eta_l": 0.05}).configure(3) == {"lr": 0.05}


def test_fedopt_result_is_applied_once() -> None:
    s = FedAdam(OPT)
    ref = _opt_model([1.0, 0.0], [1.0], 0)
    acc = s.begin(1, ref)
    acc.add(*ROUND1[0])
    acc.result()
    with pytest.raises(TeeflError, match="applied once"):
        acc.result()
    with pytest.raises(TeeflError, match="round 3 cannot begin"):
        s.begin(3, ref)


# Krum, f = 1 of n = 5, so each score sums the n - f - 2 = 2 smallest squared distances.
# u0 = [0, 0], u1 = [1, 0], u2 = [0, 2], u3 = [1, 1], u4 = [10, 10] (the Byzantine one, which
# also claims a huge sample count). Squared distances: d01 = 1, d02 = 4, d03 = 2, d04 = 200,
# d12 = 5, d13 = 1, d14 = 181, d23 = 2, d24 = 164, d34 = 162. Scores: s0 = 1 + 2 = 3,
# s1 = 1 + 1 = 2, s2 = 2 + 4 = 6, s3 = 1 + 2 = 3, s4 = 162 + 164 = 326.
KRUM = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0]]


def _krum_updates():
    return [
        ({"w": torch.tensor(u), "n": torch.tensor(i)}, 10**6 if i == 4 else 1)
        for i, u in enumerate(KRUM)
    ]


@pytest.mark.parametrize("flat", [False, True])
def test_krum_and_multi_krum(flat) -> None:
    ref = {"w": torch.zeros(2), "n": torch.tensor(0)}
    acc = Krum({"f": 1}).begin(1, ref, codec.Layout.of_state(ref) if flat else None)
    for state, samples in _krum_updates():
        acc.add(state, samples)
    assert acc.scores() == [3.0, 2.0, 6.0, 3.0, 326.0]
    out = acc.result()
    assert torch.equal(out["w"], torch.tensor([1.0, 0.0]))  # u1, the lowest score
    assert out["n"].item() == 1  # exactly the chosen update, its counter included
    # m = 3: u1 (2), then the tie s0 = s3 = 3 in the order added: mean of u1, u0, u3
    out = _run(MultiKrum({"f": 1, "m": 3}), 1, ref, _krum_updates(), flat)
    assert torch.allclose(out["w"], torch.tensor([2 / 3, 1 / 3]), rtol=0, atol=1e-7)
    assert out["n"].item() == 3
    # m defaults to n - f = 4: u1, u0, u3, u2 -> [(1+0+1+0)/4, (0+0+1+2)/4]
    out = _run(MultiKrum({"f": 1}), 1, ref, _krum_updates(), flat)
    assert torch.equal(out["w"], torch.tensor([0.5, 0.75]))


def test_krum_needs_2f_plus_3_updates() -> None:
    ref = {"w": torch.zeros(2), "n": torch.tensor(0)}
    acc = Krum({"f": 1}).begin(1, ref)
    for state, samples in _krum_updates()[:4]:
        acc.add(state, samples)
    with pytest.raises(TeeflError, match="at least 2f\\+3 = 5"):
        acc.result()
