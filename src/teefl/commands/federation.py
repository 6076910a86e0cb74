"""CLI commands that run a federation: ``run`` (all parties on this host), ``aggregator`` and
``collaborator`` (one party each, for real multi-host deployments)."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from teefl.errors import TeeflError
from teefl.writable import writable_dir

PlanArg = Annotated[Path | None, typer.Argument(help="Plan YAML; omit for the embedded default.")]


def _load(plan_path: Path | None, overrides: dict[str, Any] | None = None):
    """Load the plan (or the embedded default) with the command line's ``overrides`` (see
    `overrides`), validated as a whole before anything else looks at it."""
    from teefl.plan import default_plan, load_plan
    from teefl.resolved import with_overrides

    plan = default_plan() if plan_path is None else load_plan(plan_path)
    return with_overrides(plan, overrides or {})


def overrides(
    *,
    transport: str | None = None,
    launcher: str | None = None,
    tee_label: str | None = None,
    rounds: int | None = None,
    collaborators: int | None = None,
) -> dict[str, Any]:
    """The plan keys the run options override (None: not given), their choices checked with
    the option's name (the plan's validation names the key)."""
    if transport is not None and transport not in ("none", "tls", "mtls"):
        raise TeeflError(f"--transport must be none, tls or mtls (got {transport!r})")
    if launcher is not None and launcher not in ("native", "gramine-direct", "gramine-sgx"):
        raise TeeflError(
            f"--launcher must be native, gramine-direct or gramine-sgx (got {launcher!r})"
        )
    given = {
        "security.transport": transport,
        "runtime.launcher": launcher,
        "runtime.tee_label": tee_label,
        "federation.rounds": rounds,
        "collaborators": collaborators,
    }
    return {k: v for k, v in given.items() if v is not None}


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _sigterm_as_interrupt() -> None:
    """SIGTERM (from the launcher or a scheduler) and SIGHUP (a closed ssh session) take the same
    clean path as Ctrl-C; a SIGHUP ignored at start (``nohup``) stays ignored."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


