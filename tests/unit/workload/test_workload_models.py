"""Model construction: exact parameter counts (the update sizes the measurements report)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from teefl.errors import TeeflError
from teefl.plan import ModelSpec
from teefl.workload.models import MODEL_NAMES, SmallCNN, build_model, count_parameters

R18 = 11_181_642
MBV3 = 1_528_106


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resnet18_reference_count():
    assert count_parameters(build_model("resnet18", 3, 10)) == R18


def test_resnet18_one_channel_count_and_conv_config():
    model = build_model("resnet18", 1, 10)
    # only conv1 changes: 64 filters x 7x7 lose two of their three input planes
    assert count_parameters(model) == 11_175_370 == R18 - 2 * 64 * 7 * 7
    assert (count_parameters(model) - R18) / R18 == pytest.approx(-0.00056, abs=5e-6)
    conv = model.conv1
    assert (conv.in_channels, conv.out_channels) == (1, 64)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert conv.bias is None


def test_resnet18_hundred_classes_count():
    count = count_parameters(build_model("resnet18", 3, 100))
    assert count - R18 == 46_170 == 90 * (512 + 1)
    assert (count - R18) / R18 == pytest.approx(0.0041, abs=5e-5)


def test_mobilenet_v3_small_counts():
    assert count_parameters(build_model("mobilenet_v3_small", 3, 10)) == MBV3
    one = build_model("mobilenet_v3_small", 1, 10)
    assert count_parameters(one) == 1_527_818 < MBV3
    first = one.features[0][0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.stride) == (
        1,
        16,
        (3, 3),
        (2, 2),
    )
    hundred = count_parameters(build_model("mobilenet_v3_small", 3, 100))
    assert hundred == 1_620_356 > MBV3


@pytest.mark.parametrize("size", [28, 32])
def test_small_cnn_handles_mnist_and_cifar_sizes(size):
    model = build_model("small_cnn", 3, 7, seed=0)
    assert isinstance(model, SmallCNN)
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 7)
    assert count_parameters(model) < 200_000  # small enough for fast CPU tests


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_run_on_one_channel_28x28(name):
    model = build_model(name, 1, 10, seed=0).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_seed_makes_init_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("small_cnn", 1, 10, seed=5)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    b = build_model("small_cnn", 1, 10, seed=5)
    c = build_model("small_cnn", 1, 10, seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_seeded_replaced_conv_is_deterministic():
    a = build_model("resnet18", 1, 10, seed=1).conv1.weight
    b = build_model("resnet18", 1, 10, seed=1).conv1.weight
    assert torch.equal(a, b)


def test_unknown_model_lists_choices():
    with pytest.raises(
        TeeflError, match=r"unknown model 'vgg16'; choose one of: small_cnn, resnet18"
    ):
        build_model("vgg16", 3, 10)


@pytest.mark.parametrize(("channels", "classes"), [(0, 10), (3, 1)])
def test_bad_shape_rejected(channels, classes):
    with pytest.raises(TeeflError, match="must be >= "):
        build_model("small_cnn", channels, classes)


def test_count_parameters_skips_frozen():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert count_parameters(model) == 15 + 8
    model[0].requires_grad_(False)
    assert count_parameters(model) == 8


def test_plan_accepts_exactly_model_names():
    for name in MODEL_NAMES:
        assert ModelSpec(name=name).name == name
    with pytest.raises(ValueError, match="unknown model"):
        ModelSpec(name="resnet50")
