"""``vision`` on the Workload API does exactly what the collaborator's own code does today:
same initial model, same shards, same training, same metrics -- compared bit for bit against
calling the functions directly, as collaborator.py and aggregator.py call them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from teefl.errors import TeeflError
from teefl.plan import default_plan, plan_from_dict
from teefl.workload import datasets as ds
from teefl.workload.api import Party, RoundInfo, round_seed
from teefl.workload.datasets import dataset_shape, load_dataset
from teefl.workload.models import build_model
from teefl.workload.partition import collaborator_data
from teefl.workload.resolve import resolve_workload
from teefl.workload.train import evaluate, train_local
from teefl.workload.vision import Vision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("TEEFL_DATA", raising=False)
    monkeypatch.setattr(ds, "SYSTEM_DATA_DIR", tmp_path / "system")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_plan(**over):
    data = {
        "seed": 7,
        "collaborators": 3,
        "model": {"name": "small_cnn"},
        "dataset": {
            "name": "synthetic",
            "synthetic": {"shape": [1, 12, 12], "classes": 4, "train_size": 300, "test_size": 90},
            "max_samples_per_collaborator": 80,
            "max_test_samples": 20,
        },
        "partition": {"kind": "dirichlet", "alpha": 0.7},
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.003, "optimizer": "adam"},
    }
    data.update(over)
    return plan_from_dict(data)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_options_are_the_plans_sections():
    plan = default_plan()
    w = resolve_workload("vision", Vision.options_from_plan(plan))
    o = w.options
    assert (o.model, o.dataset, o.partition, o.training) == (
        plan.model,
        plan.dataset,
        plan.partition,
        plan.training,
    )


def test_same_initial_model_as_the_aggregator_builds():
    plan = small_plan()
    w = resolve_workload("vision", Vision.options_from_plan(plan))
    channels, _, _, classes = dataset_shape(plan.dataset)  # aggregator.py, as it is today
    today = build_model(plan.model.name, channels, classes, seed=plan.seed)
    assert states_equal(w.build_model(plan.seed), today)
    assert not states_equal(w.build_model(plan.seed + 1), today)


def test_same_shards_training_and_metrics_as_the_collaborator():
    plan = small_plan()
    w = resolve_workload("vision", Vision.options_from_plan(plan))
    n = len(plan.collaborators)
    # today's collaborator: load, shard (collaborator._prepare)
    data = load_dataset(plan.dataset, None, seed=plan.seed)
    for index, name in enumerate(plan.collaborators):
        x_tr, y_tr, x_te, y_te = collaborator_data(
            data, index, n, plan.partition, plan.dataset, plan.seed
        )
        mine = w.load(Party(name, index, n, plan.seed, None, "cpu"))
        for got, want in zip(
            (mine.x_train, mine.y_train, mine.x_test, mine.y_test),
            (x_tr, y_tr, x_te, y_te),
            strict=True,
        ):
            assert torch.equal(got, want)
        # two rounds of collaborator._round: validate global, train, validate local
        ref_model = build_model(plan.model.name, data.channels, data.classes, seed=plan.seed)
        api_model = w.build_model(plan.seed)
        bs = plan.training.batch_size
        for r in (1, 2):
            seed = plan.seed * 1_000_003 + index * 1009 + r  # collaborator.py's formula
            assert round_seed(plan.seed, index, r) == seed
            want_vg = evaluate(ref_model, x_te, y_te, bs, CPU)
            want_tr = train_local(ref_model, x_tr, y_tr, plan.training, CPU, seed)
            want_vl = evaluate(ref_model, x_te, y_te, bs, CPU)
            got_vg = w.evaluate(api_model, mine)
            got_tr = w.train(api_model, mine, RoundInfo(r, seed))
            got_vl = w.evaluate(api_model, mine)
            assert (got_vg, got_tr, got_vl) == (want_vg, want_tr, want_vl)
            assert states_equal(api_model, ref_model)
        assert got_tr["samples"] == len(y_tr) and "accuracy" in got_vl


def test_describe_is_todays_env_record():
    plan = small_plan()
    w = resolve_workload("vision", Vision.options_from_plan(plan))
    mine = w.load(Party("col2", 1, 3, plan.seed))
    d = mine.dataset
    assert w.describe(mine) == {
        "name": d.name,
        "source": d.source,
        "train_samples": len(d.y_train),
        "test_samples": len(d.y_test),
        "shape": list(d.x_train.shape[1:]),
        "classes": d.classes,
        "size_bytes": int(d.x_train.numel() + d.x_test.numel()),
        "shard_train": len(mine.y_train),
        "shard_test": len(mine.y_test),
    }


def test_shard_mode_with_a_data_dir_searches_it_like_today(tmp_path):
    """``teefl run --data-dir D``: D is where the SHARED dataset is; every party takes a shard."""
    from test_workload_datasets import write_mnist

    write_mnist(tmp_path / "shared", n_train=30, n_test=12)
    plan = small_plan(dataset={"name": "mnist"}, partition={"kind": "iid"})
    w = resolve_workload("vision", Vision.options_from_plan(plan))
    data = load_dataset(plan.dataset, tmp_path / "shared", seed=plan.seed)
    want = collaborator_data(data, 1, 3, plan.partition, plan.dataset, plan.seed)
    mine = w.load(Party("col2", 1, 3, plan.seed, tmp_path / "shared", data_mode="shard"))
    assert torch.equal(mine.x_train, want[0]) and torch.equal(mine.y_test, want[3])


def test_local_mode_uses_the_partys_own_files_only(tmp_path, monkeypatch):
    from test_workload_datasets import write_mnist

    own = write_mnist(tmp_path / "mine" / "mnist", n_train=25, n_test=9)
    write_mnist(tmp_path / "elsewhere", n_train=40, n_test=40)
    monkeypatch.setenv("TEEFL_DATA", str(tmp_path / "elsewhere"))
    plan = small_plan(dataset={"name": "mnist"})
    w = resolve_workload("vision", Vision.options_from_plan(plan))
    mine = w.load(Party("col1", 0, 3, plan.seed, tmp_path / "mine"))
    assert len(mine.y_train) == 25 and len(mine.y_test) == 9  # all of it, no shard
    assert sorted(mine.y_train.tolist()) == sorted(own["train"][1].tolist())
    # an empty data dir is an error -- never the shared copy in $TEEFL_DATA
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeeflError, match="not found") as exc:
        w.load(Party("col1", 0, 3, plan.seed, tmp_path / "empty"))
    assert "elsewhere" not in str(exc.value)


def test_synthetic_is_always_a_shard():
    plan = small_plan()
    w = resolve_workload("vision", Vision.options_from_plan(plan))
    a = w.load(Party("col1", 0, 3, plan.seed))
    b = w.load(Party("col1", 0, 3, plan.seed, data_dir=Path("/nonexistent")))
    assert torch.equal(a.x_train, b.x_train)
