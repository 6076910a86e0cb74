"""``noop``: the benchmarks' "no training" collaborator as a registered workload."""

from __future__ import annotations

import sys

import pytest
import torch
from paths import REPO

from teefl.workload.api import Party, RoundInfo
from teefl.workload.resolve import resolve_workload

ROOT = REPO


def test_returns_the_model_unchanged_and_reports_samples_only():
    w = resolve_workload("noop", {"model": "small_cnn", "samples": 16})
    model = w.build_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = w.load(Party("col1", 0, 2))
    assert w.train(model, data, RoundInfo(1, 5)) == {"samples": 16}
    assert w.evaluate(model, data) == {"samples": 16}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("spec", "options", "exact"),
    [
        ("synthetic6", {"model": "linear_stack", "layers": 1, "width": 1240}, True),
        ("mobilenet_v3_small", {"model": "mobilenet_v3_small"}, True),
        ("linear16", {"model": "mlp", "hidden": 16}, False),  # the benchmark seeds none
    ],
)
def test_payloads_are_the_benchmarks_ones(spec, options, exact, monkeypatch):
    """The same tensors as benchmarks/_common.build_module, so switching the benchmarks to this
    workload keeps their payloads (synthetic200 is linear_stack with 12 layers of 2048)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("_common", None)
    import _common

    with torch.random.fork_rng(devices=[]):
        want = _common.build_module(spec).state_dict()
    got = resolve_workload("noop", options).build_model(0).state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    if exact:
        assert all(torch.equal(got[k], want[k]) for k in want)
