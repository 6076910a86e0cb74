"""``tabular``: an MLP classifier on a CSV or Parquet table (features + a label column).

Why the schema is in the options: every party must encode its rows into the SAME feature
vector and label index, and the aggregator must build the MLP without seeing any data. So the
label's classes, the numeric columns and each categorical column's categories are stated in
the plan; a party's file with an unknown category or label is an error, not a silent new column.
What is fitted to data -- the mean and standard deviation of each numeric column -- is fitted on
the party's own training rows only, and nothing fitted leaves the party.

Preprocessing, in this order: numeric columns standard-scaled (``scaling: standard``, the
training rows' mean and population std; a constant column is only centred) or left as they are
(``none``); categorical columns one-hot encoded in the stated order of categories (``onehot``)
or replaced by their category's index (``ordinal``, not scaled). Missing values are refused with
the column named (fill them before training).

Data: the file ``file`` in the party's ``data_dir`` (or an absolute path). Local mode: all its
rows are the party's; shard mode: the rows are split among the parties (seeded, IID). The
held-out rows are ``test_file`` when given, else a seeded ``test_fraction`` of the party's rows.
Parquet needs pyarrow (``pip install 'teefl[parquet]'``).
"""

from __future__ import annotations

import importlib.util
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


class TabularOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the table in the party's data_dir (or an absolute path): .csv, .csv.gz, .parquet, .pq
    file: str = "data.csv"
    format: Literal["auto", "csv", "parquet"] = "auto"
    #: the label column and its classes, in output order (values compared as text)
    label: str
    classes: list[str] = Field(min_length=2)
    #: numeric feature columns
    numeric: list[str] = Field(default_factory=list)
    #: categorical feature columns and each one's categories (values compared as text)
    categorical: dict[str, list[str]] = Field(default_factory=dict)
    encoding: Literal["onehot", "ordinal"] = "onehot"
    scaling: Literal["standard", "none"] = "standard"
    #: hidden layer widths of the MLP
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    dropout: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    #: held-out rows: this file (same columns) or a seeded fraction of the party's rows
    test_file: str | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)

    @field_validator("classes", mode="before")
    @classmethod
    def _text_classes(cls, v: Any) -> Any:
        return [str(c) for c in v] if isinstance(v, list) else v

    @field_validator("categorical", mode="before")
    @classmethod
    def _text_categories(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: [str(c) for c in cs] if isinstance(cs, list) else cs for k, cs in v.items()}
        return v

    @field_validator("hidden")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("hidden layer widths must be >= 1")
        return v

    @model_validator(mode="after")
    def _schema(self) -> TabularOptions:
        if not self.numeric and not self.categorical:
            raise ValueError("name at least one feature column (numeric or categorical)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: each class once")
        roles = [*self.numeric, *self.categorical, self.label]
        twice = sorted({c for c in roles if roles.count(c) > 1})
        if twice:
            raise ValueError(f"column(s) {', '.join(twice)} named in more than one role")
        for col, cats in self.categorical.items():
            if not cats or len(set(cats)) != len(cats):
                raise ValueError(f"categorical.{col}: list each category once (at least one)")
        return self

    @property
    def n_features(self) -> int:
        if self.encoding == "onehot":
            return len(self.numeric) + sum(len(c) for c in self.categorical.values())
        return len(self.numeric) + len(self.categorical)


@dataclass
class TabularData:
    x_train: torch.Tensor  # float32 N x F
    y_train: torch.Tensor  # int64 N
    x_test: torch.Tensor
    y_test: torch.Tensor
    device: torch.device
    source: str
    mean: np.ndarray  # the scaling fitted on this party's training rows
    std: np.ndarray


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise TeeflError(f"{path}: cannot tell the table's format from its name; set format")


