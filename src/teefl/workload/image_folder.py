"""``image-folder``: a torchvision model by name on a folder of class sub-folders of images.

The layout is torchvision's ``ImageFolder``: ``<root>/<class>/<image>`` (PNG, JPEG, ...). Why
the classes are listed in the options: ``ImageFolder`` numbers the classes it finds in sorted
order, so a party whose folder lacks one class would number the others differently from its
peers and poison the average; here the stated list fixes every label's index, a party may hold
a subset of the classes, and a folder not in the list is an error.

The model is built with ``torchvision.models.get_model(name, weights=None, num_classes=...)``:
random, seeded weights, never a download (``weights`` in ``model_args`` is refused).
Transforms, stated in the options: resize the shorter side to ``resize`` (default
``image_size``), centre-crop to ``image_size``, to RGB tensor, normalize with ``mean``/``std``;
training adds the listed ``augment`` steps (``hflip``; ``crop`` = a random crop of
``image_size`` after padding by 4).

Data: ``<data_dir>/<subdir>``. If it holds ``train/`` and ``test/`` folders, those are the
splits; else a seeded ``test_fraction`` of the images is held out. Local mode: all of it is the
party's; shard mode: the images are split among the parties (seeded, IID).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from teefl.errors import TeeflError
from teefl.workload.api import Party, RoundInfo
from teefl.workload.partition import partition_indices


class ImageFolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: a torchvision classification model (``torchvision.models.list_models()``)
    model: str = "resnet18"
    #: extra keyword arguments to its constructor (never ``weights``)
    model_args: dict[str, Any] = Field(default_factory=dict)
    #: the class folder names, in label order
    classes: list[str] = Field(min_length=2)
    #: folder under the party's data_dir holding the class folders (or train/ and test/)
    subdir: str = ""
    image_size: int = Field(32, ge=8)
    resize: int | None = Field(None, ge=8)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: list[Literal["hflip", "crop"]] = Field(default_factory=list)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    test_fraction: float = Field(0.2, gt=0, lt=1)

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if v not in names:
            raise ValueError(
                f"unknown torchvision classification model {v!r} (e.g. resnet18, "
                "mobilenet_v3_small, efficientnet_b0; see torchvision.models.list_models())"
            )
        return v

    @field_validator("model_args")
    @classmethod
    def _no_weights(cls, v: dict[str, Any]) -> dict[str, Any]:
        banned = {"weights", "weights_backbone", "pretrained", "num_classes"} & set(v)
        if banned:
            raise ValueError(
                f"{', '.join(sorted(banned))} cannot be set: weights are never downloaded and "
                "num_classes comes from classes"
            )
        return v

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("std must be > 0")
        return v

    @model_validator(mode="after")
    def _unique(self) -> ImageFolderOptions:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: each class once")
        return self


@dataclass
class ImageFolderData:
    train: Any  # a torch Dataset yielding (C x H x W float tensor, label)
    test: Any
    device: torch.device
    source: str


def _folder(root: Path, classes: list[str], transform: Any) -> Any:
    """torchvision's ImageFolder numbering the classes by the stated list."""
    from torchvision.datasets import ImageFolder

    class _Fixed(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            found = sorted(e.name for e in Path(directory).iterdir() if e.is_dir())
            unknown = [f for f in found if f not in classes]
            if unknown:
                raise TeeflError(
                    f"{directory}: class folder(s) {', '.join(unknown)} are not among the "
                    f"stated classes ({', '.join(classes)})"
                )
            if not found:
                raise TeeflError(f"{directory}: no class folders (expected <class>/<image>)")
            return classes, {c: i for i, c in enumerate(classes)}

    if not root.is_dir():
        raise TeeflError(f"image folder not found: {root}")
    try:
        return _Fixed(str(root), transform=transform, allow_empty=True)
    except TeeflError:
        raise
    except Exception as exc:
        raise TeeflError(f"{root}: cannot read the image folder: {exc}") from None


class ImageFolderWorkload:
    """A torchvision model on an ImageFolder directory (see the module docstring)."""

    Options = ImageFolderOptions

    def __init__(self, options: ImageFolderOptions) -> None:
        self.options = options

    def build_model(self, seed: int) -> nn.Module:
        import torchvision

        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torchvision.models.get_model(
                o.model, weights=None, num_classes=len(o.classes), **o.model_args
            )

    def _transform(self, train: bool) -> Any:
        from torchvision import transforms as T

        o = self.options
        steps: list[Any] = [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(o.resize or o.image_size),
            T.CenterCrop(o.image_size),
        ]
        if train and "crop" in o.augment:
            steps.append(T.RandomCrop(o.image_size, padding=4))
        if train and "hflip" in o.augment:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(o.mean, o.std)]
        return T.Compose(steps)

    def load(self, party: Party) -> ImageFolderData:
        from torch.utils.data import Subset

        o = self.options
        if party.data_dir is None:
            raise TeeflError(f"party {party.name} has no data directory; pass --data-dir")
        root = party.data_dir / o.subdir if o.subdir else party.data_dir
        split = (root / "train").is_dir() and (root / "test").is_dir()
        train_root, test_root = (root / "train", root / "test") if split else (root, root)
        train = _folder(train_root, o.classes, self._transform(True))
        test = _folder(test_root, o.classes, self._transform(False))
        train_idx = np.arange(len(train.targets))
        test_idx = np.arange(len(test.targets))
        if not party.local:
            train_idx = _shard(train.targets, party)
            test_idx = _shard(test.targets, party) if split else train_idx
        if not split:
            order = np.random.default_rng(party.seed).permutation(train_idx)
            n_test = max(1, round(len(order) * o.test_fraction)) if len(order) > 1 else 0
            test_idx, train_idx = order[:n_test], order[n_test:]
        if len(train_idx) == 0:
            raise TeeflError(f"{train_root}: no training images for party {party.name}")
        return ImageFolderData(
            Subset(train, train_idx.tolist()),
            Subset(test, test_idx.tolist()),
            torch.device(party.device),
            str(root),
        )

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.options.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.options.lr, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=self.options.lr)

    def train(self, model: nn.Module, data: ImageFolderData, info: RoundInfo) -> dict[str, Any]:
        from torch.utils.data import DataLoader

        o, dev = self.options, data.device
        n = len(data.train)
        gen = torch.Generator().manual_seed(info.seed)
        # a trailing batch of one is dropped: BatchNorm cannot train on a single image
        drop = n % o.batch_size == 1 and n > 1
        loader = DataLoader(
            data.train, batch_size=o.batch_size, shuffle=True, generator=gen, drop_last=drop
        )
        model.to(dev).train()
        opt = self._optimizer(model)
        loss_fn = nn.CrossEntropyLoss()
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(info.seed)  # augmentation and dropout draws
            for _ in range(o.epochs):
                for xb, yb in loader:
                    xb, yb = xb.to(dev), yb.to(dev)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(yb)
                    count += len(yb)
        return {"loss": total / max(count, 1), "samples": n}

    def evaluate(self, model: nn.Module, data: ImageFolderData) -> dict[str, Any]:
        from torch.utils.data import DataLoader

        n = len(data.test)
        if n == 0:
            raise TeeflError("no held-out images to evaluate on; raise test_fraction")
        was = model.training
        model.to(data.device).eval()
        loss_sum, correct = 0.0, 0
        try:
            with torch.no_grad():
                for xb, yb in DataLoader(data.test, batch_size=self.options.batch_size):
                    xb, yb = xb.to(data.device), yb.to(data.device)
                    out = model(xb)
                    loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
                    correct += int((out.argmax(dim=1) == yb).sum().item())
        finally:
            model.train(was)
        return {"accuracy": correct / n, "loss": loss_sum / n, "samples": n}

    def describe(self, data: ImageFolderData) -> dict[str, Any]:
        return {
            "source": data.source,
            "train_images": len(data.train),
            "test_images": len(data.test),
            "classes": len(self.options.classes),
            "image_size": self.options.image_size,
        }


def _shard(targets: list[int], party: Party) -> np.ndarray:
    return partition_indices(np.asarray(targets), party.count, "iid", seed=party.seed)[party.index]
