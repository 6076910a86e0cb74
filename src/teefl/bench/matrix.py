"""Cells of a study: expansion of the axes, the run order, and what this host can run.

Why the order interleaves configurations: a machine drifts over an hour (thermal throttling, a
neighbour's job, page cache). Running all baseline cells first and all TLS cells last would put
that drift into C_tls. The order is: repeat 1 before repeat 2 (so a half-finished study still
has every configuration once), inside a repeat by rounds, dataset and model, and inside each of
those blocks the configurations are rotated by one more position per block, e.g. for three
configurations::

    r1 resnet18:          none, tls, mtls
    r1 mobilenet_v3_small: tls, mtls, none
    r2 resnet18:          tls, mtls, none
    r2 mobilenet_v3_small: mtls, none, tls

Why skips are decided up front: a study runs for hours; a cell that cannot run here (Gramine
missing, dataset missing) must be named with its reason before the first cell starts, not fail
in the middle of the night.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teefl.bench.mapping import deep_merge
from teefl.errors import TeeflError
from teefl.plan import Plan, plan_from_dict, require_transport

if TYPE_CHECKING:  # annotations only: the study imports this module to check its cells
    from teefl.bench.study import Study


@dataclass(frozen=True)
class Config:
    """One security configuration of the matrix."""

    transport: str = "none"
    launcher: str = "native"
    at_rest: str = "plain"
    attestation: str = "off"

    @property
    def name(self) -> str:
        """``baseline``, ``tls``, ``gramine-sgx+sealed+mtls`` ... (used in directory names)."""
        parts = []
        if self.launcher != "native":
            parts.append(self.launcher)
        if self.at_rest != "plain":
            parts.append(self.at_rest)
        if self.attestation == "required":
            parts.append("attested")
        if self.transport != "none":
            parts.append(self.transport)
        return "+".join(parts) or "baseline"


@dataclass
class Cell:
    """One run of the study: model x dataset x configuration x rounds x repeat."""

    model: str
    dataset: str
    config: Config
    rounds: int
    repeat: int
    name: str = ""
    #: plan keys applied over the study's base plan
    overrides: dict[str, Any] = field(default_factory=dict)
    #: why this host cannot run it (None = runnable)
    skip: str | None = None
    #: announced substitutions (e.g. synthetic data for a missing dataset)
    notes: list[str] = field(default_factory=list)

    @property
    def block(self) -> tuple[int, int, str, str]:
        return (self.repeat, self.rounds, self.dataset, self.model)


def _cell_name(study: Study, model: str, dataset: str, cfg: Config, rounds: int, rep: int) -> str:
    parts = [study.host_label] if study.host_label else []
    parts += [model, dataset]
    if study.axes.rounds is not None and len(study.axes.rounds) > 1:
        parts.append(f"{rounds}rounds")
    parts += [cfg.name, f"r{rep}"]
    return "-".join(parts)


def cell_overrides(study: Study, model: str, dataset: str, cfg: Config, rounds: int) -> dict:
    """Plan keys a cell sets on top of the base plan."""
    over: dict[str, Any] = {
        "name": study.name,
        "model": {"name": model},
        "dataset": {"name": dataset},
        "federation": {"rounds": rounds},
        "security": {
            "transport": cfg.transport,
            "at_rest": {"mode": cfg.at_rest},
        },
        "runtime": {"launcher": cfg.launcher},
    }
    if cfg.attestation == "required":
        over["security"]["attestation"] = {"collaborators": "required"}
    if study.tee_label:
        over["runtime"]["tee_label"] = study.tee_label
    return over


def build_plan(study: Study, cell: Cell, *, key_file: Path | None = None) -> Plan:
    """The cell's Plan: base plan + the cell's overrides (+ the study's at-rest key)."""
    data = deep_merge(study.base_dict(), cell.overrides)
    if cell.config.at_rest == "sealed":
        at = data["security"]["at_rest"]
        if not (at.get("key_file") or at.get("key_env")):
            at["key_file"] = str(key_file or "(generated per study)")
    return plan_from_dict(data, source=f"(cell {cell.name})")


def _combination_problem(plan: Plan) -> str | None:
    """Why a combination of axis values is not a valid configuration (rules live in plan.py)."""
    probe = plan.model_copy(deep=True)
    if probe.security.transport != "none" and probe.security.tls.ca is None:
        probe.security.tls.ca = Path("/dev/null")  # certificates are issued per cell later
    try:
        require_transport(probe)
    except TeeflError as exc:
        return str(exc)
    return None


def expand(study: Study) -> tuple[list[Cell], list[tuple[Config, str]]]:
    """All cells of the study in run order, and the configurations left out as invalid.

    Every cell's plan is validated here; a combination that plan.py refuses (attestation without
    the transport it binds to) is dropped with its reason instead of failing the study.
    """
    base = study.base_plan_obj()
    axes = study.axes
    models = axes.models or [base.model.name]
    datasets = axes.datasets or [base.dataset.name]
    rounds_list = axes.rounds or [base.federation.rounds]
    configs: list[Config] = []
    invalid: list[tuple[Config, str]] = []
    for tr, la, ar, at in itertools.product(
        axes.transport, axes.launcher, axes.at_rest, axes.attestation
    ):
        configs.append(Config(tr, la, ar, at))
    cells: list[Cell] = []
    checked: dict[Config, str | None] = {}
    blocks = [
        (rep, rounds, ds, model)
        for rep in range(1, axes.repeats + 1)
        for rounds in rounds_list
        for ds in datasets
        for model in models
    ]
    per_repeat = len(blocks) // axes.repeats
    for i, (rep, rounds, ds, model) in enumerate(blocks):
        block_cells = []
        for cfg in configs:
            over = cell_overrides(study, model, ds, cfg, rounds)
            cell = Cell(model, ds, cfg, rounds, rep, overrides=over)
            cell.name = _cell_name(study, model, ds, cfg, rounds, rep)
            try:
                plan = build_plan(study, cell)
            except TeeflError as exc:
                if checked.get(cfg, "") is None:  # valid elsewhere: this cell's own problem
                    raise TeeflError(f"study {study.name}: cell {cell.name}: {exc}") from None
                problem: str | None = str(exc).split("): ", 1)[-1].removeprefix("(top level): ")
            else:
                problem = _combination_problem(plan)
            if cfg not in checked:
                checked[cfg] = problem
                if problem:
                    invalid.append((cfg, problem))
            if checked[cfg] is None:
                block_cells.append(cell)
        if block_cells:
            k = (rep - 1 + i % per_repeat) % len(block_cells)
            cells += block_cells[k:] + block_cells[:k]
    if not cells:
        raise TeeflError(
            f"study {study.name} has no valid cell: "
            + "; ".join(f"{c.name}: {r}" for c, r in invalid)
        )
    return cells, invalid


# -- what this host can run ---------------------------------------------------------------------


def host_problem(
    study: Study,
    cell: Cell,
    data_dir: Path | None,
    cache: dict[str, str | None],
    *,
    launchers: bool = True,
) -> str | None:
    """Why this host cannot run ``cell`` (None: it can). ``cache`` memoizes per need.

    ``launchers=False`` leaves Gramine and SGX out: where cells run on other machines (Slurm
    nodes), the node that runs a cell says so itself, in one line, when it cannot.
    """

    def memo(key: str, fn: Any) -> str | None:
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    cfg = cell.config
    if cfg.launcher != "native" and launchers:

        def gramine() -> str | None:
            tools = [cfg.launcher, "gramine-manifest"]
            if cfg.launcher == "gramine-sgx":
                tools.append("gramine-sgx-sign")
            missing = [t for t in tools if shutil.which(t) is None]
            if missing:
                return f"{', '.join(missing)} not found on PATH (Gramine is not installed)"
            if cfg.launcher == "gramine-sgx" and not Path("/dev/sgx_enclave").exists():
                return "no SGX device (/dev/sgx_enclave) on this host"
            return None

        problem = memo(f"launcher:{cfg.launcher}", gramine)
        if problem:
            return problem
    if cfg.attestation == "required":

        def attestation() -> str | None:
            att = study.base_plan_obj().security.attestation
            if att.provider == "simulated" and att.allow_simulated:
                return None
            return "attestation provider not available on this host"

        problem = memo("attestation", attestation)
        if problem:
            return problem
    if cell.dataset != "synthetic":
        root = study.base_plan_obj().dataset.root
        return memo(
            f"dataset:{cell.dataset}", lambda: dataset_problem(cell.dataset, root, data_dir)
        )
    return None


def dataset_problem(name: str, root: Path | None, data_dir: Path | None) -> str | None:
    """None when the dataset's files are on disk, else a short reason."""
    from teefl.workload import datasets as ds

    candidates = ds.resolve_root(name, root, data_dir)
    found, _notes = ds.locate_files(name, candidates)
    if found:
        return None
    return f"dataset {name} not found (searched {', '.join(str(c) for c in candidates)})"


def plan_cells(
    study: Study, data_dir: Path | None = None, *, launchers: bool = True
) -> tuple[list[Cell], list[tuple[Config, str]]]:
    """Expand the study and decide, per cell, whether this host can run it.

    A missing dataset becomes the plan's synthetic dataset when the study says
    ``dataset_fallback: synthetic`` (announced in the cell's notes); otherwise the cell is
    skipped with the reason. ``launchers``: see `host_problem`.
    """
    cells, invalid = expand(study)
    cache: dict[str, str | None] = {}
    out: list[Cell] = []
    renamed: set[str] = set()
    for cell in cells:
        problem = host_problem(study, cell, data_dir, cache, launchers=launchers)
        if (
            problem
            and problem.startswith("dataset ")
            and study.dataset_fallback == "synthetic"
            and cell.dataset != "synthetic"
        ):
            note = (
                f"{problem}: using the SYNTHETIC dataset instead (seeded, learnable) -- its "
                "accuracy says nothing about real data"
            )
            old = cell.dataset
            cell.dataset = "synthetic"
            cell.overrides["dataset"]["name"] = "synthetic"
            cell.name = _cell_name(
                study, cell.model, "synthetic", cell.config, cell.rounds, cell.repeat
            )
            cell.notes.append(note)
            renamed.add(old)
            problem = host_problem(study, cell, data_dir, cache, launchers=launchers)
        cell.skip = problem
        out.append(cell)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise TeeflError(
            f"study {study.name}: the synthetic fallback for {', '.join(sorted(renamed))} makes "
            "cells collide with the synthetic dataset's; drop one of them from axes.datasets"
        )
    return out, invalid
