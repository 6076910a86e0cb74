"""``tabular``: an MLP on a party's CSV/Parquet file, with the schema in the options and the
scaling fitted on the party's own training rows only."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from paths import REPO

from teefl.errors import TeeflError
from teefl.workload import tabular as tab
from teefl.workload.api import Party, RoundInfo
from teefl.workload.resolve import resolve_workload

EXAMPLE = REPO / "examples" / "tabular"
_spec = importlib.util.spec_from_file_location("examples_tabular_generate", EXAMPLE / "generate.py")
assert _spec is not None and _spec.loader is not None
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)  # by path: both examples have a generate.py
generate = _gen.generate
make_rows = _gen.make_rows

OPTIONS = {
    "label": "churn",
    "classes": ["no", "yes"],
    "numeric": ["age", "income", "score"],
    "categorical": {"region": ["north", "south", "east", "west"], "plan": ["basic", "plus", "pro"]},
    "hidden": [32],
    "epochs": 2,
    "lr": 0.01,
    "batch_size": 32,
}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir(tmp_path):
    generate(tmp_path, ["col1", "col2"], 300, seed=0)
    return tmp_path


def workload(**over):
    return resolve_workload("tabular", {**OPTIONS, **over})


def test_trains_and_evaluates_above_chance(data_dir):
    w = workload()
    party = Party("col1", 0, 2, 0, data_dir / "col1")
    data = w.load(party)
    assert len(data.y_train) == 240 and len(data.y_test) == 60  # test_fraction 0.2
    assert data.x_train.shape[1] == 3 + 4 + 3  # one-hot
    model = w.build_model(0)
    before = w.evaluate(model, data)
    losses = [w.train(model, data, RoundInfo(r, r))["loss"] for r in (1, 2, 3)]
    after = w.evaluate(model, data)
    assert losses[-1] < losses[0]
    assert after["accuracy"] >= 0.8 > before["accuracy"]
    assert after["samples"] == 60


def test_scaling_is_fitted_on_the_training_rows_only(data_dir):
    w = workload()
    data = w.load(Party("col1", 0, 2, 0, data_dir / "col1"))
    df = pd.read_csv(data_dir / "col1" / "data.csv")
    order = np.random.default_rng(0).permutation(len(df))
    train_rows = df.iloc[order[60:]]
    np.testing.assert_allclose(data.mean, train_rows[["age", "income", "score"]].mean())
    np.testing.assert_allclose(data.std, train_rows[["age", "income", "score"]].std(ddof=0))
    # scaled training features are centred; the held-out rows use the same statistics
    np.testing.assert_allclose(data.x_train[:, :3].mean(0), 0, atol=1e-5)
    test_rows = df.iloc[order[:60]]
    want = (test_rows[["age", "income", "score"]].to_numpy() - data.mean) / data.std
    np.testing.assert_allclose(data.x_test[:, :3], want, rtol=1e-5, atol=1e-5)


def test_ordinal_encoding_and_no_scaling(data_dir):
    w = workload(encoding="ordinal", scaling="none")
    data = w.load(Party("col1", 0, 2, 0, data_dir / "col1"))
    assert data.x_train.shape[1] == 3 + 2
    assert w.build_model(0)[0].in_features == 5
    df = pd.read_csv(data_dir / "col1" / "data.csv")
    regions = set(data.x_train[:, 3].tolist()) | set(data.x_test[:, 3].tolist())
    assert regions <= {0.0, 1.0, 2.0, 3.0}
    assert data.x_train[:, 0].max().item() == pytest.approx(df["age"].max(), abs=1)


def test_model_is_built_from_options_alone_and_seeded():
    w = workload(hidden=[16, 8])
    a, b = w.build_model(3), w.build_model(3)
    assert [m.out_features for m in a if isinstance(m, torch.nn.Linear)] == [16, 8, 2]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shard_mode_splits_the_rows_disjointly(data_dir):
    w = workload()
    shared = data_dir / "col1"
    parts = [w.load(Party(f"c{i}", i, 3, 5, shared, data_mode="shard")) for i in range(3)]
    sizes = [len(p.y_train) + len(p.y_test) for p in parts]
    assert sum(sizes) == 300 and max(sizes) - min(sizes) <= 1
    from teefl.workload.partition import partition_indices

    labels = pd.read_csv(shared / "data.csv")["churn"].map({"no": 0, "yes": 1}).to_numpy()
    split = partition_indices(labels, 3, "iid", seed=5)
    assert [len(s) for s in split] == sizes


def test_test_file(data_dir):
    make_rows(50, 7, 1).to_csv(data_dir / "col1" / "holdout.csv", index=False)
    w = workload(test_file="holdout.csv")
    data = w.load(Party("col1", 0, 2, 0, data_dir / "col1"))
    assert len(data.y_train) == 300 and len(data.y_test) == 50


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda df: df.drop(columns=["score"]), "lacks column(s) score"),
        (lambda df: df.assign(region=df["region"].replace("west", "mars")), "'mars'"),
        (lambda df: df.assign(churn=df["churn"].replace("yes", "maybe")), "label column"),
        (lambda df: df.assign(age=df["age"].astype(object).where(df.index != 3, "old")), "'old'"),
        (lambda df: df.assign(age=df["age"].where(df.index != 3)), "missing value"),
        (lambda df: df.assign(plan=df["plan"].where(df.index != 5)), "missing value"),
    ],
)
def test_bad_rows_are_one_line_naming_file_and_column(data_dir, edit, needle):
    path = data_dir / "col1" / "data.csv"
    edit(pd.read_csv(path)).to_csv(path, index=False)
    with pytest.raises(TeeflError) as exc:
        workload().instance.load(Party("col1", 0, 2, 0, data_dir / "col1"))
    text = str(exc.value)
    assert "\n" not in text and str(path) in text and needle in text


def test_no_data_dir_and_missing_file(tmp_path):
    with pytest.raises(TeeflError, match="pass --data-dir"):
        workload().instance.load(Party("col1", 0, 1))
    with pytest.raises(TeeflError, match="table not found"):
        workload().instance.load(Party("col1", 0, 1, 0, tmp_path))


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"classes": ["yes"]}, "workload.options.classes: List should have at least 2 items"),
        ({"numeric": [], "categorical": {}}, "workload.options: name at least one feature"),
        ({"numeric": ["age", "churn"]}, "churn named in more than one role"),
        ({"categorical": {"region": []}}, "categorical.region: list each category once"),
        ({"hidden": [0]}, "workload.options.hidden: hidden layer widths must be >= 1"),
        ({"encoding": "hash"}, "workload.options.encoding: Input should be 'onehot' or 'ordinal'"),
        ({"labels": "churn"}, "workload.options.labels: unknown key"),
    ],
)
def test_option_errors_name_the_key(over, needle):
    with pytest.raises(TeeflError) as exc:
        resolve_workload("tabular", {**OPTIONS, **over}, source="p.yaml")
    text = str(exc.value)
    assert text.startswith("invalid plan p.yaml: ") and needle in text


def test_numeric_class_labels_are_compared_as_text(tmp_path):
    df = make_rows(200, 0, 0)
    df["churn"] = (df["churn"] == "yes").astype(int)
    (tmp_path / "p").mkdir()
    df.to_csv(tmp_path / "p" / "data.csv", index=False)
    w = workload(classes=[0, 1])
    data = w.load(Party("p", 0, 1, 0, tmp_path / "p"))
    assert set(data.y_train.tolist()) == {0, 1}


def test_parquet_without_pyarrow_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        tab.importlib.util, "find_spec", lambda n, *a: None if n == "pyarrow" else real(n, *a)
    )
    with pytest.raises(TeeflError) as exc:
        workload(file="data.parquet").instance.load(Party("p", 0, 1, 0, tmp_path))
    assert "needs pyarrow, which is not installed: pip install 'teefl[parquet]'" in str(exc.value)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_gives_the_same_data_as_csv(data_dir):
    df = pd.read_csv(data_dir / "col1" / "data.csv")
    df.to_parquet(data_dir / "col1" / "data.parquet")
    party = Party("col1", 0, 2, 0, data_dir / "col1")
    a = workload().load(party)
    b = workload(file="data.parquet").load(party)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
