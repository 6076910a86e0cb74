"""A whole federation in one process: a real `Aggregator` and two real `Collaborator`s (the
plan's training) over `MemoryTransport` -- no sockets, no gRPC, no child processes.

Rounds close as the adapters close them (after the last acknowledgement, ``close_soon``); the
aggregator's serve loop (gRPC, the data plane, ``Rounds.supervise``'s timeouts) is not run.
What the test checks is computed by the test itself from the bytes each collaborator sent.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fedutil import SYNTHETIC
from teefl.client.collaborator import Collaborator
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.server.aggregator import Aggregator, final_state
from teefl.strategy import FedAdam, decode_state
from teefl.transport.client import PutUpdate, Request, Stale, WaitRound
from teefl.transport.memory import MemoryTransport
from teefl.wire import codec

NAMES = ["col1", "col2"]
ROUNDS = 2
FEDADAM = {"name": "fedadam", "options": {"eta": 0.05, "eta_l": 0.02}}
JOIN_S = 60.0  # bound on the whole federation (it takes a few seconds)


class Capturing(MemoryTransport):
    """Keeps a copy of every update sent (the payload is the model's own memory, which the
    next round's training overwrites)."""

    def __init__(self, service: Any, name: str) -> None:
        super().__init__(service, name)
        self.sent: dict[int, tuple[int, bytes]] = {}  # round -> (samples, payload)

    def handle(self, request: Request) -> Any:
        if isinstance(request, PutUpdate):
            self.sent[request.round] = (int(request.header.num_samples), bytes(request.payload))
        return super().handle(request)


@pytest.fixture(autouse=True)
def _threads():
    """The collaborators set torch's thread count (plan ``training.threads``): put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _federation(
    tmp_path: Path, sections: dict[str, Any] | None = None, **fed: Any
) -> tuple[Aggregator, dict[str, Capturing], dict]:
    """Run the whole federation (``sections``: more plan sections); returns the aggregator,
    the transports and the global model it started from."""
    data = {
        **SYNTHETIC,
        "collaborators": NAMES,
        "federation": {"rounds": ROUNDS, "update_staging": "disk", **fed},
        **(sections or {}),
    }
    if "workload" in data:  # the vision workload's own sections go
        for key in ("model", "dataset", "partition"):
            data.pop(key, None)
    plan = plan_from_dict(data, base=tmp_path)
    run = tmp_path / "run"
    rec = EventRecorder(run, "rid", "aggregator", "aggregator")
    agg = Aggregator(plan, run, "rid", rec)
    start = {k: v.clone() for k, v in agg.global_state.items()}
    transports = {n: Capturing(agg.service, n) for n in NAMES}
    errors: list[BaseException] = []

    def run_one(name: str) -> None:
        try:
            col = Collaborator(plan, name, "memory", run, transport=transports[name])
            assert col.run() == "rid"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_one, args=(n,), daemon=True) for n in NAMES]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_S)
        assert not any(t.is_alive() for t in threads), "the federation did not finish in time"
        assert not errors, errors
        assert agg.done and agg.rounds.failed is None
    finally:
        agg.checkpointer.join()
        agg.rec.close()
    return agg, transports, start


def _decoded(transports: dict[str, Capturing], rnd: int) -> list[tuple[dict, int]]:
    out = []
    for name in NAMES:
        samples, payload = transports[name].sent[rnd]
        out.append((codec.decode_state(payload), samples))
    return out


def _fedavg(updates: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean, by hand: float64 sums, rounded once; counters by maximum."""
    total = sum(n for _, n in updates)
    out = {}
    for k, ref in updates[0][0].items():
        if ref.is_floating_point():
            acc = sum(u[k].double() * n for u, n in updates)
            out[k] = (acc / total).to(ref.dtype)
        else:
            out[k] = torch.stack([u[k] for u, _ in updates]).amax(0)
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoint(agg: Aggregator, rnd: int) -> dict[str, torch.Tensor]:
    return codec.decode_state((agg.run_dir / f"model/round-{rnd:04d}.safetensors").read_bytes())


@pytest.mark.parametrize("memory", ["fast", "flat"])
def test_a_fedavg_federation_over_memory_ends_at_the_mean_of_what_was_sent(
    tmp_path: Path, memory: str, monkeypatch
):
    """``flat``: the updates are received into their mapped files and summed window by window
    at the close (store/paged.py, strategy/windowed.py): the same mean, bit for bit."""
    from teefl.server import receivers

    mapped: list[int] = []
    real = receivers.MappedReceiver.__init__

    def counted(self, target):
        mapped.append(target.size)
        real(self, target)

    monkeypatch.setattr(receivers.MappedReceiver, "__init__", counted)
    agg, transports, start = _federation(tmp_path, memory=memory)
    assert len(mapped) == (len(NAMES) * ROUNDS if memory == "flat" else 0)
    if memory == "flat":
        from teefl.strategy.windowed import WindowedFedAvg

        assert isinstance(agg.model.fedavg, WindowedFedAvg)
    for t in transports.values():
        assert sorted(t.sent) == [1, 2]  # one update per training round, none resent
        assert t.closed
        # the evaluation pass: its round came, and the run's end was heard
        waits = [r for r in t.requests if isinstance(r, WaitRound)]
        assert waits[-1].after_round == ROUNDS + 1
    one = _fedavg(_decoded(transports, 1))
    assert not _equal(one, start)  # training moved the model: the check below can fail
    assert _equal(_checkpoint(agg, 1), one)
    final = _fedavg(_decoded(transports, 2))
    assert _equal(agg.global_state, final)
    assert _equal(final_state(agg.run_dir), final)
    # every collaborator trained round 2 from round 1's mean: its update differs from both
    for state, _ in _decoded(transports, 2):
        assert not _equal(state, one)


def test_fedadam_over_memory_matches_fedadam_applied_to_the_sent_updates(tmp_path: Path):
    agg, transports, start = _federation(tmp_path, strategy=FEDADAM)
    mine = FedAdam(FEDADAM["options"])
    expected = start
    for rnd in (1, 2):
        acc = mine.begin(rnd, expected, codec.Layout.of_state(expected))
        for state, samples in _decoded(transports, rnd):
            acc.add(state, samples)
        expected = acc.result()
        assert _equal(_checkpoint(agg, rnd), expected), f"round {rnd}"
        saved = decode_state(
            (agg.run_dir / f"model/strategy-round-{rnd:04d}.safetensors").read_bytes()
        )
        ours = mine.state()
        assert saved.strategy == "fedadam" and saved.meta == {"t": rnd} == ours.meta
        assert _equal(saved.tensors, ours.tensors)
    assert _equal(agg.global_state, expected)
    assert not _equal(expected, _fedavg(_decoded(transports, 2)))  # not FedAvg by accident


def test_a_late_update_is_stale_and_a_stranger_is_refused(tmp_path: Path):
    """The neutral errors, as the real transports map them."""
    from teefl.transport.client import Connect, Join, Refused
    from teefl.wire import teefl_pb2

    plan = plan_from_dict(
        {**SYNTHETIC, "collaborators": NAMES, "federation": {"update_staging": "disk"}}
    )
    run = tmp_path / "run"
    rec = EventRecorder(run, "rid", "aggregator", "aggregator")
    agg = Aggregator(plan, run, "rid", rec)
    try:
        from teefl.security import attest

        sections = attest.config_sections(plan)
        stranger = MemoryTransport(lambda: agg.service, "mallory")
        with pytest.raises(Refused, match="not a collaborator"):
            stranger.handle(Join(sections))
        me = MemoryTransport(agg.service, "col1")
        assert me.handle(Connect(1.0)) is None
        reply = me.handle(Join(sections, workload_digest=agg.workload.digest))
        assert reply.current_round == 1
        payload = agg.payload
        header = teefl_pb2.Header(
            collaborator="col1",
            round=2,  # not open yet
            total_size=len(payload),
            num_samples=3,
            format=codec.FORMAT,
            crc32c=codec.crc32c(payload),
            sha256=codec.sha256(payload),
        )
        with pytest.raises(Stale):
            me.handle(PutUpdate(2, header, payload))
        assert agg.received == {}
        header.round = 1
        ack = me.handle(PutUpdate(1, header, payload))
        assert ack.accepted and list(agg.received) == ["col1"]
    finally:
        agg.checkpointer.join()
        agg.rec.close()


HEAD_ONLY = '''
import torch
from torch import nn


class HeadOnly:
    """An MLP whose body is frozen: only the head's two tensors travel (trainable_state)."""

    def build_model(self, seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        for p in model[0].parameters():
            p.requires_grad_(False)
        return model

    def trainable_state(self, model):
        return ["2.weight", "2.bias"]

    def load(self, party):
        g = torch.Generator().manual_seed(party.index)
        x = torch.randn(64, 8, generator=g)
        return x, (x[:, 0] > 0).long()

    def train(self, model, data, info):
        x, y = data
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return {"samples": len(y)}

    def evaluate(self, model, data):
        return {"samples": len(data[1])}
'''


def test_only_the_workloads_travelling_tensors_move_and_are_averaged(tmp_path: Path):
    """A workload that sends a subset (as LoRA adapters do): the updates, the global model and
    its checkpoints hold exactly that subset; the mean is the hand-computed one; the frozen
    body never leaves a collaborator."""
    (tmp_path / "head.py").write_text(HEAD_ONLY)
    agg, transports, start = _federation(tmp_path, {"workload": {"name": "./head.py:HeadOnly"}})
    assert sorted(start) == ["2.bias", "2.weight"]
    sent = _decoded(transports, 1)
    for state, samples in sent:
        assert sorted(state) == ["2.bias", "2.weight"] and samples == 64
    assert not _equal(_fedavg(sent), start)
    assert _equal(_checkpoint(agg, 1), _fedavg(sent))
    assert _equal(final_state(agg.run_dir), _fedavg(_decoded(transports, 2)))
    head_bytes = sum(t.numel() * t.element_size() for t in start.values())
    for t in transports.values():
        assert all(len(payload) < head_bytes + 4096 for _, payload in t.sent.values())


HALF = '''
import torch
from torch import nn


class Half:
    """A small MLP in half precision (DTYPE); "training" adds party- and round-specific
    noise, so every update differs and the mean is easy to compute by hand."""

    dtype = torch.DTYPE

    def build_model(self, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(self.dtype)

    def load(self, party):
        return party.index

    def train(self, model, index, info):
        g = torch.Generator().manual_seed(1000 * index + info.round)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        return {"samples": 10 + 7 * index}

    def evaluate(self, model, index):
        return {"samples": 1}
'''


@pytest.mark.parametrize("memory", ["fast", "flat"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_travels_in_its_own_dtype_and_averages_exactly(
    tmp_path: Path, dtype: str, memory: str
):
    """bf16/fp16 models travel in their dtype (half the bytes of fp32); FedAvg sums in float64
    and rounds the mean once into the model's dtype: equal to the hand-computed mean."""
    (tmp_path / "half.py").write_text(HALF.replace("DTYPE", dtype))
    agg, transports, start = _federation(
        tmp_path, {"workload": {"name": "./half.py:Half"}}, memory=memory
    )
    want = getattr(torch, dtype)
    assert {t.dtype for t in start.values()} == {want}
    n_params = sum(t.numel() for t in start.values())
    for rnd in (1, 2):
        sent = _decoded(transports, rnd)
        assert all(t.dtype == want for state, _ in sent for t in state.values())
        assert [n for _, n in sent] == [10, 17]
        for t in transports.values():
            assert len(t.sent[rnd][1]) < 2 * n_params + 4096  # 2 bytes per number
        assert _equal(_checkpoint(agg, rnd), _fedavg(sent))
    assert not _equal(_checkpoint(agg, 1), start)
