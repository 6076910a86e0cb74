"""The networks a federation trains, built by name so a plan can pick one.

Why these three: ``small_cnn`` keeps tests and smoke runs fast on a CPU; ``resnet18`` and
``mobilenet_v3_small`` are the torchvision reference models, so the update sizes the measurements
report (11.2 M and 1.5 M parameters) are the ones other papers quote. Weights are never
downloaded: a federation starts from a seeded random initialization that every party can rebuild.
"""

from __future__ import annotations

import torch
from torch import nn

from teefl.catalog import MODEL_NAMES
from teefl.errors import TeeflError

__all__ = ["MODEL_NAMES"]  # with the names below; re-exported from `teefl.catalog`


class SmallCNN(nn.Module):
    """Two conv+pool blocks and two linear layers (~150 k parameters).

    The adaptive pooling makes the classifier input independent of the image size, so the same
    network handles 28x28 (MNIST) and 32x32 (CIFAR) and any synthetic shape >= 4x4.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _same_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv``'s configuration taking ``in_channels`` inputs.

    Initialized the way torchvision initializes its convolutions (Kaiming normal, fan-out), so a
    1-channel ResNet starts from the same distribution as the stock 3-channel one.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _build(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes)
    # imported here: torchvision's own import (its ops pull in torch._dynamo) takes seconds,
    # which every party paid at start even for a model that does not need it
    import torchvision

    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = _same_conv(model.conv1, in_channels)
        return model
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.features[0][0] = _same_conv(model.features[0][0], in_channels)
    return model


def build_model(
    name: str, in_channels: int, num_classes: int, seed: int | None = None
) -> torch.nn.Module:
    """Build network ``name`` for ``in_channels``-channel images and ``num_classes`` classes.

    With ``seed`` the initial weights are a pure function of the arguments -- the aggregator and
    a test can rebuild the same starting point -- without disturbing the caller's global RNG.
    """
    if name not in MODEL_NAMES:
        raise TeeflError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if in_channels < 1:
        raise TeeflError(f"model {name}: in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise TeeflError(f"model {name}: num_classes must be >= 2, got {num_classes}")
    if seed is None:
        return _build(name, in_channels, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, in_channels, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what a federated update carries)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
