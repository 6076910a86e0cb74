"""Splitting a dataset among collaborators, identically on every host.

Why index lists from a seed: each collaborator loads the full dataset itself and keeps only its
shard, so no data ever travels; the shards agree across hosts because every party computes the
same partition from the plan's seed. ``dirichlet`` gives the label-skewed (non-IID) splits that
federated-learning papers use, with ``alpha`` setting how skewed.
"""

from __future__ import annotations

import numpy as np
import torch

from teefl.errors import TeeflError
from teefl.plan import DatasetSpec, PartitionSpec
from teefl.workload.datasets import Dataset


def _iid(n: int, n_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [part.astype(np.int64) for part in np.array_split(rng.permutation(n), n_parts)]


def _dirichlet(
    labels: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        share = rng.dirichlet(np.full(n_parts, alpha))
        cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.append(chunk)
    return [np.concatenate(p).astype(np.int64) for p in parts]


def _fill_empty(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty part one index taken from the currently largest part."""
    for i, part in enumerate(parts):
        if len(part) == 0:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def partition_indices(
    labels: np.ndarray, n_parts: int, kind: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``n_parts`` disjoint, non-empty, shuffled index arrays.

    ``iid``: a seeded shuffle cut into equal shards (sizes differ by at most one).
    ``dirichlet``: each class is divided by proportions drawn from Dirichlet(alpha); a draw that
    leaves a part empty is redrawn a few times, then fixed up by moving single samples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n_parts < 1:
        raise TeeflError(f"cannot partition into {n_parts} parts; need at least one collaborator")
    if n < n_parts:
        raise TeeflError(
            f"only {n} samples for {n_parts} collaborators; use fewer collaborators or more data"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return _iid(n, n_parts, rng)
    if kind != "dirichlet":
        raise TeeflError(f"unknown partition kind {kind!r}; choose iid or dirichlet")
    if alpha <= 0:
        raise TeeflError(f"partition.alpha must be > 0, got {alpha}")
    for _ in range(10):
        parts = _dirichlet(labels, n_parts, alpha, rng)
        if all(len(p) for p in parts):
            break
    parts = _fill_empty(parts)
    # shuffle within a part so "the first k" (max_samples_per_collaborator) is not one class
    return [rng.permutation(p) for p in parts]


def collaborator_data(
    dataset: Dataset,
    index: int,
    n_parts: int,
    spec_partition: PartitionSpec,
    spec_dataset: DatasetSpec,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collaborator ``index``'s (x_train, y_train, x_test, y_test) out of ``n_parts``.

    Training data follows ``spec_partition``; the test side is an IID shard of the test split
    (``test_split: shard``) or all of it (``full``, the same for everyone so scores compare).
    ``max_samples_per_collaborator`` / ``max_test_samples`` keep the first k of the shuffled
    order, i.e. a random subset.
    """
    if not 0 <= index < n_parts:
        raise TeeflError(f"collaborator index {index} out of range for {n_parts} collaborators")
    train = partition_indices(
        dataset.y_train.numpy(), n_parts, spec_partition.kind, spec_partition.alpha, seed
    )[index]
    train = train[: spec_dataset.max_samples_per_collaborator]
    n_test = len(dataset.y_test)
    if spec_dataset.test_split == "shard":
        test = partition_indices(dataset.y_test.numpy(), n_parts, "iid", seed=seed)[index]
    else:
        test = np.random.default_rng(seed).permutation(n_test)
    test = test[: spec_dataset.max_test_samples]
    tr, te = torch.from_numpy(train), torch.from_numpy(test.astype(np.int64))
    return dataset.x_train[tr], dataset.y_train[tr], dataset.x_test[te], dataset.y_test[te]
