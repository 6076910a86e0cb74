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
    if host_label is not None:
        data["host_label"] = host_label
    if tee_label is not None:
        data["tee_label"] = tee_label
    study = study_from_dict(data, source, base_dir)
    if study.network.bandwidth and study.network.mode != "netns":
        raise TeeflError("a bandwidth cap needs network mode netns (--network netns)")
    target = out or Path(f"bench-{study.name}")
    if not dry_run:
        from teefl.writable import writable_dir

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
        )
    except KeyboardInterrupt:
        sys.exit(130)
    if result.count("failed"):
        sys.exit(1)


def register(app: typer.Typer) -> None:
    """Add ``teefl bench`` to the teefl app."""
    app.command("bench")(bench)
