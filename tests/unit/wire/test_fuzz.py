"""Property tests: random and mutated update streams never crash the aggregator and never touch
the global model; random bytes never crash the payload decoder."""

from __future__ import annotations

import contextlib
import hashlib
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedutil import SYNTHETIC
from teefl.measure.events import EventRecorder
from teefl.plan import plan_from_dict
from teefl.server.aggregator import Aggregator
from teefl.wire import codec, teefl_pb2
from teefl.wire.checks import UpdateRejected


class _Ctx:
    def cancel(self) -> None:
        pass


@pytest.fixture(scope="module")
def agg(tmp_path_factory) -> Aggregator:
    run = tmp_path_factory.mktemp("fuzz")
    plan = plan_from_dict({**SYNTHETIC, "federation": {"rounds": 2}})
    return Aggregator(plan, run, "fuzz", EventRecorder(run, "fuzz", "aggregator", "aggregator"))


@given(st.binary(max_size=4096))
@settings(max_examples=300, deadline=None)
def test_decoder_never_crashes(data: bytes) -> None:
    with contextlib.suppress(codec.PayloadError):
        codec.decode_state(data)


def _stream(payload: bytes, header: dict, cuts: list[int]) -> tuple[teefl_pb2.Chunk, list]:
    first = teefl_pb2.Chunk(header=teefl_pb2.Header(**header))
    bounds = sorted({0, len(payload), *[c % (len(payload) + 1) for c in cuts]})
    chunks = [teefl_pb2.Chunk(data=payload[a:b], offset=a) for a, b in itertools.pairwise(bounds)]
    return first, chunks


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.integers(0, 255)),
)


@given(
    muts=st.lists(mutation, max_size=4),
    fix_checksum=st.booleans(),
    cuts=st.lists(st.integers(0, 10**9), max_size=6),
    samples=st.integers(-5, 2_000_000),
    swap=st.booleans(),
)
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_mutated_updates_never_corrupt_the_model(
    agg, muts, fix_checksum, cuts, samples, swap
) -> None:
    before = {k: v.clone() for k, v in agg.global_state.items()}
    payload = bytearray(agg.payload)
    digest = hashlib.sha256(payload).digest()
    crc = codec.crc32c(payload)  # what transport none checks (network.payload_check auto)
    for kind, pos, val in muts:
        if not payload:
            break
        i = pos % len(payload)
        if kind == "flip":
            payload[i] ^= 1 << val
        elif kind == "truncate":
            del payload[i:]
        else:
            payload.insert(i, val)
    if fix_checksum:
        digest = hashlib.sha256(payload).digest()
        crc = codec.crc32c(payload)
    header = dict(
        collaborator="col1",
        round=1,
        total_size=len(payload),
        sha256=digest,
        crc32c=crc,
        num_samples=max(samples, 0),
        format=codec.FORMAT,
    )
    first, chunks = _stream(bytes(payload), header, cuts)
    if swap and len(chunks) > 1:
        chunks[0], chunks[-1] = chunks[-1], chunks[0]
    with contextlib.suppress(UpdateRejected):
        agg.grpc._receive("col1", first.header, first, iter(chunks), _Ctx(), 0.0)
    # the round cannot close with one of three updates: the global model must be untouched
    assert agg.round == 1
    for k, v in before.items():
        assert torch.equal(agg.global_state[k], v)
    # whatever was accepted passed every check: finite, right names, shapes and dtypes
    assert agg.model.fedavg.count <= 1
