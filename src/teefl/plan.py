"""The Plan: what to train, who takes part, which protections -- loaded from YAML and validated.

Why pydantic with ``extra="forbid"``: a typo in a plan (``round: 3`` instead of ``rounds: 3``)
must stop the run with the path of the offending key, not silently fall back to a default after
an hour of training. `load_plan` turns every validation problem into one `TeeflError` line.

The sections (``model:``, ``security:``, ...) are `teefl.plan_specs`'s; this module composes them
into the `Plan`, loads it and fingerprints it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from teefl.errors import TeeflError
from teefl.plan_specs import (
    NAME_RE,
    VISION_SECTIONS,
    AtRestSpec,
    AttestationSpec,
    DatasetSpec,
    FederationSpec,
    ModelSpec,
    NetworkSpec,
    PartitionSpec,
    ReattestSpec,
    RuntimeSpec,
    SecuritySpec,
    SnpCollateralSpec,
    StrategySpec,
    Strict,
    SyntheticSpec,
    TlsSpec,
    TrainingSpec,
    WorkloadSpec,
)


def _default(spec: type[Strict], value: Any) -> bool:
    """Whether ``value`` validates to ``spec``'s defaults (an invalid one is reported by the
    plan's own validation, not here)."""
    try:
        return spec.model_validate(value) == spec()
    except ValidationError:
        return False


