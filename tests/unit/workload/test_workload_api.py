"""The Workload API's pieces: parties and their data modes, metrics, which tensors travel, and
user failures turned into one line plus a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from teefl.errors import TeeflError
from teefl.workload.api import (
    Party,
    RoundInfo,
    Workload,
    check_layout,
    check_metrics,
    layout_of,
    load_travelling,
    round_seed,
    select_state,
    travelling_names,
    workload_problem,
)
from teefl.workload.failure import WorkloadFailure, run_metrics, run_user


# -- parties -----------------------------------------------------------------------------------
def test_party_data_mode_follows_data_dir_unless_stated(tmp_path):
    assert not Party("a", 0, 3).local  # no data_dir: a shard of the shared (simulated) set
    assert Party("a", 0, 3, data_dir=tmp_path).local  # its own files
    assert not Party("a", 0, 3, data_dir=tmp_path, data_mode="shard").local  # shared set in it
    p = Party("a", 1, 3, data_dir=str(tmp_path))  # type: ignore[arg-type]
    assert isinstance(p.data_dir, Path)


@pytest.mark.parametrize(
    "kw",
    [
        {"index": 3, "count": 3},
        {"index": -1, "count": 3},
        {"index": 0, "count": 0},
        {"index": 0, "count": 1, "data_mode": "local"},  # local without a data_dir
        {"index": 0, "count": 1, "data_mode": "everything"},
    ],
)
def test_party_refuses_impossible_values(kw):
    with pytest.raises(ValueError):
        Party("a", **kw)


def test_party_is_frozen():
    p = Party("a", 0, 1)
    with pytest.raises(AttributeError):
        p.index = 2  # type: ignore[misc]


def test_round_seed_is_the_collaborators_formula():
    # the formula the collaborator has always used: the vision figures depend on it
    assert round_seed(2, 1, 3) == 2 * 1_000_003 + 1 * 1009 + 3
    seeds = {round_seed(0, i, r) for i in range(50) for r in range(1, 100)}
    assert len(seeds) == 50 * 99  # distinct per party and round


def test_round_info_config_is_read_only():
    cfg = {"mu": 0.1}
    info = RoundInfo(1, 7, cfg)
    cfg["mu"] = 5.0  # the caller's dict is copied
    assert info.config["mu"] == 0.1
    with pytest.raises(TypeError):
        info.config["mu"] = 1.0  # type: ignore[index]


# -- the protocol ------------------------------------------------------------------------------
class Good:
    def build_model(self, seed):
        return nn.Linear(2, 2)

    def load(self, party):
        return None

    def train(self, model, data, round_info):
        return {"samples": 1}

    def evaluate(self, model, data):
        return {"samples": 1}


def test_protocol_is_structural():
    assert workload_problem(Good) is None
    assert isinstance(Good(), Workload)  # no base class needed


def test_workload_problem_says_what_is_missing():
    class Half:
        def build_model(self, seed): ...

        def load(self, party): ...

    assert workload_problem(Half) == "it lacks train, evaluate"
    assert workload_problem(Good()) == "it is an instance; reference its class"
    assert workload_problem(len) == "it is no class"

    class BadOptions(Good):
        Options = dict

    assert "not a pydantic model" in workload_problem(BadOptions)


# -- metrics -----------------------------------------------------------------------------------
def test_metrics_are_checked_and_converted():
    out = check_metrics({"loss": torch.tensor(0.5), "samples": torch.tensor(3)}, "train")
    assert out == {"loss": 0.5, "samples": 3}
    assert type(out["samples"]) is int and type(out["loss"]) is float


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ({"loss": 1.0}, "without 'samples'"),
        ([("samples", 1)], "not a mapping"),
        ({"samples": True}, "int >= 0"),
        ({"samples": -1}, "int >= 0"),
        ({"samples": 2.5}, "int >= 0"),
        ({"samples": 1, "acc": "high"}, "must be numbers"),
        ({"samples": 1, "v": torch.zeros(3)}, "not a scalar"),
        ({"samples": 1, 3: 1.0}, "names are strings"),
    ],
)
def test_bad_metrics_are_one_line(metrics, needle):
    with pytest.raises(TeeflError, match=needle) as exc:
        check_metrics(metrics, "train")
    assert "\n" not in str(exc.value)


# -- which tensors travel ----------------------------------------------------------------------
class Adapted(nn.Module):
    """A frozen base with a small trainable adapter: the LoRA shape of things."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(8, 8)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.zeros(2, 8))
        self.lora_b = nn.Parameter(torch.zeros(8, 2))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


