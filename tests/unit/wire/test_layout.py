"""The payload layout, the flat FedAvg built on it, and the collaborator's model living in its
payload: each must give exactly what the per-tensor path gives, and fall back where it cannot."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from teefl.client.resident import ResidentModel
from teefl.strategy.running import RunningFedAvg
from teefl.transport import framing
from teefl.transport.socket_client import SocketData
from teefl.wire import codec, teefl_pb2
from teefl.wire.checks import FlatUpdate, UpdateRejected
from teefl.workload.models import build_model


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype class a model may hold, a zero-length tensor, a non-contiguous one."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, generator=g).t(),  # non-contiguous
        "conv.bias": torch.randn(5, generator=g),
        "bn.num_batches_tracked": torch.tensor(7 + seed),
        "empty": torch.empty(0, 3),
        "half": torch.randn(3, generator=g).half(),
        "bf": torch.randn(2, generator=g).bfloat16(),
        "z.last": torch.randn(2, 2, generator=g),
    }


def test_layout_is_the_encoded_payload() -> None:
    state = _mixed()
    payload = codec.encode_state(state)
    layout = codec.Layout.of_state(state)
    assert layout is not None and layout.size == len(payload)
    assert bytes(payload).startswith(layout.head) and layout.matches(payload)
    # tensors of one dtype next to each other form one run: float32 (3 tensors), int64, ...
    assert [(d, n) for d, _, n in layout.runs] == [
        (torch.int64, 1),
        (torch.float32, 12 + 5 + 4),
        (torch.bfloat16, 2),
        (torch.float16, 3),
    ]
    views = layout.tensor_views(payload)
    for name, t in state.items():
        assert torch.equal(views[name], t) and views[name].dtype == t.dtype
    flat = torch.cat([r.double() for r in layout.run_views(payload)])
    assert flat.numel() == sum(t.numel() for t in state.values())
    other = dict(state, extra=torch.zeros(1))
    assert not layout.matches(codec.encode_state(other))
    assert not layout.matches(payload[:-1])


def test_flat_adds_equal_per_tensor_adds_bit_for_bit() -> None:
    ref = _mixed()
    layout = codec.Layout.of_state(ref)
    assert layout is not None
    ups = [_mixed(s) for s in (1, 2, 3)]
    per = RunningFedAvg(ref)
    flat = RunningFedAvg(ref, layout)
    for i, u in enumerate(ups):
        per.add(u, i + 2)
        if i == 1:  # a per-tensor add into the flat sums lands in the same memory
            flat.add(u, i + 2)
        else:
            flat.add(FlatUpdate(layout, codec.encode_state(u)), i + 2)
    a, b = per.result(), flat.result()
    for name in ref:
        assert torch.equal(a[name], b[name]), name
    assert b["bn.num_batches_tracked"].item() == 10  # counters: the largest
    out = layout.allocate()
    flat.result_into(layout.run_views(out))
    assert bytes(out) == bytes(codec.encode_state(b))


def test_flat_update_of_another_layout_is_refused() -> None:
    ref = _mixed()
    agg = RunningFedAvg(ref, codec.Layout.of_state(ref))
    other = {k: v.float() if v.is_floating_point() else v for k, v in ref.items()}
    lay2 = codec.Layout.of_state(other)
    assert lay2 is not None
    with pytest.raises(UpdateRejected, match="layout"):
        agg.add(FlatUpdate(lay2, codec.encode_state(other)), 1)
    assert agg.count == 0


def test_flat_update_finiteness() -> None:
    ref = _mixed()
    layout = codec.Layout.of_state(ref)
    assert layout is not None
    assert FlatUpdate(layout, codec.encode_state(ref)).finite()
    bad = dict(ref, half=torch.tensor([1.0, float("inf"), 0.0]).half())
    assert not FlatUpdate(layout, codec.encode_state(bad)).finite()


def test_sums_are_reused_only_for_the_same_layout() -> None:
    ref = _mixed()
    layout = codec.Layout.of_state(ref)
    first = RunningFedAvg(ref, layout)
    first.add(ref, 1)
    memory = [t.data_ptr() for t in first.run_sums]
    second = RunningFedAvg(ref, layout, reuse=first)
    assert [t.data_ptr() for t in second.run_sums] == memory
    second.add(_mixed(4), 1)  # the first add overwrites what the old round left
    assert torch.equal(second.result()["z.last"], _mixed(4)["z.last"])
    other = {"w": torch.zeros(3)}
    third = RunningFedAvg(other, codec.Layout.of_state(other), reuse=second)
    assert third.run_sums[0].numel() == 3
    assert [t.data_ptr() for t in second.run_sums] == memory  # not taken: another layout


def test_spares_hand_out_only_unreferenced_buffers() -> None:
    layout = codec.Layout.of_state(_mixed())
    assert layout is not None
    spares = codec.Spares(keep=2)
    held = layout.allocate()
    views = layout.tensor_views(held)  # a tensor view still refers to it
    spares.give(held)
    del held
    assert spares.free(layout) is None and len(spares.bufs) == 1  # not handed out
    del views
    again = spares.free(layout)
    assert again is not None
    assert not spares.bufs and bytes(again[: len(layout.head)]) == layout.head
    for _ in range(3):
        spares.give(layout.allocate())
    assert len(spares.bufs) == 2


# -- the resident model --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v3_small"])
def test_resident_model_is_its_payload_through_training(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resident = ResidentModel.bind(model)
    assert resident is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # values kept
    assert bytes(resident.payload) == bytes(codec.encode_state(model.state_dict()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert resident.intact()  # parameters and BatchNorm statistics updated in place
    assert bytes(resident.payload) == bytes(codec.encode_state(model.state_dict()))
    assert not torch.equal(model.state_dict()[next(iter(before))], next(iter(before.values())))


def test_resident_model_notices_a_replaced_tensor_and_refuses_tied_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    resident = ResidentModel.bind(model)
    assert resident is not None and resident.intact()
    model[1].weight.data = torch.zeros(3, 3)
    assert not resident.intact()
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert ResidentModel.bind(tied) is None


class _Collaborator:
    """A collaborator's data plane and resident model: what a download over it needs."""

    def __init__(self, model: torch.nn.Module, sock) -> None:
        self.data = SocketData(sock, "col1", "crc32c", "none")
        self.resident = ResidentModel.bind(model)

    def _download_data(self, r: int):
        return self.data.get_model(r, self.resident)