class Plan(Strict):
    name: str = "teefl"
    seed: int = 0
    collaborators: list[str] = Field(default_factory=lambda: ["col1", "col2", "col3"])
    federation: FederationSpec = FederationSpec()
    model: ModelSpec = ModelSpec()
    dataset: DatasetSpec = DatasetSpec()
    partition: PartitionSpec = PartitionSpec()
    training: TrainingSpec = TrainingSpec()
    network: NetworkSpec = NetworkSpec()
    security: SecuritySpec = SecuritySpec()
    runtime: RuntimeSpec = RuntimeSpec()
    #: what is trained (default: ``vision`` with the model/dataset/partition/training sections)
    workload: WorkloadSpec = WorkloadSpec()

    @model_validator(mode="before")
    @classmethod
    def _vision_options(cls, data: Any) -> Any:
        """One place for the vision workload's settings: ``workload: {name: vision, options:
        {model: ...}}`` moves its options to the top-level sections (where every part reads
        them, and where plans written before workloads existed have them); giving both is
        refused. A non-vision workload takes no model/dataset/partition sections."""
        if not isinstance(data, dict) or not isinstance(data.get("workload"), dict):
            return data
        wl = data["workload"]
        name = str(wl.get("name", "vision")).strip()
        options = wl.get("options") or {}
        if name != "vision":
            specs = {"model": ModelSpec, "dataset": DatasetSpec, "partition": PartitionSpec}
            # a section at its defaults is no setting (a plan written by to_yaml has them all)
            given = [k for k, spec in specs.items() if k in data and not _default(spec, data[k])]
            if given:
                raise ValueError(
                    f"the {', '.join(given)} section(s) belong to the vision workload; workload "
                    f"{name} takes its settings under workload.options (move them there)"
                )
            return data
        if not isinstance(options, dict):
            return data  # the spec's own validation says what is wrong
        unknown = [k for k in options if k not in VISION_SECTIONS]
        if unknown:
            raise ValueError(
                f"workload.options.{unknown[0]}: unknown key for the vision workload "
                f"(known: {', '.join(VISION_SECTIONS)})"
            )
        both = [k for k in options if k in data]
        if both:
            raise ValueError(
                f"{both[0]} is given both at the top level and under workload.options; keep one"
            )
        data = {**data, **options, "workload": {**wl, "options": {}}}
        return data

    @field_validator("collaborators", mode="before")
    @classmethod
    def _count_or_names(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError("need at least one collaborator")
            return [f"col{i + 1}" for i in range(v)]
        return v

    @field_validator("collaborators")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("need at least one collaborator")
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(
                    f"collaborator name {name!r} must be 1-63 letters, digits, '.', '_' or '-'"
                )
        if len(set(v)) != len(v):
            raise ValueError("collaborator names must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        quorum = self.federation.min_collaborators
        if quorum is not None and quorum > len(self.collaborators):
            raise ValueError(
                f"federation.min_collaborators ({quorum}) exceeds the number of collaborators "
                f"({len(self.collaborators)})"
            )
        sec = self.security
        if sec.attestation.enabled and sec.transport == "none":
            raise ValueError(
                "security.attestation binds evidence to the TLS key: it needs transport tls or mtls"
            )
        rest = sec.at_rest
        if rest.mode == "sealed" and not (rest.key_file or rest.key_env or rest.key_from):
            raise ValueError("security.at_rest.mode sealed needs key_file, key_env or key_from")
        if rest.key_from and sec.transport == "none":
            raise ValueError(
                "security.at_rest.key_from: the key service is reached over mTLS with the plan's "
                "CA; transport none has none"
            )
        return self

    # -- helpers -----------------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        return self.federation.rounds

    def address(self) -> str:
        return f"{self.network.host}:{self.network.port}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def require_transport(plan: Plan) -> str:
    """Settle the transport before anything listens or connects.

    Why not in the validator: ``teefl run --transport mtls`` may still issue throwaway certificates
    after loading, and a collaborator-only host has no server key to check.
    """
    sec = plan.security
    if sec.transport is None:
        if sec.tls.ca is None:
            raise TeeflError(
                "the plan does not choose security.transport: set none (unencrypted, a warning is "
                "printed), tls or mtls -- or pass --transport"
            )
        sec.transport = "mtls"
    if sec.transport != "none" and sec.tls.ca is None:
        raise TeeflError(
            f"security.transport is {sec.transport} but security.tls.ca is not set: run "
            f"`teefl pki plan PLAN`, or `teefl run --transport {sec.transport}` for throwaway "
            "certificates"
        )
    if sec.transport == "none" and sec.attestation.enabled:
        raise TeeflError("security.attestation binds evidence to the TLS key: use tls or mtls")
    if sec.attestation.collaborators == "required" and sec.transport != "mtls":
        raise TeeflError(
            "security.attestation.collaborators: required binds each collaborator's evidence to "
            "its client certificate: it needs transport mtls"
        )
    return sec.transport


def _format_errors(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return f"invalid plan {source}: " + "; ".join(parts)


def plan_from_dict(data: dict[str, Any], source: str = "(dict)", base: Path | None = None) -> Plan:
    """Validate a plan given as a mapping; relative paths are resolved against ``base``."""
    if not isinstance(data, dict):
        raise TeeflError(f"invalid plan {source}: the top level must be a mapping of keys")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as err:
        raise TeeflError(_format_errors(err, source)) from None
    if base is not None:
        _resolve_paths(plan, base)
    return plan


def _resolve_paths(plan: Plan, base: Path) -> None:
    def fix(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return (base / p).resolve()

    plan.dataset.root = fix(plan.dataset.root)
    att = plan.security.attestation
    att.collateral = fix(att.collateral)
    att.simulated_key = fix(att.simulated_key)
    att.snp.certs = [p for p in map(fix, att.snp.certs) if p is not None]
    att.snp.crls = [p for p in map(fix, att.snp.crls) if p is not None]
    att.snp.kds_cache = fix(att.snp.kds_cache)
    rest = plan.security.at_rest
    rest.key_file, rest.client_cert, rest.client_key = (
        fix(rest.key_file),
        fix(rest.client_cert),
        fix(rest.client_key),
    )
    plan.runtime.sign_key = fix(plan.runtime.sign_key)
    plan.workload.data_root = fix(plan.workload.data_root)
    plan.workload.base = fix(plan.workload.base) if plan.workload.base is not None else base
    tls = plan.security.tls
    tls.ca, tls.server_cert, tls.server_key, tls.client_dir, tls.crl = (
        fix(tls.ca),
        fix(tls.server_cert),
        fix(tls.server_key),
        fix(tls.client_dir),
        fix(tls.crl),
    )


# -- the plan fingerprint ----------------------------------------------------------------------
#: fields that say where something is on one host, not what the federation does: they may differ
#: between the parties' copies of a plan. Everything else is compared (`plan_digest`).
HOST_LOCAL: dict[str, tuple[str, ...]] = {
    "dataset": ("root",),
    "network": ("listen",),
    # file locations; the CA certificate's *content* is bound separately (teefl.security.attest)
    "security.tls": ("ca", "server_cert", "server_key", "client_dir", "crl"),
    # where verification collateral comes from (each verifier judges evidence itself), and
    # the simulated provider's key file (the policies pin its fingerprint, which is compared)
    "security.attestation": ("collateral", "pccs_url", "simulated_key"),
    "security.attestation.snp": ("certs", "crls", "kds", "kds_cache"),
    # the owner's key: where it is, or which key service releases it and with which client
    # certificate (the mode, sealed or plain, is compared)
    "security.at_rest": (
        "key_file",
        "key_env",
        "key_from",
        "client_cert",
        "client_key",
        "key_timeout",
    ),
    "federation": ("staging_dir",),
    # a label stated on one host and a signing key file
    "runtime": ("tee_label", "sign_key"),
    # where the code and each party's data are; WHICH code is compared by its digest at Join
    "workload": ("base", "data_root"),
}


def _canonical(value: Any) -> bytes:
    """One byte string per value: JSON with sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def comparable_plan(plan: Plan) -> dict[str, Any]:
    """The resolved plan as plain data, host-local fields (`HOST_LOCAL`) left out."""
    data = plan.model_dump(mode="json")
    for where, keys in HOST_LOCAL.items():
        node = data
        for part in where.split("."):
            node = node[part]
        for key in keys:
            node.pop(key, None)
    return data


def plan_sections(plan: Plan) -> dict[str, bytes]:
    """SHA-256 of each top-level section of `comparable_plan`: cheap to send, and two parties
    whose plans differ can say *where* (``federation``, ``security``) without showing values."""
    return {
        key: hashlib.sha256(_canonical(value)).digest()
        for key, value in comparable_plan(plan).items()
    }


def plan_digest(plan: Plan) -> bytes:
    """SHA-256 of the canonical resolved plan (host-local fields excluded): the plan
    fingerprint every party compares at Join and, with attestation, binds into its evidence.

    Why the *resolved* plan: defaults and ``--transport`` are applied, so two plan files that
    differ only in spelling (a default written out) agree, and a default that differs between
    teefl versions does not.
    """
    return hashlib.sha256(_canonical(comparable_plan(plan))).digest()


def read_yaml(path: Path | str, what: str = "plan") -> Any:
    """Read a YAML file; a missing file or malformed YAML becomes one `TeeflError` line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TeeflError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise TeeflError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TeeflError(f"invalid {what} {path}:{where}: malformed YAML ({problem})") from None


def load_plan(path: Path | str) -> Plan:
    """Load and validate a YAML plan file; every problem becomes one clear `TeeflError`."""
    path = Path(path)
    data = read_yaml(path, "plan")
    if data is None:
        data = {}
    return plan_from_dict(data, source=str(path), base=path.resolve().parent)


def default_plan() -> Plan:
    """The embedded default plan (see ``teefl/defaults/plan.yaml``)."""
    from importlib.resources import files

    text = files("teefl").joinpath("defaults/plan.yaml").read_text(encoding="utf-8")
    return plan_from_dict(yaml.safe_load(text), source="(embedded default plan)")


# the public names; the plan's sections (teefl.plan_specs) included, where callers find them
__all__ = [
    "HOST_LOCAL",
    "NAME_RE",
    "AtRestSpec",
    "AttestationSpec",
    "DatasetSpec",
    "FederationSpec",
    "ModelSpec",
    "NetworkSpec",
    "PartitionSpec",
    "Plan",
    "ReattestSpec",
    "RuntimeSpec",
    "SecuritySpec",
    "SnpCollateralSpec",
    "StrategySpec",
    "SyntheticSpec",
    "TlsSpec",
    "TrainingSpec",
    "comparable_plan",
    "default_plan",
    "load_plan",
    "plan_digest",
    "plan_from_dict",
    "plan_sections",
    "read_yaml",
    "require_transport",
]