class AdaptersOnly(Good):
    def trainable_state(self, model):
        return [n for n, p in model.named_parameters() if p.requires_grad]


def test_default_is_the_whole_state_dict():
    model = Adapted()
    assert travelling_names(Good(), model) == list(model.state_dict())


def test_adapters_only_workload_sends_a_subset_in_state_order():
    model = Adapted()
    names = travelling_names(AdaptersOnly(), model)
    assert names == ["lora_a", "lora_b"]
    sent = select_state(model, names)
    assert set(sent) == {"lora_a", "lora_b"}
    assert sent["lora_a"].data_ptr() == model.lora_a.data_ptr()  # no copy


@pytest.mark.parametrize(
    ("names", "needle"),
    [([], "no names"), (["lora_a", "nope"], "lacks: 'nope'"), (["lora_a", "lora_a"], "than once")],
)
def test_trainable_state_is_checked(names, needle):
    class W(Good):
        def trainable_state(self, model):
            return names

    with pytest.raises(TeeflError, match=needle):
        travelling_names(W(), Adapted())


def test_check_layout_accepts_exactly_the_global_layout():
    model = Adapted()
    glob = select_state(model, ["lora_a", "lora_b"])
    update = {k: v.clone() + 1 for k, v in glob.items()}
    check_layout(update, glob)
    check_layout(layout_of(update), layout_of(glob))  # (dtype, shape) form works too


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda u: u.pop("lora_b"), "lacks lora_b"),
        (lambda u: u.update({"base.weight": torch.zeros(8, 8)}), "unexpected base.weight"),
        (lambda u: u.update({"lora_a": torch.zeros(2, 8, dtype=torch.float64)}), "float64"),
        (lambda u: u.update({"lora_a": torch.zeros(8, 2)}), "shape [8, 2], not [2, 8]"),
    ],
)
def test_check_layout_names_the_difference(change, needle):
    glob = select_state(Adapted(), ["lora_a", "lora_b"])
    update = {k: v.clone() for k, v in glob.items()}
    change(update)
    with pytest.raises(TeeflError, match="col2's update does not match") as exc:
        check_layout(update, glob, "col2's update")
    assert needle in str(exc.value)


def test_load_travelling_keeps_the_frozen_base():
    model = Adapted()
    base = model.base.weight.detach().clone()
    load_travelling(model, {"lora_a": torch.ones(2, 8), "lora_b": torch.full((8, 2), 2.0)})
    assert torch.equal(model.lora_a, torch.ones(2, 8))
    assert torch.equal(model.lora_b, torch.full((8, 2), 2.0))
    assert torch.equal(model.base.weight, base)
    with pytest.raises(TeeflError, match="lacks: ghost"):
        load_travelling(model, {"ghost": torch.zeros(1)})
    with pytest.raises(TeeflError, match="shape"):
        load_travelling(model, {"lora_a": torch.zeros(3)})


# -- failures ----------------------------------------------------------------------------------
def _explode(x):
    return {"samples": 1} if x else [][1]


def test_run_user_turns_an_exception_into_summary_and_traceback():
    with pytest.raises(WorkloadFailure) as exc:
        run_user(_explode, 0, ref="./task.py:Task", phase="train", party="col2", round=4)
    f = exc.value
    assert f.summary == (
        "col2: workload ./task.py:Task failed in train (round 4): IndexError: "
        "list index out of range"
    )
    assert str(f) == f.summary and isinstance(f, TeeflError)
    assert "Traceback" in f.traceback and "_explode" in f.traceback
    assert (f.phase, f.party, f.round) == ("train", "col2", 4)
    assert run_user(_explode, 1, ref="r", phase="train") == {"samples": 1}


def test_summary_is_one_bounded_line():
    def long():
        raise ValueError("a\nmultiline\n" + "x" * 2000)

    with pytest.raises(WorkloadFailure) as exc:
        run_user(long, ref="r", phase="evaluate")
    assert "\n" not in exc.value.summary and len(exc.value.summary) <= 400
    assert "ValueError: a multiline" in exc.value.summary


def test_run_metrics_makes_bad_metrics_a_failure_too():
    with pytest.raises(WorkloadFailure) as exc:
        run_metrics(lambda: {"loss": 1.0}, ref="r", phase="train", party="col1", round=1)
    assert "col1: workload r failed in train (round 1): train returned metrics without" in str(
        exc.value
    )
    assert exc.value.traceback == ""


def test_interrupts_are_not_round_failures():
    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_user(stop, ref="r", phase="train")
