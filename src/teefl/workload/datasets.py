"""Datasets read from local files only -- never downloaded at run time.

Why our own readers instead of ``torchvision.datasets``: those download on a miss, expect their
own directory layout, and unpickle CIFAR with the unrestricted ``pickle`` module. A confidential
run must not reach the network and must not execute code from a data file, so the IDX and CIFAR
formats are parsed here, strictly, and every problem becomes one `TeeflError` line that says
which file is wrong and what to do.

Images are kept as uint8 (N x C x H x W): 4x smaller than float, converted per batch in training.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teefl.catalog import DATASET_NAMES
from teefl.errors import TeeflError
from teefl.plan import DatasetSpec, SyntheticSpec

__all__ = ["DATASET_NAMES"]  # with the names below; re-exported from `teefl.catalog`

#: (channels, height, width, classes) -- lets the aggregator build the model without the data
DATASET_META: dict[str, tuple[int, int, int, int]] = {
    "mnist": (1, 28, 28, 10),
    "fashion-mnist": (1, 28, 28, 10),
    "cifar10": (3, 32, 32, 10),
    "cifar100": (3, 32, 32, 100),
}

#: last place searched; a module attribute so tests can point it elsewhere
SYSTEM_DATA_DIR = Path("/usr/share/datasets")

_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FILES: dict[str, tuple[str, ...]] = {
    "mnist": _IDX_STEMS,
    "fashion-mnist": _IDX_STEMS,
    "cifar10": (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    "cifar100": ("train", "test"),
}
#: subdirectories a candidate may hold the files in: the archives' and torchvision's layouts
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("MNIST/raw",),
    "fashion-mnist": ("FashionMNIST/raw",),
    "cifar10": ("cifar-10-batches-py",),
    "cifar100": ("cifar-100-python",),
}


@dataclass
class Dataset:
    """A whole dataset in memory; ``source`` records where it came from for the run report."""

    name: str
    x_train: torch.Tensor  # uint8, N x C x H x W
    y_train: torch.Tensor  # int64, N
    x_test: torch.Tensor
    y_test: torch.Tensor
    channels: int
    classes: int
    source: str


def _unknown(name: str) -> TeeflError:
    return TeeflError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")


def dataset_shape(spec: DatasetSpec) -> tuple[int, int, int, int]:
    """(channels, height, width, classes) of ``spec``'s dataset, without reading any file."""
    if spec.name == "synthetic":
        c, h, w = spec.synthetic.shape
        return (c, h, w, spec.synthetic.classes)
    if spec.name not in DATASET_META:
        raise _unknown(spec.name)
    return DATASET_META[spec.name]


