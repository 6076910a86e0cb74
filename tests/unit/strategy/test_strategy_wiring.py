"""The aggregator runs the plan's strategy (`teefl.strategy`): picked from the plan, begun and
configured per round, its state saved with each checkpoint and restored on restart; the round
config reaches the collaborator's training call. No processes: an `Aggregator` built in-process
(as in test_resume.py), a restart being a second one on the same run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedutil import SYNTHETIC, FakeContext, join_request, session_metadata
from teefl.errors import TeeflError
from teefl.measure.events import EventRecorder
from teefl.plan import TrainingSpec, plan_from_dict
from teefl.server.aggregator import Aggregator
from teefl.strategy import FedAdam, FedAvg, Median, TrimmedMean, decode_state
from teefl.strategy.registry import check_plan_strategy
from teefl.wire import codec, roundconfig, teefl_pb2
from teefl.workload.models import build_model
from teefl.workload.train import train_local

NAMES = ["col1", "col2", "col3"]
FEDADAM = {"name": "fedadam", "options": {"eta": 0.05, "eta_l": 0.02}}


def _plan(**fed):
    return plan_from_dict({**SYNTHETIC, "collaborators": NAMES, "federation": {"rounds": 3, **fed}})


def _agg(tmp_path: Path, **fed) -> Aggregator:
    run = tmp_path / "run"
    rec = EventRecorder(run, "rid", "aggregator", "aggregator")
    return Aggregator(_plan(update_staging="disk", **fed), run, "rid", rec)


def _stop(agg: Aggregator) -> None:
    agg.checkpointer.join()
    agg.rec.close()


def _updates(agg: Aggregator, rnd: int) -> dict[str, dict[str, torch.Tensor]]:
    """Three different updates of the open round's global model (deterministic)."""
    out = {}
    for i, name in enumerate(NAMES):
        g = torch.Generator().manual_seed(100 * rnd + i)
        out[name] = {
            k: (v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype))
            if v.is_floating_point()
            else v.clone()
            for k, v in agg.global_state.items()
        }
    return out


def _round(agg: Aggregator, flat: bool = True) -> None:
    """Count every collaborator's update of the open round (flat, as the data plane hands
    them over, or as decoded state dicts), then close it as the last ack does."""
    rnd = agg.round
    for i, (name, state) in enumerate(_updates(agg, rnd).items()):
        payload = codec.encode_state(state)
        update = agg.model.decode_update(payload)[1] if flat else state
        agg.model.fedavg.add(update, 10 + i, checked=True)
        agg.rounds.received[name] = {"samples": 10 + i}
    with agg.rounds.cond:
        agg.rounds.close_round()


# -- picking the strategy ----------------------------------------------------------------------
def test_the_plan_picks_the_strategy_and_old_plans_still_work(tmp_path: Path) -> None:
    assert isinstance(_agg(tmp_path / "a").strategy, FedAvg)
    agg = _agg(tmp_path / "b", strategy=FEDADAM)
    assert isinstance(agg.strategy, FedAdam) and agg.strategy.options.eta == 0.05
    assert agg.model.fedavg.layout is not None  # the flat path, asked of the accumulator
    assert agg.model.round_config == {"lr": 0.02}
    old = _agg(tmp_path / "c", aggregation="median")
    assert isinstance(old.strategy, Median) and old.model.fedavg.layout is not None
    trim = _agg(tmp_path / "d", aggregation="trimmed_mean", trim_ratio=0.2)
    assert isinstance(trim.strategy, TrimmedMean) and trim.strategy.options.trim_ratio == 0.2
    for a in (agg, old, trim):
        _stop(a)


def test_unknown_strategies_and_options_stop_with_one_line() -> None:
    with pytest.raises(TeeflError, match=r"^federation\.strategy: unknown strategy 'fedadm'"):
        check_plan_strategy(_plan(strategy={"name": "fedadm"}).federation.strategy)
    with pytest.raises(TeeflError, match=r"federation\.strategy\.options\.beta_1"):
        check_plan_strategy(
            _plan(strategy={"name": "fedadam", "options": {"beta_1": 2}}).federation.strategy
        )
    with pytest.raises(TeeflError, match="both set"):
        _plan(aggregation="median", strategy={"name": "median"})
    # a module:attr reference resolves like a name
    check_plan_strategy(_plan(strategy={"name": "teefl.strategy.krum:Krum"}).federation.strategy)


def test_fedavg_reuses_the_finished_rounds_sums(tmp_path: Path) -> None:
    agg = _agg(tmp_path)
    sums = [t.data_ptr() for t in agg.model.fedavg.run_sums]
    _round(agg)
    assert [t.data_ptr() for t in agg.model.fedavg.run_sums] == sums  # no fresh float64 pages
    _stop(agg)


# -- the round config on the wire --------------------------------------------------------------
def test_wait_round_carries_the_round_config(tmp_path: Path) -> None:
    agg = _agg(tmp_path, strategy={"name": "fedprox", "options": {"mu": 0.25}})
    reply = agg.grpc.Join(join_request(agg.plan, "col1"), FakeContext())
    w = agg.grpc.WaitRound(
        teefl_pb2.WaitRequest(collaborator="col1", after_round=0),
        FakeContext(md=session_metadata(reply)),
    )
    wire = teefl_pb2.WaitReply.FromString(w.SerializeToString())
    assert wire.round == 1
    assert roundconfig.from_proto(wire.round_config) == {"proximal_mu": 0.25}
    _stop(agg)