def read_table(path: Path, fmt: str, text_columns: list[str], columns: list[str]) -> Any:
    """The columns of a CSV/Parquet file as a pandas DataFrame; ``text_columns`` kept as text."""
    import pandas as pd

    if not path.is_file():
        raise TeeflError(f"table not found: {path}")
    kind = _format(path, fmt)
    try:
        if kind == "csv":
            df = pd.read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=True)
        else:
            if importlib.util.find_spec("pyarrow") is None:
                raise TeeflError(
                    f"reading {path} needs pyarrow, which is not installed: "
                    "pip install 'teefl[parquet]'"
                )
            df = pd.read_parquet(path)
    except TeeflError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise TeeflError(f"cannot read {path} as {kind}: {type(exc).__name__}: {msg}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns[:20]))
        raise TeeflError(f"{path} lacks column(s) {', '.join(missing)} (it has: {have})")
    return df[columns]


def _codes(series: Any, allowed: list[str], what: str, path: Path) -> np.ndarray:
    """Each value's index in ``allowed``; missing or unknown values are errors."""
    if series.isna().any():
        raise TeeflError(f"{path}: {what} has {int(series.isna().sum())} missing value(s)")
    text = series.astype(str)
    index = {c: i for i, c in enumerate(allowed)}
    codes = text.map(index)
    if codes.isna().any():
        unknown = sorted(set(text[codes.isna()]))
        shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise TeeflError(
            f"{path}: {what} has value(s) {shown} not among the stated ones "
            f"({', '.join(allowed[:10])}{' ...' if len(allowed) > 10 else ''})"
        )
    return codes.to_numpy(dtype=np.int64)


def _numeric(series: Any, col: str, path: Path) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(series, errors="coerce")
    bad = values.isna() & series.notna()
    if bad.any():
        first = series[bad].iloc[0]
        raise TeeflError(
            f"{path}: numeric column {col!r} has {int(bad.sum())} non-number(s), e.g. {first!r}"
        )
    if values.isna().any():
        raise TeeflError(f"{path}: column {col!r} has {int(values.isna().sum())} missing value(s)")
    return values.to_numpy(dtype=np.float64)


class Tabular:
    """MLP classification of table rows (see the module docstring)."""

    Options = TabularOptions

    def __init__(self, options: TabularOptions) -> None:
        self.options = options

    def build_model(self, seed: int) -> nn.Module:
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = o.n_features
            for h in o.hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                if o.dropout:
                    layers.append(nn.Dropout(o.dropout))
                width = h
            layers.append(nn.Linear(width, len(o.classes)))
            return nn.Sequential(*layers)

    # -- data --------------------------------------------------------------------------------
    def _path(self, party: Party, name: str) -> Path:
        p = Path(name).expanduser()
        if p.is_absolute():
            return p
        if party.data_dir is None:
            raise TeeflError(
                f"party {party.name} has no data directory to find {name} in; pass --data-dir"
            )
        return party.data_dir / p

    def _encode(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(numeric N x n float64, categorical codes N x c int64, labels N int64) of a file."""
        o = self.options
        cats = list(o.categorical)
        df = read_table(path, o.format, [*cats, o.label], [*o.numeric, *cats, o.label])
        num = (
            np.stack([_numeric(df[c], c, path) for c in o.numeric], axis=1)
            if o.numeric
            else (np.zeros((len(df), 0)))
        )
        codes = (
            np.stack([_codes(df[c], o.categorical[c], f"column {c!r}", path) for c in cats], axis=1)
            if cats
            else np.zeros((len(df), 0), dtype=np.int64)
        )
        labels = _codes(df[o.label], o.classes, f"label column {o.label!r}", path)
        return num, codes, labels

    def _features(self, num: np.ndarray, codes: np.ndarray, mean: np.ndarray, std: np.ndarray):
        o = self.options
        parts = [(num - mean) / std]
        if o.encoding == "onehot":
            for j, col in enumerate(o.categorical):
                parts.append(np.eye(len(o.categorical[col]))[codes[:, j]])
        else:
            parts.append(codes.astype(np.float64))
        return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))

    def load(self, party: Party) -> TabularData:
        o = self.options
        path = self._path(party, o.file)
        num, codes, labels = self._encode(path)
        rows = np.arange(len(labels))
        if not party.local:
            rows = partition_indices(labels, party.count, "iid", seed=party.seed)[party.index]
        if o.test_file is not None:
            t_num, t_codes, t_labels = self._encode(self._path(party, o.test_file))
            test_rows = np.arange(len(t_labels))
            if not party.local:
                test_rows = partition_indices(t_labels, party.count, "iid", seed=party.seed)[
                    party.index
                ]
            train_rows = rows
        else:
            order = np.random.default_rng(party.seed).permutation(rows)
            n_test = max(1, round(len(order) * o.test_fraction)) if len(order) > 1 else 0
            test_rows, train_rows = order[:n_test], order[n_test:]
            t_num, t_codes, t_labels = num, codes, labels
        if len(train_rows) == 0:
            raise TeeflError(f"{path}: no training rows for party {party.name}")
        mean = np.zeros(num.shape[1])
        std = np.ones(num.shape[1])
        if o.scaling == "standard" and num.shape[1]:
            mean = num[train_rows].mean(axis=0)
            std = num[train_rows].std(axis=0)
            std[std == 0] = 1.0
        return TabularData(
            self._features(num[train_rows], codes[train_rows], mean, std),
            torch.from_numpy(labels[train_rows]),
            self._features(t_num[test_rows], t_codes[test_rows], mean, std),
            torch.from_numpy(t_labels[test_rows]),
            torch.device(party.device),
            str(path),
            mean,
            std,
        )

    # -- rounds ------------------------------------------------------------------------------
    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.options.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.options.lr, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=self.options.lr)

    def train(self, model: nn.Module, data: TabularData, info: RoundInfo) -> dict[str, Any]:
        o, dev = self.options, data.device
        n = len(data.y_train)
        model.to(dev).train()
        opt = self._optimizer(model)  # fresh each round: optimiser state stays local (FedAvg)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(info.seed)
        total = 0.0
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(info.seed)  # dropout draws
            for _ in range(o.epochs):
                order = torch.randperm(n, generator=gen)
                for s in range(0, n, o.batch_size):
                    idx = order[s : s + o.batch_size]
                    xb, yb = data.x_train[idx].to(dev), data.y_train[idx].to(dev)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
        return {"loss": total / (n * o.epochs), "samples": n}

    def evaluate(self, model: nn.Module, data: TabularData) -> dict[str, Any]:
        n = len(data.y_test)
        if n == 0:
            raise TeeflError("no held-out rows to evaluate on; raise test_fraction")
        was = model.training
        model.to(data.device).eval()
        try:
            with torch.no_grad():
                out = model(data.x_test.to(data.device))
                y = data.y_test.to(data.device)
                loss = nn.functional.cross_entropy(out, y).item()
                correct = int((out.argmax(dim=1) == y).sum().item())
        finally:
            model.train(was)
        return {"accuracy": correct / n, "loss": loss, "samples": n}

    def describe(self, data: TabularData) -> dict[str, Any]:
        return {
            "source": data.source,
            "train_rows": len(data.y_train),
            "test_rows": len(data.y_test),
            "features": int(data.x_train.shape[1]),
            "classes": len(self.options.classes),
        }
