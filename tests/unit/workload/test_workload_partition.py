"""Partitions must be disjoint, complete and the same on every host (seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from teefl.errors import TeeflError
from teefl.plan import DatasetSpec, PartitionSpec
from teefl.workload.datasets import Dataset
from teefl.workload.partition import collaborator_data, partition_indices


def assert_partition(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "indices lost or duplicated"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)


def labels_of(n: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def test_iid_equal_shards_and_seeded():
    labels = labels_of(103)
    parts = partition_indices(labels, 4, "iid", seed=7)
    assert_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    again = partition_indices(labels, 4, "iid", seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, 4, "iid", seed=8)
    assert not np.array_equal(parts[0], other[0])
    assert not np.array_equal(parts[0], np.sort(parts[0]))  # shuffled, not contiguous


def _max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_dirichlet_skews_labels_and_alpha_controls_it():
    labels = labels_of(5000)
    skewed = partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0)
    mild = partition_indices(labels, 5, "dirichlet", alpha=100.0, seed=0)
    iid = partition_indices(labels, 5, "iid", seed=0)
    for parts in (skewed, mild):
        assert_partition(parts, 5000)
    # IID shards hold ~10 % of each class; alpha=0.1 concentrates parts on few classes
    assert _max_class_share(labels, iid) < 0.15
    assert _max_class_share(labels, mild) < 0.15
    assert _max_class_share(labels, skewed) > 0.35


def test_dirichlet_seeded():
    labels = labels_of(500)
    a = partition_indices(labels, 3, "dirichlet", alpha=0.5, seed=3)
    b = partition_indices(labels, 3, "dirichlet", alpha=0.5, seed=3)
    c = partition_indices(labels, 3, "dirichlet", alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_never_leaves_a_part_empty():
    labels = labels_of(40, classes=2)
    for seed in range(20):
        assert_partition(partition_indices(labels, 20, "dirichlet", alpha=0.01, seed=seed), 40)
    # the degenerate case: exactly one sample per part
    assert_partition(partition_indices(labels_of(8), 8, "dirichlet", alpha=0.01), 8)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    n_parts=st.integers(1, 12),
    classes=st.integers(1, 6),
    kind=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.floats(0.01, 50),
    seed=st.integers(0, 2**31),
)
def test_partition_property(n, n_parts, classes, kind, alpha, seed):
    if n < n_parts:
        with pytest.raises(TeeflError, match=f"only {n} samples for {n_parts} collaborators"):
            partition_indices(labels_of(n, classes), n_parts, kind, alpha, seed)
        return
    parts = partition_indices(labels_of(n, classes), n_parts, kind, alpha, seed)
    assert len(parts) == n_parts
    assert_partition(parts, n)


def test_bad_arguments():
    with pytest.raises(TeeflError, match="unknown partition kind 'shards'"):
        partition_indices(labels_of(10), 2, "shards")
    with pytest.raises(TeeflError, match="need at least one collaborator"):
        partition_indices(labels_of(10), 0)
    with pytest.raises(TeeflError, match="alpha must be > 0"):
        partition_indices(labels_of(10), 2, "dirichlet", alpha=0)


# -- collaborator_data ------------------------------------------------------------------------
def numbered_dataset(n_train: int = 60, n_test: int = 30) -> Dataset:
    """Each image holds its own index in pixel [0, 0, 0] (mod 256) so rows can be traced."""

    def images(n):
        x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
        x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
        x[:, 0, 0, 1] = torch.arange(n) // 256
        return x

    return Dataset(
        "synthetic",
        images(n_train),
        torch.arange(n_train) % 3,
        images(n_test),
        torch.arange(n_test) % 3,
        1,
        3,
        "test",
    )


def row_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()


def test_collaborators_share_out_train_and_test_shards():
    data = numbered_dataset()
    spec_d, spec_p = DatasetSpec(name="synthetic"), PartitionSpec()
    shards = [collaborator_data(data, i, 3, spec_p, spec_d, seed=1) for i in range(3)]
    train_ids = [row_ids(s[0]) for s in shards]
    test_ids = [row_ids(s[2]) for s in shards]
    assert sorted(i for ids in train_ids for i in ids) == list(range(60))
    assert sorted(i for ids in test_ids for i in ids) == list(range(30))
    for x, y, xt, yt in shards:
        assert torch.equal(y, torch.tensor(row_ids(x)) % 3)  # labels travel with their images
        assert torch.equal(yt, torch.tensor(row_ids(xt)) % 3)


def test_full_test_split_and_caps():
    data = numbered_dataset()
    spec_d = DatasetSpec(
        name="synthetic", test_split="full", max_samples_per_collaborator=7, max_test_samples=12
    )
    spec_p = PartitionSpec(kind="dirichlet", alpha=1.0)
    a = collaborator_data(data, 0, 2, spec_p, spec_d, seed=5)
    b = collaborator_data(data, 1, 2, spec_p, spec_d, seed=5)
    assert len(a[0]) == 7 and len(b[0]) == 7
    assert not set(row_ids(a[0])) & set(row_ids(b[0]))
    assert len(a[2]) == 12 and torch.equal(a[2], b[2])  # everyone scores on the same subset
    uncapped = collaborator_data(data, 0, 2, spec_p, DatasetSpec(name="synthetic"), seed=5)
    assert row_ids(a[0]) == row_ids(uncapped[0])[:7]  # the cap keeps the shard's first k
    full = DatasetSpec(name="synthetic", test_split="full")
    assert sorted(row_ids(collaborator_data(data, 1, 2, spec_p, full, seed=5)[2])) == list(
        range(30)
    )


def test_collaborator_index_out_of_range():
    with pytest.raises(TeeflError, match="collaborator index 3 out of range for 3"):
        collaborator_data(numbered_dataset(), 3, 3, PartitionSpec(), DatasetSpec(), seed=0)
