"""``vision``: teefl's built-in image classification (the paper's study) on the Workload API.

It is today's `models`, `datasets`, `partition` and `train` behind the four methods, with the
same seeds: the same plan gives the same initial model (`build_model` is what the aggregator
builds), the same shards, the same training and the same figures as the collaborator's own code
did. Its options are the plan's four sections under one key each (`Vision.options_from_plan`).

Data modes (`teefl.workload.api.Party`): in shard mode (simulation) every party loads the whole
dataset -- from ``dataset.root``, the party's ``data_dir``, ``$TEEFL_DATA`` or the system
directory -- and keeps its shard; in local mode the party's ``data_dir`` (or ``data_dir/<name>``)
holds its own train and test files in the dataset's standard format, used whole, and nothing
else is searched. ``synthetic`` has no files: it is always a shard of the seeded set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from teefl.plan import DatasetSpec, ModelSpec, PartitionSpec, TrainingSpec
from teefl.wire import roundconfig
from teefl.workload.api import Party, RoundInfo
from teefl.workload.datasets import Dataset, dataset_shape, load_dataset
from teefl.workload.models import build_model
from teefl.workload.partition import collaborator_data
from teefl.workload.train import evaluate, train_local


class VisionOptions(BaseModel):
    """The plan's ``model``, ``dataset``, ``partition`` and ``training`` sections, as they are."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = ModelSpec()
    dataset: DatasetSpec = DatasetSpec()
    partition: PartitionSpec = PartitionSpec()
    training: TrainingSpec = TrainingSpec()


@dataclass
class VisionData:
    """A party's images (uint8 N x C x H x W) and labels, and where they came from."""

    dataset: Dataset  # the whole loaded set (shard mode) or the party's own files
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    device: torch.device


def _first(n: int, cap: int | None, seed: int) -> torch.Tensor:
    """A seeded random order of range(n), cut to ``cap`` (the dataset caps' meaning)."""
    order = np.random.default_rng(seed).permutation(n)[:cap]
    return torch.from_numpy(order.astype(np.int64))


class Vision:
    """Image classification with teefl's models and datasets (see the module docstring)."""

    Options = VisionOptions

    def __init__(self, options: VisionOptions) -> None:
        self.options = options

    @staticmethod
    def options_from_plan(plan: Any) -> dict[str, Any]:
        """The options equivalent to a plan's top-level model/dataset/partition/training."""
        return {
            k: getattr(plan, k).model_dump(mode="json")
            for k in ("model", "dataset", "partition", "training")
        }

    def build_model(self, seed: int) -> torch.nn.Module:
        channels, _, _, classes = dataset_shape(self.options.dataset)
        return build_model(self.options.model.name, channels, classes, seed=seed)

    def load(self, party: Party) -> VisionData:
        o = self.options
        device = torch.device(party.device)
        if party.local and o.dataset.name != "synthetic":
            assert party.data_dir is not None
            d = party.data_dir
            data = load_dataset(o.dataset, only=[d, d / o.dataset.name])
            tr = _first(len(data.y_train), o.dataset.max_samples_per_collaborator, party.seed)
            te = _first(len(data.y_test), o.dataset.max_test_samples, party.seed)
            return VisionData(
                data, data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], device
            )
        data = load_dataset(o.dataset, party.data_dir, seed=party.seed)
        x_train, y_train, x_test, y_test = collaborator_data(
            data, party.index, party.count, o.partition, o.dataset, party.seed
        )
        return VisionData(data, x_train, y_train, x_test, y_test, device)

    def train(self, model: torch.nn.Module, data: VisionData, info: RoundInfo) -> dict:
        """`train_local` with the strategy's round learning rate and FedProx weight."""
        lr, mu = roundconfig.training_overrides(info.config)
        o = self.options.training
        return train_local(
            model, data.x_train, data.y_train, o, data.device, info.seed, lr=lr, proximal_mu=mu
        )

    def evaluate(self, model: torch.nn.Module, data: VisionData) -> dict:
        bs = self.options.training.batch_size
        return evaluate(model, data.x_test, data.y_test, bs, data.device)

    def describe(self, data: VisionData) -> dict[str, Any]:
        """The ``dataset`` record of the collaborator's env file, as it writes it today."""
        return dataset_record(data.dataset, len(data.y_train), len(data.y_test))


def dataset_record(d: Any, shard_train: int, shard_test: int) -> dict[str, Any]:
    """The ``dataset`` record of a collaborator's env file: the dataset and this party's shard."""
    return {
        "name": d.name,
        "source": d.source,
        "train_samples": len(d.y_train),
        "test_samples": len(d.y_test),
        "shape": list(d.x_train.shape[1:]),
        "classes": d.classes,
        "size_bytes": int(d.x_train.numel() + d.x_test.numel()),
        "shard_train": shard_train,
        "shard_test": shard_test,
    }
