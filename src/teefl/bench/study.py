"""The study file: a base plan plus the axes of the experiment matrix, loaded and validated.

Why a file of its own (not a list of plans): the paper's study is a product -- models x datasets x
security configurations x repeats -- and a user changes one axis at a time ("add CIFAR-100",
"drop mtls"). Writing the product by hand invites a missing or duplicated cell that quietly bends
the overhead fit. The study is validated as strictly as a plan (unknown keys are errors with their
path), and the base plan is validated as a plan before anything runs.

Layout (every key optional except where noted)::

    name: default                 # names the output folder (bench-<name>) and the runs
    host_label: plain-vm          # this host's name in cell directories (merging hosts' results)
    tee_label: tdx                # state the host's TEE when detection cannot see it (recorded
                                  # as stated, never as detected)
    base_plan: plan.yaml          # a plan file (relative to the study file) ...
    base: {training: {lr: 1e-3}}  # ... and/or plan keys applied over it
    axes:
      models: [resnet18, mobilenet_v3_small]
      datasets: [fashion-mnist]
      transport: [none, tls, mtls]
      launcher: [native]          # native | gramine-direct | gramine-sgx
      at_rest: [plain]            # plain | sealed (a key is generated per study)
      attestation: ["off"]        # off | required (collaborators attest at join)
      rounds: 2                   # one value or a list (a list adds an axis)
      repeats: 2
    dataset_fallback: synthetic   # use the plan's synthetic dataset when a dataset is missing
    network:
      mode: loopback              # loopback | netns (each party in its own network namespace)
      bandwidth: 1gbit            # netns only: tc rate of every party's link, both directions
    report: {resamples: 2000}
    executor:                     # where the cells run (not part of what is measured)
      kind: local                 # local (this host, one cell after another) | slurm
      slurm:                      # kind slurm: sbatch options of every cell's job
        partition: batch
        account: proj42
        time: "01:00:00"          # per cell
        gres: gpu:1
        exclusive: true           # the cell's node to itself (default)
        options: [--qos=normal]   # further sbatch options, as they are
        parallel: 1               # cells at a time (array throttle %1, the default)
        cells:                    # other resources for some cells (one job per cell then)
          - match: {launcher: gramine-sgx}
            constraint: sgx

Why the executor is left out of the comparison of a rerun's study with the stored one: it says
where the cells run, not what they measure -- a study started here may be continued on Slurm.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from teefl.bench.mapping import deep_merge
from teefl.bench.study_fields import Strict, as_list, attestation_values, unique
from teefl.bench.study_slurm import SlurmSpec
from teefl.catalog import DATASET_NAMES, MODEL_NAMES
from teefl.errors import TeeflError
from teefl.plan import NAME_RE, Plan, plan_from_dict

TRANSPORTS = ("none", "tls", "mtls")
LAUNCHERS = ("native", "gramine-direct", "gramine-sgx")
AT_REST = ("plain", "sealed")
ATTESTATION = ("off", "required")
#: tc rate units (bits per second); tc's "bps" means *bytes* per second and is refused on purpose
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_FACTOR = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


class Axes(Strict):
    """The matrix; an axis left out takes the base plan's single value."""

    models: list[str] | None = None
    datasets: list[str] | None = None
    transport: list[Literal["none", "tls", "mtls"]] = Field(default_factory=lambda: ["none"])
    launcher: list[Literal["native", "gramine-direct", "gramine-sgx"]] = Field(
        default_factory=lambda: ["native"]
    )
    at_rest: list[Literal["plain", "sealed"]] = Field(default_factory=lambda: ["plain"])
    attestation: list[Literal["off", "required"]] = Field(default_factory=lambda: ["off"])
    rounds: list[int] | None = None
    repeats: int = Field(1, ge=1, le=1000)

    @field_validator(
        "models", "datasets", "transport", "launcher", "at_rest", "rounds", mode="before"
    )
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return as_list(v)

    @field_validator("attestation", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return attestation_values(v)

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for m in v:
            if m not in MODEL_NAMES:
                raise ValueError(f"unknown model {m!r}; choose from: {', '.join(MODEL_NAMES)}")
        return unique(v, "models")

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for d in v:
            if d not in DATASET_NAMES:
                raise ValueError(f"unknown dataset {d!r}; choose from: {', '.join(DATASET_NAMES)}")
        return unique(v, "datasets")

    @field_validator("transport", "launcher", "at_rest", "attestation")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        return unique(v, "the axis")

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(r < 1 for r in v):
            raise ValueError("rounds must be >= 1")
        return unique(v, "rounds")


class StudyNetwork(Strict):
    """How the parties are connected: loopback (one host) or one network namespace each."""

    mode: Literal["loopback", "netns"] = "loopback"
    #: netns only: cap on each party's link, both directions, as a tc rate (100mbit, 1gbit);
    #: None = unlimited (veth speed)
    bandwidth: str | None = None
    #: private subnet that exists only inside the study's namespaces
    subnet: str = "10.213.0.0/24"

    @field_validator("bandwidth")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        if v in ("", "none", "unlimited"):
            return None
        if not _RATE_RE.match(v):
            raise ValueError(
                f"bandwidth {v!r} must be a tc rate in bits per second such as 100mbit or 1gbit"
            )
        return v

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        import ipaddress

        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError as exc:
            raise ValueError(f"subnet {v!r}: {exc}") from None
        if net.version != 4 or not net.is_private or net.num_addresses < 16:
            raise ValueError(f"subnet {v!r} must be a private IPv4 network of /28 or larger")
        return v


class ExecutorSpec(Strict):
    """Where the cells run: here one after another (local), or as Slurm jobs."""

    kind: Literal["local", "slurm"] = "local"
    slurm: SlurmSpec = SlurmSpec()


class ReportSpec(Strict):
    #: bootstrap resamples of the overhead fit at the end of the study
    resamples: int = Field(2000, ge=0)


class Study(Strict):
    name: str = "study"
    description: str | None = None
    host_label: str | None = None
    tee_label: str | None = None
    base_plan: Path | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    axes: Axes = Axes()
    dataset_fallback: Literal["synthetic"] | None = None
    network: StudyNetwork = StudyNetwork()
    report: ReportSpec = ReportSpec()
    executor: ExecutorSpec = ExecutorSpec()

    @field_validator("name", "host_label")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"{v!r} must be 1-63 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("tee_label")
    @classmethod
    def _tee(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from teefl.security.tee.detect import normalise_label

        try:
            return normalise_label(v)
        except TeeflError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _executor_network(self) -> Study:
        if self.executor.kind == "slurm" and self.network.mode == "netns":
            raise ValueError(
                "network mode netns puts the parties into namespaces of this host; with executor "
                "slurm every cell runs on a compute node as a job: use network mode loopback"
            )
        return self

    def base_dict(self) -> dict[str, Any]:
        """The base plan as a mapping (base_plan is inlined by `load_study`)."""
        return copy.deepcopy(self.base)

    def base_plan_obj(self) -> Plan:
        return plan_from_dict(self.base_dict(), source=f"(study {self.name}: base)")

    def normalized(self) -> dict[str, Any]:
        """What is stored in OUT/study.yaml and compared on a rerun (base plan inlined; the
        executor left out: where the cells run is not what they measure)."""
        return self.model_dump(mode="json", exclude={"base_plan", "executor"})


def rate_bits(rate: str) -> float:
    """``1gbit`` -> 1e9 (bits per second)."""
    m = _RATE_RE.match(rate.strip().lower())
    if not m:
        raise TeeflError(f"not a tc rate: {rate!r}")
    return float(m.group(1)) * _RATE_FACTOR[m.group(2)]


_merge = deep_merge  # the name older code and tests use


def _format_errors(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"invalid study {source}: " + "; ".join(parts)


def study_from_dict(
    data: Any, source: str = "(dict)", base_dir: Path | None = None, *, check: bool = True
) -> Study:
    """Validate a study mapping; ``base_plan`` is read (relative to ``base_dir``) and inlined.

    With ``check`` the base plan is validated as a plan and every cell is built once, so a bad
    value stops here rather than after an hour of earlier cells.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TeeflError(f"invalid study {source}: the top level must be a mapping of keys")
    try:
        study = Study.model_validate(data)
    except ValidationError as err:
        raise TeeflError(_format_errors(err, source)) from None
    if study.base_plan is not None:
        path = study.base_plan
        if not path.is_absolute() and base_dir is not None:
            path = (base_dir / path).resolve()
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise TeeflError(f"invalid study {source}: base_plan {path} not found") from None
        except (OSError, yaml.YAMLError) as exc:
            raise TeeflError(f"invalid study {source}: base_plan {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise TeeflError(f"invalid study {source}: base_plan {path} is not a mapping")
        # relative paths inside the plan file stay relative to it
        plan = plan_from_dict(loaded, source=str(path), base=path.parent)
        resolved = {
            k: v
            for k, v in plan.model_dump(mode="json", exclude_defaults=True).items()
            if k in loaded
        }
        study.base = _merge(resolved, study.base)
        study.base_plan = None
    if check:
        try:
            study.base_plan_obj()
        except TeeflError as exc:
            raise TeeflError(f"invalid study {source}: base: {exc}") from None
        from teefl.bench.matrix import expand

        expand(study)  # every cell must form a valid plan
    return study


def load_study(path: Path | str) -> Study:
    """Load and validate a study YAML file; every problem becomes one `TeeflError` line."""
    from teefl.plan import read_yaml

    path = Path(path)
    data = read_yaml(path, "study")
    return study_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def _embedded(name: str) -> str:
    from importlib.resources import files

    return files("teefl").joinpath(f"defaults/{name}").read_text(encoding="utf-8")


def default_study_text() -> str:
    """The embedded default study (the paper's matrix scaled to a small machine)."""
    return _embedded("study.yaml")


def paper_study_text() -> str:
    """The paper-scale study (100 rounds, MNIST/CIFAR-10/CIFAR-100, Adam 1e-4) for real hardware."""
    return _embedded("paper-study.yaml")


def default_study() -> Study:
    return study_from_dict(yaml.safe_load(default_study_text()), "(embedded default study)")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two normalized studies."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "(unset)") != fb.get(k, "(unset)"))
