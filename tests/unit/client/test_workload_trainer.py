"""WorkloadTrainer: any Workload behind the collaborator's Trainer seam; `vision` through it
gives exactly what LocalTrainer (the collaborator's own code before workloads) gave."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from teefl.client.trainer import WorkloadTrainer, flat
from teefl.faults import fault
from teefl.plan import Plan, plan_from_dict
from teefl.wire import roundconfig
from teefl.workload.datasets import load_dataset
from teefl.workload.failure import WorkloadFailure
from teefl.workload.models import build_model
from teefl.workload.partition import collaborator_data
from teefl.workload.resolve import plan_workload
from teefl.workload.train import configure_threads, evaluate, resolve_device, train_local

TINY = {
    "seed": 3,
    "collaborators": 2,
    "dataset": {
        "name": "synthetic",
        "synthetic": {"shape": [1, 12, 12], "classes": 4, "train_size": 96, "test_size": 40},
    },
    "training": {"batch_size": 16, "threads": 1, "device": "cpu"},
}


class ReferenceTrainer:
    """LocalTrainer as it was before workloads (commit e1cde3c), kept verbatim as the
    reference vision must reproduce: the plan's dataset and model, this party's shard of the
    data, `teefl.workload.train`'s loops, validated before and after training."""

    def __init__(self, plan: Plan, index: int, data_dir: Path | None = None) -> None:
        self.plan, self.index, self.data_dir = plan, index, data_dir
        self.samples = 0

    def setup(self) -> torch.nn.Module:
        plan = self.plan
        self.threads = configure_threads(plan.training.threads)
        self.device = resolve_device(plan.training.device)
        data = load_dataset(plan.dataset, self.data_dir, seed=plan.seed)
        self.dataset = data
        self.x_train, self.y_train, self.x_test, self.y_test = collaborator_data(
            data, self.index, len(plan.collaborators), plan.partition, plan.dataset, plan.seed
        )
        self.samples = len(self.y_train)
        return build_model(plan.model.name, data.channels, data.classes).to(self.device)

    def train_round(
        self, model: torch.nn.Module, r: int, config: dict[str, Any], span: Any
    ) -> dict[str, float]:
        """Validate the global model, train (with the round config's learning rate and FedProx
        mu, checked: the aggregator is a remote party), validate the local model."""
        plan = self.plan
        lr, mu = roundconfig.training_overrides(config)
        with span("validate_global", round=r) as s:
            vg = self.evaluate(model)
            s["metrics"], s["samples"] = vg, vg["samples"]
        fault("train", r)
        with span("train", round=r) as s:
            seed = plan.seed * 1_000_003 + self.index * 1009 + r
            tr = train_local(
                model,
                self.x_train,
                self.y_train,
                plan.training,
                self.device,
                seed,
                lr=lr,
                proximal_mu=mu,
            )
            s["metrics"], s["samples"] = tr, tr["samples"]
        with span("validate_local", round=r) as s:
            vl = self.evaluate(model)
            s["metrics"], s["samples"] = vl, vl["samples"]
        print(
            "%s: round %d global acc %.4f -> local acc %.4f",
            plan.collaborators[self.index],
            r,
            vg["accuracy"],
            vl["accuracy"],
        )
        return {**flat("validate_global", vg), **flat("train", tr), **flat("validate_local", vl)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        bs = self.plan.training.batch_size
        return evaluate(model, self.x_test, self.y_test, bs, self.device)

    def describe(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "device": str(self.device),
            "threads": self.threads,
            "dataset": {
                "name": d.name,
                "source": d.source,
                "train_samples": len(d.y_train),
                "test_samples": len(d.y_test),
                "shape": list(d.x_train.shape[1:]),
                "classes": d.classes,
                "size_bytes": int(d.x_train.numel() + d.x_test.numel()),
                "shard_train": len(self.y_train),
                "shard_test": len(self.y_test),
            },
        }


@contextmanager
def _span(phase: str, **fields: Any):
    yield {}


def _pair(plan_data: dict, index: int = 1) -> tuple[Any, Any, Any, Any]:
    plan = plan_from_dict(plan_data)
    old, new = ReferenceTrainer(plan, index), WorkloadTrainer(plan, index, plan_workload(plan))
    m_old, m_new = old.setup(), new.setup()
    m_new.load_state_dict(m_old.state_dict())  # both start from the same global model
    return old, new, m_old, m_new


@pytest.mark.parametrize("config", [{}, {"lr": 0.01}, {"proximal_mu": 0.1}])
def test_vision_through_the_workload_api_is_bit_identical_to_local_trainer(config) -> None:
    old, new, m_old, m_new = _pair(TINY)
    assert new.samples == old.samples > 0
    for r in (1, 2):
        a = old.train_round(m_old, r, config, _span)
        b = new.train_round(m_new, r, config, _span)
        assert a == b
    s_old, s_new = m_old.state_dict(), m_new.state_dict()
    assert list(s_old) == list(s_new)
    for k in s_old:
        assert torch.equal(s_old[k], s_new[k]), k
    assert old.evaluate(m_old) == new.evaluate(m_new)
    assert new.describe()["dataset"] == old.describe()["dataset"]


def test_the_aggregator_starts_from_the_workloads_build_model() -> None:
    """The aggregator's initial model was models.build_model(plan.model..., seed=plan.seed):
    vision's build_model(seed) is that model, tensor for tensor."""
    from teefl.workload.datasets import dataset_shape
    from teefl.workload.models import build_model

    plan = plan_from_dict(TINY)
    c, _, _, k = dataset_shape(plan.dataset)
    want = build_model(plan.model.name, c, k, seed=plan.seed).state_dict()
    got = plan_workload(plan).build_model(plan.seed).state_dict()
    assert all(torch.equal(want[n], got[n]) for n in want) and list(want) == list(got)


TASK = """
import torch
from torch import nn

class Task:
    def build_model(self, seed):
        torch.manual_seed(seed)
        return nn.Linear(3, 2)
    def load(self, party):
        self.party = party
        g = torch.Generator().manual_seed(party.index)
        return torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    def train(self, model, data, info):
        self.info = info
        if info.round == RAISE_IN:
            raise ValueError("boom in user code")
        with torch.no_grad():
            model.weight.add_(1.0)
        return {"loss": 0.5, "samples": len(data[1])}
    def evaluate(self, model, data):
        return {"accuracy": 0.25, "samples": len(data[1])}
"""


def _user(tmp_path: Path, raise_in: int = 0, **workload: Any) -> tuple[WorkloadTrainer, Any]:
    (tmp_path / "task.py").write_text(TASK.replace("RAISE_IN", str(raise_in)))
    plan = plan_from_dict(
        {"collaborators": 3, "training": {"device": "cpu"},
         "workload": {"name": "./task.py:Task", **workload}},
        base=tmp_path,
    )  # fmt: skip
    wl = plan_workload(plan)
    return WorkloadTrainer(plan, 2, wl, **({} if workload else {"data_dir": tmp_path})), wl


def test_a_user_workload_trains_with_the_round_info_and_its_party(tmp_path) -> None:
    trainer, wl = _user(tmp_path)
    model = trainer.setup()
    party = wl.instance.party
    assert (party.name, party.index, party.count, party.local) == ("col3", 2, 3, True)
    assert party.data_dir == tmp_path
    before = model.weight.detach().clone()
    metrics = trainer.train_round(model, 4, {"proximal_mu": 0.5}, _span)
    assert torch.equal(model.weight, before + 1.0)
    info = wl.instance.info
    assert info.round == 4 and info.config["proximal_mu"] == 0.5
    assert torch.equal(info.global_state["weight"], before)  # the state BEFORE training
    assert metrics == {
        "validate_global.accuracy": 0.25, "train.loss": 0.5, "validate_local.accuracy": 0.25
    }  # fmt: skip
    assert trainer.samples == 8
    assert trainer.describe()["workload"]["digest"] == wl.digest


def test_the_plans_data_root_gives_each_party_its_own_folder(tmp_path) -> None:
    trainer, wl = _user(tmp_path, data_root=str(tmp_path / "parties"))
    trainer.setup()
    assert wl.instance.party.data_dir == tmp_path / "parties" / "col3"
    assert wl.instance.party.local


def test_an_exception_in_user_train_is_a_workload_failure_with_its_traceback(tmp_path) -> None:
    trainer, _ = _user(tmp_path, raise_in=2)
    model = trainer.setup()
    trainer.train_round(model, 1, {}, _span)
    with pytest.raises(WorkloadFailure) as err:
        trainer.train_round(model, 2, {}, _span)
    assert "col3: workload ./task.py:Task failed in train (round 2): ValueError: boom" in str(
        err.value
    )
    assert "Traceback" in err.value.traceback and "boom in user code" in err.value.traceback
