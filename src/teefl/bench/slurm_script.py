"""What ``teefl bench --executor slurm`` submits: each cell's resources (the study's, with the
matching ``executor.slurm.cells`` entries applied) as ``#SBATCH`` options, and the batch script
that runs ``teefl bench-cell`` for one cell or a job array of cells.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from teefl.bench.matrix import Cell
from teefl.bench.study import Study
from teefl.bench.study_slurm import CellResources, SlurmResources, SlurmSpec
from teefl.errors import TeeflError

# -- resources ----------------------------------------------------------------------------------


def _matches(rule: CellResources, cell: Cell) -> bool:
    m = rule.match
    values: dict[str, Any] = {
        "models": cell.model,
        "datasets": cell.dataset,
        "transport": cell.config.transport,
        "launcher": cell.config.launcher,
        "at_rest": cell.config.at_rest,
        "attestation": cell.config.attestation,
        "config": cell.config.name,
        "rounds": cell.rounds,
    }
    return all(getattr(m, key) is None or value in getattr(m, key) for key, value in values.items())


def resources_for(spec: SlurmSpec, cell: Cell) -> SlurmResources:
    """The study's resources with every matching ``cells`` entry applied over them, in order."""
    merged = SlurmResources.model_validate(
        spec.model_dump(include=set(SlurmResources.model_fields))
    )
    for rule in spec.cells:
        if _matches(rule, cell):
            for key in rule.model_fields_set - {"match"}:
                value = getattr(rule, key)
                if key == "options":
                    value = merged.options + value
                setattr(merged, key, value)
    return merged


def sbatch_options(res: SlurmResources) -> list[str]:
    """The ``#SBATCH`` options of a cell's job (beside those teefl sets itself)."""
    opts = ["--nodes=1", "--ntasks=1"]
    for key, flag in (
        ("partition", "--partition"),
        ("account", "--account"),
        ("qos", "--qos"),
        ("time", "--time"),
        ("gres", "--gres"),
        ("constraint", "--constraint"),
        ("cpus_per_task", "--cpus-per-task"),
        ("mem", "--mem"),
    ):
        value = getattr(res, key)
        if value is not None:
            opts.append(f"{flag}={value}")
    if res.exclusive:
        opts.append("--exclusive")
    return opts + list(res.options)


# -- batch scripts ------------------------------------------------------------------------------


def job_name(study: Study) -> str:
    return f"teefl-{study.name}"


def write_script(
    path: Path,
    *,
    study: Study,
    out: Path,
    cells: list[Cell],
    options: list[str],
    parallel: int | None,
    data_dir: Path | None,
) -> Path:
    """A batch script for ``cells``: a job array when ``parallel`` is given, else one job."""
    q = shlex.quote
    array = parallel is not None
    logs = out / "slurm" / "logs"
    for where in (out, Path.cwd()):
        if any(c.isspace() for c in str(where)):
            raise TeeflError(
                f"{where}: a path with spaces cannot be put in #SBATCH lines; use another --out "
                "or working directory"
            )
    head = [
        "#!/bin/bash",
        f"# teefl bench, study {study.name}: {len(cells)} cell(s) as "
        + ("one Slurm job array." if array else "one Slurm job."),
        "# Written, submitted and followed by `teefl bench --executor slurm`. To run it again by",
        f"# hand: sbatch {path}",
        "# (a cell already finished in the study folder is left as it is).",
        "# Each cell is a whole federation (1 aggregator + N collaborator processes) on one node.",
    ]
    if array:
        head.append(
            f"# %{parallel}: at most {parallel} cell(s) at a time; one at a time keeps each cell's "
            "timings free of another cell's load."
        )
    sb = [
        f"--job-name={job_name(study)}",
        *([f"--array=0-{len(cells) - 1}%{parallel}"] if array else []),
        *options,
        f"--output={logs}/%x-" + ("%A_%a.out" if array else "%j.out"),
        f"--chdir={Path.cwd()}",
    ]
    lines = head + [f"#SBATCH {o}" for o in sb] + ["", "export PYTHONUNBUFFERED=1"]
    if os.environ.get("PYTHONPATH"):
        lines.append(f"export PYTHONPATH={q(os.environ['PYTHONPATH'])}  # as the submitter had it")
    if array:
        lines += ["CELLS=(", *[f"  {q(c.name)}" for c in cells], ")"]
        lines += [
            'CELL="${CELLS[$SLURM_ARRAY_TASK_ID]}"',
            'KEY="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        ]
    else:
        lines += [f"CELL={q(cells[0].name)}", 'KEY="$SLURM_JOB_ID"']
    status = out / "slurm" / "exit"
    cmd = [q(sys.executable), "-m", "teefl", "bench-cell", q(str(out)), '"$CELL"']
    cmd += ["--status-file", f'{q(str(status))}/"$KEY".json']
    if data_dir is not None:
        cmd += ["--data-dir", q(str(data_dir.resolve()))]
    lines += [
        "",
        " ".join(cmd),
        "code=$?",
        "# the cell writes its status itself; this line is for a cell that could not even start",
        f'[ -e {q(str(status))}/"$KEY".json ] || printf \'{{"cell": "%s", "code": %d}}\\n\' '
        f'"$CELL" "$code" > {q(str(status))}/"$KEY".json',
        'exit "$code"',
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
