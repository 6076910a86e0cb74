"""A plan resolved once, after loading: what the plan's defaults and combinations come to.

Why: a plan leaves some choices to teefl ("auto", an unset transport, a staging mode that only
applies to some data planes, launchers and at-rest modes). Each process used to re-derive them
where it needed them, and the CLI applied its overrides by assigning to the loaded plan, past the
plan's own validation. `resolve` decides them in one place, from a plan that has been validated
as a whole (`with_overrides`), and every part reads the answer instead of the rules.

Torch- and grpc-free, like the plan: the launcher, the CLI and the bench resolve plans too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from teefl.plan import Plan, plan_from_dict
from teefl.rundir import RunDir

Role = Literal["aggregator", "collaborator", "launcher"]
ROLES: tuple[str, ...] = ("aggregator", "collaborator", "launcher")
Transport = Literal["none", "tls", "mtls"]


@dataclass(frozen=True)
class ResolvedPlan:
    """The decisions of one plan for one role; ``plan`` is the validated plan they come from."""

    plan: Plan
    role: Role
    #: what protects the connections: none, tls (server authenticated) or mtls (both)
    transport: Transport
    #: what payloads are checked against on receipt: one of `teefl.wire.codec.CHECKS`
    payload_check: str
    #: how model payloads travel: the socket data plane or gRPC streams
    data_plane: Literal["socket", "grpc"]
    #: where the aggregator receives updates: "memory" (shared-memory slots that outlive it) or
    #: "disk" (the round store as they arrive); always "disk" for other roles
    staging: Literal["memory", "disk"]
    #: this user's folder in the plan's tmpfs where updates are staged; None unless staging is
    #: "memory" (a restart reads what an earlier process staged there)
    staging_dir: Path | None
    #: the run directory's contract (paths, run.json, metrics); None where no run directory is
    #: given (a plan checked before a run exists)
    run: RunDir | None

    @property
    def encrypted(self) -> bool:
        return self.transport != "none"


def transport_of(plan: Plan) -> Transport:
    """The plan's transport; an unset one is none (`teefl.plan.require_transport` says whether
    a plan may leave it unset)."""
    return plan.security.transport or "none"


def payload_check_of(plan: Plan) -> str:
    """``network.payload_check``, with "auto" decided: CRC32C catches corruption on a plain
    connection; under TLS the record layer's MAC already does, so nothing more is computed
    (docs/decisions/002-payload-check.md)."""
    check = plan.network.payload_check
    if check != "auto":
        return check
    return "crc32c" if transport_of(plan) == "none" else "none"


def staging_of(plan: Plan) -> tuple[Literal["memory", "disk"], Path | None]:
    """The aggregator's update staging and its folder, from the plan alone.

    Memory staging needs all of: the plan asks for it; the socket data plane (gRPC uploads are
    stored after decoding); no sealing at rest (a sealed update is stored as ciphertext, never in
    plain shared memory); the native launcher (under Gramine the host's tmpfs is not trusted).
    """
    fed = plan.federation
    if (
        fed.update_staging != "memory"
        or fed.memory == "flat"  # received into the run directory's files
        or plan.network.data_plane != "socket"
        or plan.security.at_rest.mode == "sealed"
        or plan.runtime.launcher != "native"
    ):
        return "disk", None
    return "memory", fed.staging_dir / f"teefl-{os.getuid()}"


def resolve(plan: Plan, role: Role, run_dir: Path | str | None = None) -> ResolvedPlan:
    """Decide, once, what ``plan`` comes to for ``role`` (and the run in ``run_dir``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    staging, staging_dir = staging_of(plan) if role == "aggregator" else ("disk", None)
    return ResolvedPlan(
        plan=plan,
        role=role,
        transport=transport_of(plan),
        payload_check=payload_check_of(plan),
        data_plane=plan.network.data_plane,
        staging=staging,
        staging_dir=staging_dir,
        run=RunDir(run_dir) if run_dir is not None else None,
    )


def with_overrides(plan: Plan, overrides: dict[str, Any], source: str = "command line") -> Plan:
    """A new plan: ``plan`` with ``overrides`` (dotted keys, e.g. ``security.transport``)
    applied and the whole validated again, so an override meets the same checks as the file
    (``--transport none`` with attestation on is refused, not run). The plan given is not
    changed."""
    if not overrides:
        return plan
    data = plan.model_dump(mode="python")
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return plan_from_dict(data, source=f"(with {source} overrides)")
