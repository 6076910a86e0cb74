"""Dataset readers on files generated in the real formats, and on broken or hostile ones."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from teefl.errors import TeeflError
from teefl.plan import DatasetSpec, SyntheticSpec
from teefl.workload import datasets as ds
from teefl.workload.datasets import (
    DATASET_META,
    DATASET_NAMES,
    dataset_shape,
    load_dataset,
    read_cifar_batch,
    read_idx,
    resolve_root,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test may find the machine's datasets or the developer's $TEEFL_DATA by accident."""
    monkeypatch.delenv("TEEFL_DATA", raising=False)
    monkeypatch.setattr(ds, "SYSTEM_DATA_DIR", tmp_path / "system")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- writers for the real formats -----------------------------------------------------------
IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
IDX_CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX as LeCun specifies it: 0 0 type ndim, big-endian uint32 dims, big-endian data."""
    code = IDX_CODES[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(d: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, size: int = 28):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(d / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(d / f"{split}-labels-idx1-ubyte", y, gz)
        arrays[split] = (x, y)
    return arrays


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for CIFAR: str as BINSTRING, numpy.core paths."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _binstring(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _binstring
    dispatch[str] = _binstring

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_dump(obj, path: Path) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def cifar_batch(n: int, classes: int, seed: int, fine: bool) -> dict:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    labels = [int(v) for v in rng.integers(0, classes, size=n)]
    if fine:
        batch[b"fine_labels"] = labels
        batch[b"coarse_labels"] = [v // 5 for v in labels]
    else:
        batch[b"labels"] = labels
    return batch


# -- IDX ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_images_and_labels(tmp_path, gz):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    y = np.array([7, 1], dtype=np.uint8)
    px = write_idx(tmp_path / "images-idx3-ubyte", x, gz)
    py = write_idx(tmp_path / "labels-idx1-ubyte", y, gz)
    np.testing.assert_array_equal(read_idx(px), x)
    np.testing.assert_array_equal(read_idx(py), y)


def test_read_idx_accepts_name_without_gz(tmp_path):
    x = np.arange(6, dtype=np.uint8).reshape(2, 3)
    write_idx(tmp_path / "f-idx2-ubyte", x, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "f-idx2-ubyte"), x)
    write_idx(tmp_path / "g-idx2-ubyte", x, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "g-idx2-ubyte.gz"), x)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_wide_types_are_big_endian(tmp_path, dtype):
    arr = (np.arange(12).reshape(3, 4) * (-3 if dtype is not np.int8 else -1)).astype(dtype)
    out = read_idx(write_idx(tmp_path / "w", arr, gz=False))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_bad_magic(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(TeeflError, match=r"not an IDX file \(magic starts 01 02, expected 00 00\)"):
        read_idx(p)


def test_read_idx_unknown_type_code(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(TeeflError, match="unknown IDX data type code 0x07"):
        read_idx(p)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_truncated(tmp_path, gz):
    p = tmp_path / "t"
    data = idx_bytes(np.zeros((2, 5), dtype=np.uint8))[:-1]
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(
        TeeflError, match=r"t: IDX data is 9 bytes but dims \[2, 5\] need 10 \(trunc"
    ):
        read_idx(p)


def test_read_idx_trailing_bytes(tmp_path):
    p = tmp_path / "t"
    p.write_bytes(idx_bytes(np.zeros((2, 5), dtype=np.uint8)) + b"xx")
    with pytest.raises(TeeflError, match=r"12 bytes but dims \[2, 5\] need 10 \(trailing bytes\)"):
        read_idx(p)


def test_read_idx_truncated_header(tmp_path):
    p = tmp_path / "h"
    p.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02")
    with pytest.raises(TeeflError, match=r"truncated IDX header \(8 of 16 bytes\)"):
        read_idx(p)


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_read_idx_corrupt_gzip(tmp_path, damage):
    blob = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8))))
    if damage == "cut":
        blob = blob[: len(blob) // 2]
    else:
        blob[-6] ^= 0xFF  # inside the CRC32/size trailer
    p = tmp_path / "c.gz"
    p.write_bytes(bytes(blob))
    with pytest.raises(TeeflError, match=r"c\.gz: corrupt gzip data .*re-download"):
        read_idx(p)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(TeeflError, match="IDX file not found"):
        read_idx(tmp_path / "nope")


# -- MNIST-style directories ------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_from_plan_root(tmp_path, gz):
    arrays = write_mnist(tmp_path / "m", gz=gz)
    data = load_dataset(DatasetSpec(name="mnist", root=tmp_path / "m"))
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (10, 1, 28, 28)
    assert data.y_train.dtype == torch.int64
    np.testing.assert_array_equal(data.x_train[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(data.y_test.numpy(), arrays["t10k"][1])
    assert (data.channels, data.classes, data.source) == (1, 10, str(tmp_path / "m"))


def test_load_from_data_dir_name_subdir_and_env(tmp_path, monkeypatch):
    write_mnist(tmp_path / "dd" / "fashion-mnist")
    spec = DatasetSpec(name="fashion-mnist")
    assert load_dataset(spec, data_dir=tmp_path / "dd").source == str(tmp_path / "dd/fashion-mnist")
    write_mnist(tmp_path / "env")
    monkeypatch.setenv("TEEFL_DATA", str(tmp_path / "env"))
    assert load_dataset(spec).source == str(tmp_path / "env")


def test_load_from_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    data = load_dataset(DatasetSpec(name="fashion-mnist"), data_dir=tmp_path / "tv")
    assert len(data.x_train) == 20


def test_resolve_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TEEFL_DATA", "/env")
    got = resolve_root("cifar10", Path("/plan"), Path("/cli"))
    expected = ["/plan", "/cli", "/cli/cifar10", "/env", "/env/cifar10"]
    assert got == [Path(p) for p in expected] + [tmp_path / "system" / "cifar10"]
    monkeypatch.delenv("TEEFL_DATA")
    assert resolve_root("mnist", None, None) == [tmp_path / "system" / "mnist"]


def test_missing_dataset_names_searched_dirs_and_fix(tmp_path):
    with pytest.raises(TeeflError) as err:
        load_dataset(DatasetSpec(name="fashion-mnist"), data_dir=tmp_path / "dd")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("dataset 'fashion-mnist' not found; searched: ")
    for d in (tmp_path / "dd", tmp_path / "dd/fashion-mnist", tmp_path / "system/fashion-mnist"):
        assert str(d) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "--data-dir" in msg and "TEEFL_DATA" in msg


def test_missing_cifar_says_extract_archive(tmp_path):
    with pytest.raises(TeeflError, match=r"extract cifar-100-python\.tar\.gz into a directory"):
        load_dataset(DatasetSpec(name="cifar100"))


def test_a_plan_root_that_does_not_exist_never_falls_back(tmp_path, monkeypatch):
    # the system copy (and $TEEFL_DATA, --data-dir) hold the dataset: a typo in dataset.root
    # must not silently train on them
    write_mnist(tmp_path / "system" / "mnist")
    write_mnist(tmp_path / "env")
    monkeypatch.setenv("TEEFL_DATA", str(tmp_path / "env"))
    assert load_dataset(DatasetSpec(name="mnist")).source == str(tmp_path / "env")
    missing = tmp_path / "typo"
    with pytest.raises(TeeflError) as err:
        load_dataset(DatasetSpec(name="mnist", root=missing), data_dir=tmp_path / "env")
    assert str(err.value) == (
        f"dataset.root {missing} does not exist: fix dataset.root in the plan (or remove it to "
        f"search --data-dir, $TEEFL_DATA and {tmp_path / 'system' / 'mnist'})"
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(TeeflError, match=r"dataset.root .*/file is not a directory"):
        load_dataset(DatasetSpec(name="mnist", root=tmp_path / "file"))


def test_incomplete_directory_is_reported(tmp_path):
    write_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TeeflError, match=r"incomplete: .*/m lacks t10k-labels-idx1-ubyte"):
        load_dataset(DatasetSpec(name="mnist", root=tmp_path / "m"))


def test_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8), gz=True)
    with pytest.raises(TeeflError, match=r"holds 20 images but .* holds 19 labels"):
        load_dataset(DatasetSpec(name="mnist", root=tmp_path / "m"))


def test_label_out_of_range(tmp_path):
    write_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte", np.full(10, 10, np.uint8), gz=True)
    with pytest.raises(TeeflError, match=r"labels range 10\.\.10, expected 0\.\.9"):
        load_dataset(DatasetSpec(name="mnist", root=tmp_path / "m"))


def test_wrong_image_size_for_dataset(tmp_path):
    write_mnist(tmp_path / "m", size=32)
    with pytest.raises(TeeflError, match=r"expected uint8 images of 28x28 for mnist"):
        load_dataset(DatasetSpec(name="mnist", root=tmp_path / "m"))


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(ds, "SYSTEM_DATA_DIR", FMNIST.parent)
    data = load_dataset(DatasetSpec(name="fashion-mnist"))
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.source == str(FMNIST)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10


# -- CIFAR ----------------------------------------------------------------------------------
def write_cifar10(d: Path, n: int = 4, dump=py2_dump) -> dict:
    d.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(n, 10, i, fine=False) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, 10, 9, fine=False)
    for name, batch in batches.items():
        dump(batch, d / name)
    return batches


def _py3_protocol2(obj, path):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _py3_protocol4(obj, path):
    path.write_bytes(pickle.dumps(obj, protocol=4))


@pytest.mark.parametrize("dump", [py2_dump, _py3_protocol2, _py3_protocol4])
def test_load_cifar10_archive_layout(tmp_path, dump):
    batches = write_cifar10(tmp_path / "dd" / "cifar-10-batches-py", dump=dump)
    data = load_dataset(DatasetSpec(name="cifar10"), data_dir=tmp_path / "dd")
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert (data.channels, data.classes) == (3, 10)
    first = batches["data_batch_1"]
    np.testing.assert_array_equal(data.x_train[:4].numpy().reshape(4, 3072), first[b"data"])
    assert data.y_train[:4].tolist() == first[b"labels"]
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]


def test_py2_writer_emits_real_cifar_opcodes(tmp_path):
    """Guards the fixture itself: it must look like the real files, not like a Python 3 dump."""
    py2_dump(cifar_batch(2, 10, 0, fine=False), tmp_path / "b")
    raw = (tmp_path / "b").read_bytes()
    assert raw.startswith(b"\x80\x02}")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"_codecs" not in raw and b"U\x04data" in raw


def test_load_cifar100(tmp_path):
    d = tmp_path / "c100"
    d.mkdir()
    train, test = cifar_batch(6, 100, 1, fine=True), cifar_batch(2, 100, 2, fine=True)
    train[b"fine_labels"][0] = 99
    py2_dump(train, d / "train")
    py2_dump(test, d / "test")
    data = load_dataset(DatasetSpec(name="cifar100", root=d))
    assert data.x_train.shape == (6, 3, 32, 32) and data.classes == 100
    assert data.y_train.tolist() == train[b"fine_labels"]  # fine, not coarse labels
    x, y = read_cifar_batch(d / "test")
    assert x.dtype == np.uint8 and y.dtype == np.int64 and x.shape == (2, 3, 32, 32)


class _Shell:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = cifar_batch(2, 10, 0, fine=False)
    evil[b"batch_label"] = _Shell(f"touch {marker}")
    payload = pickle.dumps(evil, protocol=2)
    # the payload is live: a plain pickle.loads would run it
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    (tmp_path / "data_batch_1").write_bytes(payload)
    with pytest.raises(
        TeeflError, match=r"refusing to unpickle (posix|os|nt)\.system .*not a plain"
    ):
        read_cifar_batch(tmp_path / "data_batch_1")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_builtins_eval_is_refused(tmp_path, protocol):
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": _Eval()}, protocol=protocol))
    # protocol 2 spells the module the Python 2 way
    with pytest.raises(TeeflError, match=r"refusing to unpickle (__builtin__|builtins)\.eval"):
        read_cifar_batch(tmp_path / "b")


def test_object_array_is_rejected(tmp_path):
    batch = cifar_batch(2, 10, 0, fine=False)
    batch[b"data"] = batch[b"data"].astype(object)
    py2_dump(batch, tmp_path / "b")
    with pytest.raises(TeeflError, match="no uint8 2-D 'data' array"):
        read_cifar_batch(tmp_path / "b")


def test_cifar_wrong_row_width(tmp_path):
    batch = cifar_batch(2, 10, 0, fine=False)
    batch[b"data"] = batch[b"data"][:, :3071]
    py2_dump(batch, tmp_path / "b")
    with pytest.raises(TeeflError, match="rows have 3071 values, expected 3072"):
        read_cifar_batch(tmp_path / "b")


def test_cifar_label_count_and_range(tmp_path):
    batch = cifar_batch(3, 10, 0, fine=False)
    batch[b"labels"] = batch[b"labels"][:2]
    py2_dump(batch, tmp_path / "short")
    with pytest.raises(TeeflError, match="3 images but 2 labels"):
        read_cifar_batch(tmp_path / "short")
    batch = cifar_batch(3, 10, 0, fine=False)
    batch[b"labels"][1] = 10
    py2_dump(batch, tmp_path / "range")
    read_cifar_batch(tmp_path / "range")  # fine without a class count
    with pytest.raises(TeeflError, match=r"labels range .*10, expected 0\.\.9"):
        read_cifar_batch(tmp_path / "range", classes=10)


def test_cifar_truncated_pickle(tmp_path):
    py2_dump(cifar_batch(2, 10, 0, fine=False), tmp_path / "b")
    raw = (tmp_path / "b").read_bytes()
    (tmp_path / "b").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TeeflError, match=r"b: corrupt CIFAR batch \(.*\); re-extract the archive"):
        read_cifar_batch(tmp_path / "b")


def test_cifar_not_a_dict(tmp_path):
    (tmp_path / "b").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(TeeflError, match=r"not a CIFAR batch \(top level is list\)"):
        read_cifar_batch(tmp_path / "b")


# -- synthetic and metadata -------------------------------------------------------------------
def test_synthetic_is_seeded_and_shaped():
    spec = DatasetSpec(
        name="synthetic",
        synthetic=SyntheticSpec(shape=(3, 9, 13), classes=4, train_size=50, test_size=20),
    )
    a, b, c = load_dataset(spec, seed=1), load_dataset(spec, seed=1), load_dataset(spec, seed=2)
    assert a.x_train.shape == (50, 3, 9, 13) and a.x_test.shape == (20, 3, 9, 13)
    assert a.x_train.dtype == torch.uint8 and a.y_train.dtype == torch.int64
    assert set(a.y_train.tolist()) <= {0, 1, 2, 3} and (a.channels, a.classes) == (3, 4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.source == "synthetic (seed 1)"
    assert dataset_shape(spec) == (3, 9, 13, 4)


def test_synthetic_classes_differ_in_mean():
    """The class signal is what makes it learnable: per-class means must be far apart."""
    spec = DatasetSpec(name="synthetic", synthetic=SyntheticSpec(classes=3, train_size=600))
    data = load_dataset(spec, seed=0)
    means = [data.x_train[data.y_train == k].float().mean(0) for k in range(3)]
    assert (means[0] - means[1]).abs().mean() > 10  # noise-only would be ~ 70/sqrt(200)*0.8


def test_dataset_shape_without_files():
    for name, meta in DATASET_META.items():
        assert dataset_shape(DatasetSpec(name=name)) == meta
    assert set(DATASET_NAMES) == {*DATASET_META, "synthetic"}
    with pytest.raises(ValueError, match="unknown dataset"):
        DatasetSpec(name="imagenet")