# -- locating files -----------------------------------------------------------------------------
def resolve_root(name: str, spec_root: Path | None, data_dir: Path | None) -> list[Path]:
    """Directories to look in, most specific first: plan, --data-dir, $TEEFL_DATA, system."""
    candidates: list[Path] = []
    if spec_root is not None:
        candidates.append(Path(spec_root))
    if data_dir is not None:
        candidates += [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("TEEFL_DATA")
    if env:
        candidates += [Path(env), Path(env) / name]
    candidates.append(SYSTEM_DATA_DIR / name)
    return list(dict.fromkeys(candidates))  # drop duplicates, keep order


def check_root(spec: DatasetSpec) -> None:
    """A ``dataset.root`` the plan names must exist.

    Why refuse instead of searching on: the later candidates (``--data-dir``, ``$TEEFL_DATA``,
    the system copy) may hold *a* copy of the dataset, and a typo in the plan would then train on
    data the user did not choose, without a word.
    """
    if spec.root is not None and spec.name != "synthetic" and not Path(spec.root).is_dir():
        what = "is not a directory" if Path(spec.root).exists() else "does not exist"
        raise TeeflError(
            f"dataset.root {spec.root} {what}: fix dataset.root in the plan (or remove it to "
            f"search --data-dir, $TEEFL_DATA and {SYSTEM_DATA_DIR / spec.name})"
        )


def _find_file(directory: Path, stem: str) -> Path | None:
    # MNIST's own archive unpacks to "train-images.idx3-ubyte" on some systems; accept both
    for base in dict.fromkeys((stem, stem.replace("-idx", ".idx"))):
        for name in (base, base + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def locate_files(name: str, candidates: list[Path]) -> tuple[dict[str, Path] | None, list[str]]:
    """The first directory holding every file of ``name``; else notes on partial matches."""
    notes = []
    for cand in candidates:
        for d in (cand, *(cand / sub for sub in _SUBDIRS[name])):
            found = {stem: _find_file(d, stem) for stem in _FILES[name]}
            if all(found.values()):
                return {k: v for k, v in found.items() if v is not None}, notes
            missing = [stem for stem, p in found.items() if p is None]
            if len(missing) < len(found):
                notes.append(f"{d} lacks {', '.join(missing)}")
    return None, notes


def _missing_message(name: str, candidates: list[Path], notes: list[str]) -> str:
    searched = ", ".join(str(c) for c in candidates)
    partial = f" (incomplete: {'; '.join(notes)})" if notes else ""
    how = "pass --data-dir DIR, set TEEFL_DATA=DIR or set dataset.root in the plan"
    if name in ("mnist", "fashion-mnist"):
        files = ", ".join(s + ".gz" for s in _IDX_STEMS)
        apt = "apt-get install dataset-fashion-mnist, or " if name == "fashion-mnist" else ""
        fix = f"{apt}put the IDX files ({files}) in a directory DIR and {how}"
    else:
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        fix = f"extract {archive} into a directory DIR and {how}"
    return f"dataset {name!r} not found; searched: {searched}{partial}. To fix: {fix}"


# -- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    """File contents, gunzipped when the bytes (not the name) say gzip."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TeeflError(f"cannot read {path}: {exc.strerror}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise TeeflError(f"{path}: corrupt gzip data ({exc}); re-download the file") from None


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or plain) into a native-endian array of its declared shape.

    ``path`` may name the file with or without ``.gz``; whichever exists is read.
    """
    path = Path(path)
    if not path.is_file():
        alt = path.with_name(path.name[:-3]) if path.name.endswith(".gz") else Path(f"{path}.gz")
        if not alt.is_file():
            raise TeeflError(f"IDX file not found: {path} (nor {alt.name})")
        path = alt
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise TeeflError(f"{path}: not an IDX file ({len(raw)} bytes, shorter than the header)")
    if raw[0] != 0 or raw[1] != 0:
        raise TeeflError(
            f"{path}: not an IDX file (magic starts {raw[0]:02x} {raw[1]:02x}, expected 00 00)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise TeeflError(f"{path}: unknown IDX data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TeeflError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        raise TeeflError(
            f"{path}: IDX data is {actual} bytes but dims {list(dims)} need {expected} "
            f"({what}); re-download the file"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


def _idx_pair(name: str, images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    _, height, width, classes = DATASET_META[name]
    x, y = read_idx(images), read_idx(labels)
    if x.dtype != np.uint8 or x.shape[1:] != (height, width):
        raise TeeflError(
            f"{images}: expected uint8 images of {height}x{width} for {name}, "
            f"got {x.dtype} of shape {list(x.shape)}"
        )
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise TeeflError(f"{labels}: expected a 1-D integer label file, got shape {list(y.shape)}")
    if len(x) != len(y):
        raise TeeflError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    _check_labels(y, classes, labels)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def _check_labels(y: np.ndarray, classes: int | None, path: Path) -> None:
    if len(y) and (y.min() < 0 or (classes is not None and y.max() >= classes)):
        bound = f"0..{classes - 1}" if classes is not None else ">= 0"
        raise TeeflError(f"{path}: labels range {y.min()}..{y.max()}, expected {bound}")


# -- CIFAR (python pickle batches) --------------------------------------------------------------
def _reconstruct() -> Callable[..., Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn  # type: ignore[no-redef]
    return fn


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals a CIFAR batch is made of: a dict of bytes, lists and uint8 arrays.

    Unpickling calls any global the file names, so an unrestricted load of a planted "dataset"
    file runs arbitrary code. The real files (Python 2, protocol 2) name numpy's array
    reconstructor, ``ndarray`` and ``dtype``; Python 3 protocol-2 rewrites also need
    ``_codecs.encode`` (their way of spelling bytes). Everything else is refused before it loads.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        import codecs

        rec = _reconstruct()
        self._allowed: dict[tuple[str, str], Any] = {
            ("numpy.core.multiarray", "_reconstruct"): rec,
            ("numpy._core.multiarray", "_reconstruct"): rec,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise TeeflError(
                f"refusing to unpickle {module}.{name} from {self._path} (not a plain CIFAR "
                "batch); replace the file with one from the official archive"
            ) from None


def read_cifar_batch(path: Path, classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10/100 python batch as (uint8 N x 3 x 32 x 32, int64 N) numpy arrays.

    CIFAR-100 batches carry ``fine_labels`` (100 classes), CIFAR-10 ones ``labels``.
    With ``classes`` the labels are also checked to lie in 0..classes-1.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except TeeflError:
        raise
    except OSError as exc:
        raise TeeflError(f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:  # any parse failure of an untrusted file is a data problem
        raise TeeflError(
            f"{path}: corrupt CIFAR batch ({type(exc).__name__}: {exc}); re-extract the archive"
        ) from None
    if not isinstance(obj, dict):
        raise TeeflError(f"{path}: not a CIFAR batch (top level is {type(obj).__name__})")
    d = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    data = d.get(b"data")
    labels = d.get(b"fine_labels", d.get(b"labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise TeeflError(f"{path}: CIFAR batch has no uint8 2-D 'data' array")
    if data.shape[1] != 3072:
        raise TeeflError(f"{path}: CIFAR rows have {data.shape[1]} values, expected 3072 (3x32x32)")
    if labels is None:
        raise TeeflError(f"{path}: CIFAR batch has no 'labels' or 'fine_labels'")
    y = np.asarray(labels)
    if y.ndim != 1 or (len(y) and y.dtype.kind not in "iu"):
        raise TeeflError(f"{path}: CIFAR labels are not a list of integers")
    if len(y) != len(data):
        raise TeeflError(f"{path}: {len(data)} images but {len(y)} labels")
    _check_labels(y, classes, path)
    return data.reshape(-1, 3, 32, 32).copy(), y.astype(np.int64)


def _cifar(name: str, files: dict[str, Path]) -> tuple[torch.Tensor, ...]:
    classes = DATASET_META[name][3]
    parts = [read_cifar_batch(p, classes) for p in files.values()]
    train, (x_test, y_test) = parts[:-1], parts[-1]  # the test batch is listed last
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return tuple(torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))


# -- synthetic ----------------------------------------------------------------------------------
def make_synthetic(spec: SyntheticSpec, seed: int) -> Dataset:
    """A seeded, learnable dataset: per-class blocky mean images plus Gaussian noise.

    The class signal lives in 4x4 blocks so a small CNN's pooling sees it, and the noise is strong
    enough that a model needs a few epochs -- a federation's accuracy visibly climbs over rounds.
    """
    c, h, w = spec.shape
    if min(c, h, w) < 1:
        raise TeeflError(f"dataset.synthetic.shape must be positive, got {list(spec.shape)}")
    rng = np.random.default_rng(seed)
    cell = 4
    protos = rng.uniform(-1.0, 1.0, size=(spec.classes, c, -(-h // cell), -(-w // cell)))
    protos = protos.repeat(cell, axis=2).repeat(cell, axis=3)[:, :, :h, :w].astype(np.float32)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, spec.classes, size=n)
        x = np.empty((n, c, h, w), dtype=np.uint8)
        for s in range(0, n, 2048):  # bounded float scratch memory for large shapes
            e = min(n, s + 2048)
            noise = rng.standard_normal((e - s, c, h, w), dtype=np.float32)
            x[s:e] = np.clip(127.5 + 40.0 * protos[y[s:e]] + 70.0 * noise, 0, 255).astype(np.uint8)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    x_train, y_train = draw(spec.train_size)
    x_test, y_test = draw(spec.test_size)
    return Dataset(
        "synthetic", x_train, y_train, x_test, y_test, c, spec.classes, f"synthetic (seed {seed})"
    )


# -- entry point --------------------------------------------------------------------------------
def load_dataset(
    spec: DatasetSpec,
    data_dir: Path | None = None,
    seed: int = 0,
    *,
    only: list[Path] | None = None,
) -> Dataset:
    """Load ``spec``'s dataset from the first directory (see `resolve_root`) that has it all.

    ``seed`` only matters for ``synthetic``. A directory with the files present but broken is an
    error rather than a reason to keep searching: silently training on other data would be worse.
    ``only``: search these directories and nothing else (a party's own data must never be
    replaced by a shared copy found elsewhere).
    """
    if spec.name == "synthetic":
        return make_synthetic(spec.synthetic, seed)
    if spec.name not in DATASET_META:
        raise _unknown(spec.name)
    if only is not None:
        candidates = list(dict.fromkeys(Path(p) for p in only))
    else:
        check_root(spec)
        candidates = resolve_root(spec.name, spec.root, data_dir)
    files, notes = locate_files(spec.name, candidates)
    if files is None:
        raise TeeflError(_missing_message(spec.name, candidates, notes))
    if spec.name in ("mnist", "fashion-mnist"):
        tr_x, tr_y, te_x, te_y = (files[s] for s in _IDX_STEMS)
        x_train, y_train = _idx_pair(spec.name, tr_x, tr_y)
        x_test, y_test = _idx_pair(spec.name, te_x, te_y)
    else:
        x_train, y_train, x_test, y_test = _cifar(spec.name, files)
    channels, _, _, classes = DATASET_META[spec.name]
    source = str(next(iter(files.values())).parent)
    return Dataset(spec.name, x_train, y_train, x_test, y_test, channels, classes, source)