def test_round_config_values_keep_their_type() -> None:
    config = {"lr": 0.01, "steps": 3, "tag": "x", "on": True}
    reply = teefl_pb2.WaitReply(round=1, round_config=roundconfig.to_proto(config))
    back = roundconfig.from_proto(
        teefl_pb2.WaitReply.FromString(reply.SerializeToString()).round_config
    )
    assert back == config and [type(back[k]) for k in config] == [float, int, str, bool]
    assert roundconfig.from_proto(teefl_pb2.WaitReply(round=1).round_config) == {}  # old server
    with pytest.raises(TeeflError, match="lr"):
        roundconfig.training_overrides({"lr": float("nan")})
    with pytest.raises(TeeflError, match="proximal_mu"):
        roundconfig.training_overrides({"proximal_mu": -1.0})


def test_the_config_reaches_the_training_call(monkeypatch, tmp_path: Path) -> None:
    from teefl.client import trainer as mod
    from teefl.workload import vision

    calls: list[dict] = []

    def fake_train(*args, **kw):
        calls.append(kw)
        return {"loss": 1.0, "samples": 4}

    monkeypatch.setattr(vision, "train_local", fake_train)
    monkeypatch.setattr(vision, "evaluate", lambda *a: {"accuracy": 0.5, "samples": 4})
    me = mod.LocalTrainer(_plan(), 0)
    me.data = vision.VisionData(None, None, None, None, None, torch.device("cpu"))
    rec = EventRecorder(tmp_path, "rid", "collaborator-col1", "collaborator")
    model = torch.nn.Linear(1, 1)
    me.train_round(model, 1, {"lr": 0.5, "proximal_mu": 0.1}, rec.span)
    me.train_round(model, 2, {}, rec.span)  # an old aggregator: nothing sent
    assert calls == [{"lr": 0.5, "proximal_mu": 0.1}, {"lr": None, "proximal_mu": 0.0}]


# -- the training loop applies it --------------------------------------------------------------
def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    return x, y


def _trained(lr: float | None = None, mu: float = 0.0, spec_lr: float = 0.003):
    model = build_model("small_cnn", 1, 4, seed=0)
    x, y = _data()
    spec = TrainingSpec(batch_size=16, lr=spec_lr, threads=1)
    train_local(model, x, y, spec, torch.device("cpu"), 7, lr=lr, proximal_mu=mu)
    return model.state_dict()


def test_lr_from_the_config_replaces_the_plans() -> None:
    a, b = _trained(lr=0.01), _trained(spec_lr=0.01)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _trained()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_proximal_mu_pulls_training_towards_the_global_model() -> None:
    start = build_model("small_cnn", 1, 4, seed=0).state_dict()
    plain, prox = _trained(spec_lr=0.02), _trained(mu=50.0, spec_lr=0.02)
    assert all(torch.equal(plain[k], v) for k, v in _trained(mu=0.0, spec_lr=0.02).items())

    def drift(s):
        return sum(
            float((s[k] - start[k]).double().square().sum())
            for k in start
            if start[k].is_floating_point()
        )

    assert drift(prox) < drift(plain)


# -- state saved with each checkpoint, restored on restart -------------------------------------
def test_fedadam_state_is_saved_with_the_checkpoint_and_restored(tmp_path: Path) -> None:
    agg = _agg(tmp_path, strategy=FEDADAM)
    _round(agg)
    _round(agg, flat=False)  # the per-tensor path too
    _stop(agg)
    state = json.loads((tmp_path / "run/state.json").read_text())
    assert state["completed_round"] == 2 and state["strategy"] == "fedadam"
    assert state["strategy_state"] == "model/strategy-round-0002.safetensors"
    saved = decode_state((tmp_path / "run" / state["strategy_state"]).read_bytes())
    assert saved.meta == {"t": 2} and saved.tensors
    again = _agg(tmp_path, strategy=FEDADAM)  # the restart
    assert again.round == 3 and again.strategy.t == 2
    theirs, ours = agg.strategy.state(), again.strategy.state()
    assert theirs.tensors.keys() == ours.tensors.keys()
    assert all(torch.equal(theirs.tensors[k], ours.tensors[k]) for k in theirs.tensors)
    # the next round closes as it would have without the restart
    _round(agg)
    _round(again)
    assert all(torch.equal(agg.global_state[k], again.global_state[k]) for k in agg.global_state)
    _stop(again)


def test_a_stateless_strategy_writes_no_state_file_and_a_changed_one_is_refused(
    tmp_path: Path,
) -> None:
    agg = _agg(tmp_path)
    _round(agg)
    _stop(agg)
    state = json.loads((tmp_path / "run/state.json").read_text())
    assert state["strategy"] == "fedavg" and "strategy_state" not in state
    assert sorted(p.name for p in (tmp_path / "run/model").iterdir()) == ["round-0001.safetensors"]
    with pytest.raises(TeeflError, match="belongs to 'fedavg', not 'fedadam'"):
        _agg(tmp_path, strategy=FEDADAM)
