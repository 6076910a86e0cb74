"""CLI command ``teefl bench``: run a study (the paper's experiment matrix) end to end.

Why one command: the study is teefl's main job -- a user should be able to start it, come back to
a finished report, resume after an interruption and merge hosts' results, without scripting the
matrix around ``teefl run``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from teefl.errors import TeeflError


def _study_data(study_path: Path | None) -> tuple[dict[str, Any], str, Path | None]:
    import yaml

    from teefl.bench.study import default_study_text

    if study_path is None:
        return yaml.safe_load(default_study_text()) or {}, "(embedded default study)", None
    from teefl.plan import read_yaml

    data = read_yaml(study_path, "study")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TeeflError(f"invalid study {study_path}: the top level must be a mapping of keys")
    return data, str(study_path), study_path.resolve().parent


def _write(path: Path, text: str, force: bool) -> None:
    if path.exists() and not force:
        raise TeeflError(f"{path} exists; pass --force to overwrite it")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise TeeflError(f"cannot write {path}: {exc.strerror}") from None


def bench(
    study_path: Annotated[
        Path | None,
        typer.Argument(help="Study YAML; omit for the embedded default (a ~10 min study)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory (default: bench-<study name>)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail instead of skipping cells this host cannot run.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Continue OUT with a changed study; overwrite --write-study."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the cells in run order and exit.")
    ] = False,
    data_dir: Annotated[Path | None, typer.Option(help="Where datasets are read from.")] = None,
    network: Annotated[
        str | None, typer.Option(help="loopback | netns (each party in its own namespace).")
    ] = None,
    bandwidth: Annotated[
        str | None, typer.Option(help="netns: cap on every party's link, e.g. 1gbit, 100mbit.")
    ] = None,
    repeats: Annotated[int | None, typer.Option(help="Override axes.repeats.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Override axes.rounds.")] = None,
    host_label: Annotated[
        str | None, typer.Option(help="Name of this host's results (prefixes cell names).")
    ] = None,
    tee_label: Annotated[
        str | None, typer.Option(help="State this host's TEE (recorded as stated), e.g. tdx.")
    ] = None,
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Do not run teefl report / fit at the end.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    paper: Annotated[
        bool,
        typer.Option(
            "--paper", help="Write the paper-scale study file (see --write-study) and exit."
        ),
    ] = False,
    write_study: Annotated[
        Path | None,
        typer.Option(
            help="Write the default (or with --paper the paper) study to this file and exit."
        ),
    ] = None,
    cleanup_netns: Annotated[
        bool,
        typer.Option(
            "--cleanup-netns", help="Remove network namespaces left by a killed teefl bench."
        ),
    ] = False,
    executor: Annotated[
        str | None,
        typer.Option(
            help="local | netns | slurm: where the cells run (slurm: one job per cell, "
            "see docs/hpc.md)."
        ),
    ] = None,
    partition: Annotated[str | None, typer.Option(help="slurm: the partition.")] = None,
    account: Annotated[str | None, typer.Option(help="slurm: the account to charge.")] = None,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="slurm: time limit per cell, e.g. 01:00:00.")
    ] = None,
    gres: Annotated[str | None, typer.Option(help="slurm: generic resources, e.g. gpu:1.")] = None,
    sbatch_option: Annotated[
        list[str] | None,
        typer.Option(
            "--sbatch-option", help="slurm: a further sbatch option, e.g. --qos=short (repeat)."
        ),
    ] = None,
    parallel: Annotated[
        int | None, typer.Option(help="slurm: cells at a time (default 1: undisturbed timings).")
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach", help="slurm: submit and return; run the same command later to follow."
        ),
    ] = False,
) -> None:
    """Run a study: every model x dataset x security configuration x repeat as a real federation.

    Finished cells in OUT are kept on a rerun; at the end teefl report and teefl fit run on OUT.
    """
    from rich.console import Console

    console = Console()
    if cleanup_netns:
        from teefl.bench.netns import cleanup_leftovers, require_netns

        require_netns()
        removed, kept = cleanup_leftovers()
        console.print(
            f"removed {len(removed)} leftover namespace(s)"
            + (f": {', '.join(removed)}" if removed else "")
            + (f"; kept {len(kept)} of running teefl processes" if kept else ""),
            highlight=False,
        )
        return
    if paper or write_study is not None:
        from teefl.bench.study import default_study_text, paper_study_text

        target = write_study or Path("paper-study.yaml" if paper else "study.yaml")
        _write(target, paper_study_text() if paper else default_study_text(), force)
        console.print(
            f"wrote {target}; run it with: teefl bench {target} --out bench-"
            + ("paper" if paper else "study"),
            highlight=False,
        )
        return

    from teefl.bench.runner import run_study
    from teefl.bench.study import study_from_dict

    data, source, base_dir = _study_data(study_path)
    axes = data.setdefault("axes", {}) if isinstance(data.get("axes", {}), dict) else None
    net = data.setdefault("network", {}) if isinstance(data.get("network", {}), dict) else None
    if axes is None or net is None:
        raise TeeflError(f"invalid study {source}: axes and network must be mappings")
    if repeats is not None:
        axes["repeats"] = repeats
    if rounds is not None:
        axes["rounds"] = rounds
    if network is not None:
        net["mode"] = network
    if bandwidth is not None:
        net["bandwidth"] = bandwidth
        if network is None:  # a cap only exists between namespaces
            net["mode"] = "netns"
    _apply_executor(
        data,
        source,
        executor,
        {
            "partition": partition,
            "account": account,
            "time": time_limit,
            "gres": gres,
            "parallel": parallel,
        },
        sbatch_option,
    )
    if executor == "netns":
        net["mode"] = "netns"
    if host_label is not None:
        data["host_label"] = host_label
    if tee_label is not None:
        data["tee_label"] = tee_label
    study = study_from_dict(data, source, base_dir)
    if study.network.bandwidth and study.network.mode != "netns":
        raise TeeflError("a bandwidth cap needs network mode netns (--network netns)")
    target = out or Path(f"bench-{study.name}")
    from teefl.bench.runner import make_executor

    executor = make_executor(study, detach=detach)
    if not dry_run:
        from teefl.writable import writable_dir

        executor.check()  # no Slurm on PATH, no such partition: said before anything is written
        writable_dir(target, "study output directory", "--out")
    # sys.exit, not typer.Exit: with standalone_mode=False Typer turns Ctrl-C and Exit into a
    # return value that teefl's main() does not pass on, and scripts need these exit codes
    try:
        result = run_study(
            study,
            target,
            data_dir=data_dir,
            strict=strict,
            force=force,
            dry_run=dry_run,
            report=not no_report,
            progress=not no_progress,
            console=console,
            executor=executor,
        )
    except KeyboardInterrupt:
        sys.exit(130)
    if result.count("failed"):
        sys.exit(1)


def _apply_executor(
    data: dict[str, Any],
    source: str,
    kind: str | None,
    slurm: dict[str, Any],
    sbatch_options: list[str] | None,
) -> None:
    """Put ``--executor`` and the Slurm options into the study mapping (validated with it)."""
    if kind is not None and kind not in ("local", "netns", "slurm"):
        raise TeeflError(f"--executor must be local, netns or slurm (got {kind!r})")
    ex = data.setdefault("executor", {})
    if not isinstance(ex, dict):
        raise TeeflError(f"invalid study {source}: executor must be a mapping")
    if kind is not None:
        ex["kind"] = "slurm" if kind == "slurm" else "local"
    given = {k: v for k, v in slurm.items() if v is not None}
    if sbatch_options:
        given["options"] = list(sbatch_options)
    if not given:
        return
    if ex.get("kind", "local") != "slurm":
        names = ", ".join(
            "--" + ("sbatch-option" if k == "options" else k.replace("_", "-")) for k in given
        )
        raise TeeflError(f"{names} apply(ies) to Slurm: add --executor slurm")
    sl = ex.setdefault("slurm", {})
    if not isinstance(sl, dict):
        raise TeeflError(f"invalid study {source}: executor.slurm must be a mapping")
    if "options" in given:
        given["options"] = list(sl.get("options") or []) + given["options"]
    sl.update(given)


def bench_cell(
    out: Annotated[Path, typer.Argument(help="The study folder (holds study.yaml).")],
    cell: Annotated[str, typer.Argument(help="The cell's name (its directory in OUT).")],
    data_dir: Annotated[Path | None, typer.Option(help="Where datasets are read from.")] = None,
    status_file: Annotated[
        Path | None, typer.Option(help="Write the exit code and error here at the end.")
    ] = None,
) -> None:
    """Run one cell of a study folder (what each Slurm job of ``teefl bench`` runs)."""
    from teefl.bench.slurm_job import run_cell_job

    sys.exit(run_cell_job(out, cell, data_dir=data_dir, status_file=status_file))


def register(app: typer.Typer) -> None:
    """Add ``teefl bench`` (and the hidden ``teefl bench-cell`` of its Slurm jobs) to the app."""
    app.command("bench")(bench)
    app.command("bench-cell", hidden=True)(bench_cell)