def run(
    plan_path: PlanArg = None,
    rounds: Annotated[int | None, typer.Option(help="Override federation.rounds.")] = None,
    collaborators: Annotated[
        int | None, typer.Option(help="Override the number of collaborators.")
    ] = None,
    transport: Annotated[str | None, typer.Option(help="none | tls | mtls")] = None,
    launcher: Annotated[
        str | None, typer.Option(help="native | gramine-direct | gramine-sgx")
    ] = None,
    tee_label: Annotated[
        str | None, typer.Option(help="State the TEE of this host (recorded as stated).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where datasets are read from.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Parent of run directories.")] = Path("runs"),
    run_id: Annotated[str | None, typer.Option(help="Run id (default: time-name-random).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Run a whole federation on this host: 1 aggregator + N collaborator processes."""
    from teefl.federation.stopsignals import install_stop_handlers

    install_stop_handlers()  # first: a SIGTERM from here on stops every process we start
    from rich.console import Console

    from teefl.federation.launcher import launch, new_run_id
    from teefl.federation.report import finish_run, print_summary
    from teefl.plan import require_transport
    from teefl.resolved import resolve, transport_of
    from teefl.rundir import RUN_LOCK, RunDir

    console = Console()
    plan = _load(
        plan_path,
        overrides(
            transport=transport,
            launcher=launcher,
            tee_label=tee_label,
            rounds=rounds,
            collaborators=collaborators,
        ),
    )
    rid = run_id or new_run_id(plan.name)
    # plan mistakes are said before anything is created on disk
    throwaway_pki = transport_of(plan) != "none" and plan.security.tls.ca is None
    if not throwaway_pki:
        require_transport(plan)
    from teefl.strategy.registry import check_plan_strategy

    check_plan_strategy(plan.federation.strategy)
    if plan.dataset.root is not None:
        from teefl.workload.datasets import check_root

        check_root(plan.dataset)
    writable_dir(runs_dir, "runs directory", "--runs-dir")
    run_dir = writable_dir((runs_dir / rid).resolve(), "run directory")
    # held until this process ends: a second `teefl run` on this run id stops here, naming us
    RunDir(run_dir).acquire(RUN_LOCK, "teefl run")
    if throwaway_pki:
        from teefl.federation.setup import issue_throwaway_pki

        issue_throwaway_pki(plan, run_dir, console)
    require_transport(plan)
    if plan.security.attestation.enabled:  # an unpinned policy: one line now, not at each party
        from teefl.security.attest import check_policies

        check_policies(plan.security.attestation)
    plan = _announce_dataset(plan, data_dir, console)
    _check_workload(plan)  # a bad reference or options: one line before any process starts
    resolved = resolve(plan, "launcher", run_dir)
    console.print(
        f"teefl run [bold]{rid}[/bold]: {len(plan.collaborators)} collaborators, "
        f"{plan.federation.rounds} rounds, {_what(plan)}, "
        f"transport {resolved.transport}\n  run directory: {run_dir}"
    )
    att = plan.security.attestation
    if att.enabled and (att.provider == "simulated" or att.allow_simulated):
        console.print(
            "[bold red]WARNING: SIMULATED ATTESTATION allowed -- evidence may be signed by a "
            "software key; it proves nothing about the platform. For tests and demos only."
            "[/bold red]"
        )
    if not resolved.encrypted:
        console.print(
            "[yellow]warning: transport none -- model updates travel unencrypted and "
            "unauthenticated[/yellow]"
        )
    result = launch(
        plan, run_dir, rid, data_dir=data_dir, console=console, progress=not no_progress
    )
    summary = finish_run(result.run_dir)
    print_summary(summary, console, result.run_dir)


def _what(plan) -> str:
    """What is trained, in a few words."""
    if plan.workload.is_vision:
        return f"{plan.model.name} on {plan.dataset.name}"
    return f"workload {plan.workload.name}"


def _check_workload(plan) -> None:
    """Resolve the plan's workload once here -- import it, validate its options, build its
    model -- so a mistake is one line from this command, not a traceback from every process."""
    from teefl.workload.resolve import plan_workload

    plan_workload(plan, check_build=True)


def _announce_dataset(plan, data_dir: Path | None, console):
    """The plan to run: the default plan falls back to synthetic data -- loudly -- when its
    dataset is missing."""
    if plan.dataset.name == "synthetic" or not plan.workload.is_vision:
        return plan
    from teefl.workload.datasets import check_root, load_dataset

    check_root(plan.dataset)  # a root the plan names is never replaced by synthetic data
    try:
        load_dataset(plan.dataset, data_dir, seed=plan.seed)
    except TeeflError as exc:
        if plan.name != "default":
            raise
        console.print(
            f"[yellow]{exc}\nThe default plan falls back to a SYNTHETIC dataset "
            "(seeded, learnable) -- its accuracy says nothing about real data."
            "[/yellow]"
        )
        from teefl.resolved import with_overrides

        return with_overrides(plan, {"dataset.name": "synthetic"}, "synthetic fallback")
    return plan


def aggregator(
    plan_path: Annotated[Path, typer.Option("--plan", help="Plan YAML.")],
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default runs/<id>).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Run id.")] = None,
    listen: Annotated[
        str | None, typer.Option(help="Listen address (default network.listen or network.host).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default network.port).")] = None,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here.")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Run the aggregator of a federation (one party; collaborators join it over the network)."""
    t_start = time.monotonic()
    restarts = None
    if run_dir is not None:  # first thing: a restart killed during its start-up is counted too
        from teefl.rundir import RunDir

        writable_dir(run_dir.resolve(), "run directory", "--run-dir")  # one line, no traceback
        restarts = RunDir(run_dir).count_start()
    _logging(log_level)
    _sigterm_as_interrupt()
    from teefl.measure.host import tune_malloc

    tune_malloc()
    from teefl.federation.launcher import new_run_id
    from teefl.measure.events import EventRecorder
    from teefl.measure.host import environment, tee_record, write_environment
    from teefl.plan import require_transport
    from teefl.rundir import AGGREGATOR, AGGREGATOR_LOCK, RunDir, security_config
    from teefl.runfiles import write_private

    plan = _load(plan_path)
    require_transport(plan)
    from teefl.strategy.registry import check_plan_strategy

    check_plan_strategy(plan.federation.strategy)
    previous = RunDir(run_dir).read() if run_dir is not None else {}
    if previous.get("status") == "completed":
        raise TeeflError(f"run {run_dir} is already completed; start a new run directory")
    rid = run_id or previous.get("run_id") or new_run_id(plan.name)
    rdir = writable_dir((run_dir or Path("runs") / rid).resolve(), "run directory", "--run-dir")
    # held until this process ends: a second aggregator on this run directory stops here
    rd = RunDir(rdir)
    rd.acquire(AGGREGATOR_LOCK, "teefl aggregator")
    from teefl.server.aggregator import Aggregator  # torch: after the quick checks

    if restarts is None:
        restarts = rd.count_start()
    if not rd.plan.exists():
        write_private(rd.plan, plan.to_yaml())
    # a restarted aggregator continues the same run: T still counts from the first start
    anchor = rd.first_anchor(AGGREGATOR)
    if anchor is not None:
        t_start = anchor
    rec = EventRecorder(rdir, rid, AGGREGATOR, "aggregator")
    tee = tee_record(plan.runtime.tee_label)
    write_environment(rdir, AGGREGATOR, environment("aggregator", {"run": rid, "tee": tee}))
    agg = Aggregator(plan, rdir, rid, rec)
    if agg.resumed_from is not None:
        rec.info("resumed", completed_round=agg.resumed_from, round=agg.round)
    rd.update(
        run_id=rid,
        name=plan.name,
        status="starting",
        started_wall=previous.get("started_wall", time.time()),
        restarts=restarts,
        rounds=plan.federation.rounds,
        rounds_completed=agg.resumed_from or 0,
        model=plan.model.name,
        dataset=plan.dataset.name,
        collaborators=plan.collaborators,
        config=security_config(plan, tee),
        model_info=agg.model_info,
    )
    status = "failed"
    try:
        agg.serve(
            listen or plan.network.listen or plan.network.host,
            plan.network.port if port is None else port,
            port_file,
            t_start,
        )
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except TeeflError as exc:
        rd.update(error=str(exc))
        raise
    finally:
        done = agg.round - 1 if not agg.done else plan.federation.rounds
        rd.update(
            status=status,
            finished_wall=time.time(),
            rounds_completed=min(done, plan.federation.rounds),
        )
        rec.close()


def collaborator(
    plan_path: Annotated[Path, typer.Option("--plan", help="Plan YAML.")],
    name: Annotated[str, typer.Option(help="This collaborator's name (as listed in the plan).")],
    address: Annotated[
        str | None,
        typer.Option(help="Aggregator host:port (default from the plan's network section)."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Where this party writes its events.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="This party's own data, loaded whole by the workload (default: the plan's "
            "workload.data_root/NAME, else the workload's shared dataset)."
        ),
    ] = None,
    data_mode: Annotated[
        str,
        typer.Option(
            help="local: --data-dir is this party's own data; shard: it holds a shared "
            "dataset this party takes its shard of (teefl run's simulation); auto: local "
            "when --data-dir is given.",
        ),
    ] = "auto",
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Run one collaborator: join the aggregator and take part in every round."""
    _logging(log_level)
    _sigterm_as_interrupt()
    from teefl.plan import require_transport

    if data_mode not in ("auto", "local", "shard"):
        raise TeeflError(f"--data-mode must be auto, local or shard (got {data_mode!r})")
    if data_mode == "local" and data_dir is None:
        raise TeeflError("--data-mode local needs --data-dir (this party's own data)")
    if data_dir is not None and not data_dir.is_dir():
        raise TeeflError(f"--data-dir {data_dir}: no such directory")
    plan = _load(plan_path)
    require_transport(plan)
    addr = address or plan.address()
    if addr.endswith(":0"):
        raise TeeflError(
            "the plan's network.port is 0 (pick-a-free-port); pass --address HOST:PORT"
        )
    rdir = writable_dir(
        (run_dir or Path("runs") / f"{plan.name}-{name}").resolve(), "run directory", "--run-dir"
    )
    from teefl.client.collaborator import Collaborator  # torch: after the quick checks

    Collaborator(plan, name, addr, rdir, data_dir, data_mode=data_mode).run()


def register(app: typer.Typer) -> None:
    """Add the federation commands to the teefl app."""
    app.command("run")(run)
    app.command("aggregator")(aggregator)
    app.command("collaborator")(collaborator)
