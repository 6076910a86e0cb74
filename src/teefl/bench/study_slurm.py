"""The study file's Slurm section (``executor: {kind: slurm}``): sbatch options of every
cell's job, and other resources for the cells a rule matches.

Validated as strictly as the rest of the study, so that a typo in a partition or a time limit
fails before any job is submitted, and an option teefl sets itself in its batch scripts is
refused rather than silently overridden.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from teefl.bench.study_fields import Strict, as_list, attestation_values

#: options teefl sets itself in the batch scripts it writes
_OWN_SBATCH = ("--array", "--output", "--error", "--chdir", "--dependency", "--parsable", "--wrap")
_SLURM_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class SlurmResources(Strict):
    """sbatch options of a cell's job; None leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    #: wall-time limit of one cell: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS
    time: str | None = None
    gres: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    #: the node to this cell alone (no other job's load in its timings)
    exclusive: bool | None = None
    #: further sbatch options, passed as they are (``--qos=short``, ``--reservation=r``)
    options: list[str] = Field(default_factory=list)

    @field_validator("partition", "account", "qos", "gres", "constraint", "mem")
    @classmethod
    def _word(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c.isspace() for c in v)):
            raise ValueError(f"{v!r} must be one word without spaces")
        return v

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # YAML: time: 30 (minutes)
        if isinstance(v, str) and not _SLURM_TIME_RE.match(v.strip()):
            raise ValueError(
                f"time {v!r} is not a Slurm time limit (minutes, HH:MM:SS or D-HH:MM:SS)"
            )
        return v.strip() if isinstance(v, str) else v

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not opt.startswith("-") or "\n" in opt:
                raise ValueError(f"{opt!r} is not an sbatch option (e.g. --qos=short)")
            if opt.split("=", 1)[0] in _OWN_SBATCH:
                raise ValueError(f"{opt.split('=', 1)[0]} is set by teefl in the batch scripts")
        return v


class CellMatch(Strict):
    """Which cells a `CellResources` entry applies to; each key given must match."""

    models: list[str] | None = None
    datasets: list[str] | None = None
    transport: list[str] | None = None
    launcher: list[str] | None = None
    at_rest: list[str] | None = None
    attestation: list[str] | None = None
    #: configuration names as in the cell names (baseline, tls, gramine-sgx+mtls ...)
    config: list[str] | None = None
    rounds: list[int] | None = None

    @field_validator(
        "models", "datasets", "transport", "launcher", "at_rest", "config", "rounds", mode="before"
    )
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return as_list(v)

    @field_validator("attestation", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return attestation_values(v)


class CellResources(SlurmResources):
    """Resources for the cells that ``match`` (merged over the study's own)."""

    match: CellMatch


class SlurmSpec(SlurmResources):
    """How ``executor: {kind: slurm}`` submits and follows the cells."""

    exclusive: bool | None = True
    #: cells that may run at the same time (the array throttle ``%N``); 1 keeps every cell's
    #: timings free of another cell's load, also on a node shared by two cells
    parallel: int = Field(1, ge=1, le=10000)
    #: seconds between two looks at the queue (squeue)
    poll: float = Field(5.0, ge=0.1, le=600)
    cells: list[CellResources] = Field(default_factory=list)