def _collaborator(model: torch.nn.Module, sock) -> _Collaborator:
    return _Collaborator(model, sock)


def _serve_model(sock, payload) -> threading.Thread:
    def serve() -> None:
        framing.recv_frame(sock)  # GET
        h = teefl_pb2.Header(
            collaborator="col1",
            round=1,
            total_size=len(payload),
            format=codec.FORMAT,
            crc32c=codec.crc32c(payload),
        )
        framing.send_frame(sock, framing.MODEL, h.SerializeToString())
        framing.send_payload(sock, payload)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_download_lands_in_the_model_only_for_its_own_layout() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    target = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    a, b = socket.socketpair()
    with a, b:
        col = _collaborator(model, a)
        assert col.resident is not None
        t = _serve_model(b, codec.encode_state(target))
        state, size = col._download_data(1)
        t.join(5)
        assert state is None and size == len(col.resident.payload)  # nothing left to load
        for k, v in model.state_dict().items():
            assert torch.equal(v, target[k]), k
        assert col.resident.intact()
        # a payload of another layout (same size, other names) goes to the receive buffer
        renamed = {k.replace("0.", "9."): v for k, v in target.items()}
        other = codec.encode_state(renamed)
        assert len(other) == len(col.resident.payload)  # names of the same length
        t = _serve_model(b, other)
        state, _ = col._download_data(1)
        t.join(5)
        assert state is not None and set(state) == set(renamed)
        for k, v in model.state_dict().items():  # the model untouched by it
            assert torch.equal(v, target[k]), k
