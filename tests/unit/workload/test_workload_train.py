"""Local training learns, is reproducible, and evaluation reports exact fractions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from teefl.errors import TeeflError
from teefl.plan import DatasetSpec, SyntheticSpec, TrainingSpec
from teefl.workload.datasets import load_dataset
from teefl.workload.models import build_model
from teefl.workload.train import (
    configure_threads,
    evaluate,
    resolve_device,
    to_float,
    train_local,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic():
    spec = SyntheticSpec(shape=(1, 16, 16), classes=4, train_size=512, test_size=256)
    return load_dataset(DatasetSpec(name="synthetic", synthetic=spec), seed=0)


def test_training_reduces_loss_and_beats_chance(synthetic):
    data = synthetic
    model = build_model("small_cnn", 1, 4, seed=0)
    before = evaluate(model, data.x_test, data.y_test, 128, CPU)
    spec = TrainingSpec(epochs=1, batch_size=32, lr=2e-3)
    first = train_local(model, data.x_train, data.y_train, spec, CPU, seed=0)
    second = train_local(model, data.x_train, data.y_train, spec, CPU, seed=1)
    after = evaluate(model, data.x_test, data.y_test, 128, CPU)
    assert first["samples"] == 512
    assert second["loss"] < first["loss"]
    assert after["loss"] < before["loss"]
    assert before["accuracy"] < 0.45  # an untrained net is near chance (0.25)
    assert after["accuracy"] > 0.7


def test_training_is_reproducible_from_seed(synthetic):
    data, spec = synthetic, TrainingSpec(epochs=1, batch_size=64, lr=1e-3)
    x, y = data.x_train[:128], data.y_train[:128]
    runs = []
    for seed in (3, 3, 4):
        model = build_model("small_cnn", 1, 4, seed=0)
        train_local(model, x, y, spec, CPU, seed=seed)
        runs.append(model.classifier[-1].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the seed drives the shuffle


def test_sgd_updates_weights(synthetic):
    model = build_model("small_cnn", 1, 4, seed=0)
    start = model.classifier[-1].weight.detach().clone()
    spec = TrainingSpec(epochs=1, batch_size=64, lr=0.01, optimizer="sgd")
    out = train_local(model, synthetic.x_train[:64], synthetic.y_train[:64], spec, CPU, seed=0)
    assert math.isfinite(out["loss"]) and out["samples"] == 64
    assert not torch.equal(start, model.classifier[-1].weight)


def test_trailing_single_sample_batch_is_merged():
    """BatchNorm refuses a batch of one in train mode; 33 samples / 32 must still train."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    x = torch.randint(0, 256, (33, 1, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 2, (33,))
    out = train_local(model, x, y, TrainingSpec(batch_size=32), CPU, seed=0)
    assert out["samples"] == 33


def test_empty_shard_is_a_user_error():
    model = build_model("small_cnn", 1, 4)
    empty = torch.zeros(0, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(TeeflError, match="no training samples"):
        train_local(model, empty, torch.zeros(0, dtype=torch.long), TrainingSpec(), CPU, 0)
    with pytest.raises(TeeflError, match="no test samples"):
        evaluate(model, empty, torch.zeros(0, dtype=torch.long), 8, CPU)


class _Constant(nn.Module):
    """Always predicts class 2 with fixed logits; the mode flag is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.0, 1.0, 3.0]))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.logits.expand(len(x), 3)


@pytest.mark.parametrize("start_training", [True, False])
def test_evaluate_exact_fraction_and_restores_mode(start_training):
    model = _Constant().train(start_training)
    x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    y = torch.tensor([2, 2, 2, 0, 1, 2, 0, 0, 2, 1])
    out = evaluate(model, x, y, batch_size=3, device=CPU)
    assert out["accuracy"] == pytest.approx(0.5) and out["samples"] == 10
    logp = torch.log_softmax(model.logits.detach(), 0)
    expected = -(5 * logp[2] + 3 * logp[0] + 2 * logp[1]) / 10
    assert out["loss"] == pytest.approx(float(expected))
    assert model.modes == [False] * 4  # 4 batches of <= 3, all in eval mode
    assert model.training is start_training


def test_to_float_range():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8)
    out = to_float(x)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([-1.0, 1.0, -0.6])
    with pytest.raises(TypeError, match="uint8"):
        to_float(out)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(TeeflError, match=r"torch sees no CUDA GPU; set training\.device to auto"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(TeeflError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_configure_threads():
    assert configure_threads(None) == 1  # the fixture's setting, unchanged
    assert configure_threads(2) == 2
    assert torch.get_num_threads() == 2
    with pytest.raises(TeeflError, match="threads must be >= 1"):
        configure_threads(0)
