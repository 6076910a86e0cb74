"""The resolved plan: each choice decided once, from a plan validated as a whole."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import pytest

from teefl.errors import TeeflError
from teefl.plan import default_plan, plan_from_dict
from teefl.resolved import payload_check_of, resolve, staging_of, transport_of, with_overrides
from teefl.rundir import RunDir


def _plan(**sections):
    return plan_from_dict(sections)


def test_transport_and_payload_check() -> None:
    assert resolve(_plan(), "collaborator").transport == "none"  # unset: none
    for transport, check in itertools.product(
        ("none", "tls", "mtls"), ("auto", "crc32c", "sha256")
    ):
        plan = _plan(security={"transport": transport}, network={"payload_check": check})
        r = resolve(plan, "aggregator")
        assert r.transport == transport == transport_of(plan)
        assert r.encrypted is (transport != "none")
        want = check if check != "auto" else ("crc32c" if transport == "none" else "none")
        assert r.payload_check == want == payload_check_of(plan)


def test_payload_check_agrees_with_the_transport_package() -> None:
    """Until the aggregator and collaborator read the resolved plan, the old helper must agree."""
    channels = pytest.importorskip("teefl.transport.channels")
    if not hasattr(channels, "payload_check"):
        pytest.skip("transport.channels.payload_check is gone: the resolved plan is the only one")
    for transport, check in itertools.product(
        ("none", "tls", "mtls"), ("auto", "crc32c", "sha256")
    ):
        plan = _plan(security={"transport": transport}, network={"payload_check": check})
        assert channels.payload_check(plan) == resolve(plan, "aggregator").payload_check


def test_memory_staging_only_where_every_condition_holds(tmp_path: Path) -> None:
    base = {"federation": {"staging_dir": str(tmp_path)}}
    r = resolve(plan_from_dict(base), "aggregator")
    assert (r.staging, r.staging_dir) == ("memory", tmp_path / f"teefl-{os.getuid()}")
    # each condition alone sends updates to disk
    for change in (
        {"federation": {"staging_dir": str(tmp_path), "update_staging": "disk"}},
        {**base, "network": {"data_plane": "grpc"}},
        {**base, "security": {"at_rest": {"mode": "sealed", "key_env": "K"}}},
        {**base, "runtime": {"launcher": "gramine-direct"}},
    ):
        assert staging_of(plan_from_dict(change)) == ("disk", None), change
    # only the aggregator stages
    assert resolve(plan_from_dict(base), "collaborator").staging_dir is None


def test_frozen_with_run_paths(tmp_path: Path) -> None:
    r = resolve(_plan(), "aggregator", tmp_path)
    assert r.run is not None and r.run.plan == RunDir(tmp_path).plan
    assert resolve(_plan(), "launcher").run is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.transport = "tls"  # type: ignore[misc]
    with pytest.raises(ValueError, match="role"):
        resolve(_plan(), "observer")  # type: ignore[arg-type]


def test_overrides_validate_the_whole_plan_and_leave_the_original() -> None:
    plan = _plan(security={"transport": "tls"})
    assert with_overrides(plan, {}) is plan
    same = with_overrides(plan, {"federation.rounds": plan.federation.rounds})
    assert same == plan and same is not plan
    default = default_plan()
    assert with_overrides(default, {"seed": default.seed}) == default
    new = with_overrides(plan, {"federation.rounds": 7, "collaborators": 2, "network.listen": None})
    assert (new.federation.rounds, new.collaborators) == (7, ["col1", "col2"])
    assert plan.federation.rounds != 7 and len(plan.collaborators) == 3  # not mutated
    # an override meets the plan's cross-field checks (the CLI used to assign past them)
    attested = _plan(security={"transport": "tls", "attestation": {"collaborators": "required"}})
    with pytest.raises(TeeflError, match=r"command line overrides.*TLS key") as exc:
        with_overrides(attested, {"security.transport": "none"})
    assert "\n" not in str(exc.value)
    with pytest.raises(TeeflError, match="rounds"):
        with_overrides(plan, {"federation.rounds": 0})
