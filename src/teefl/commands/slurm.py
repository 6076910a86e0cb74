"""CLI commands ``teefl slurm federation`` (a federation as one Slurm job) and the hidden
``teefl slurm launch`` that the job's batch script runs. Studies go to Slurm through
``teefl bench --executor slurm``.

Why a command of its own (not ``teefl run --slurm``): ``teefl run`` is a process tree on this
host that it watches to the end; on a cluster the work belongs to the scheduler, the command that
submits it may be on a login node that forbids long processes, and the parties start where Slurm
puts them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from teefl.errors import TeeflError

slurm_app = typer.Typer(
    name="slurm",
    help="Run on a Slurm cluster: a federation as one job (studies: teefl bench --executor slurm).",
    no_args_is_help=True,
)


@slurm_app.command("federation")
def federation(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan YAML.")],
    transport: Annotated[str | None, typer.Option(help="none | tls | mtls")] = None,
    launcher: Annotated[
        str | None, typer.Option(help="native | gramine-direct | gramine-sgx (on every node).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Override federation.rounds.")] = None,
    tee_label: Annotated[
        str | None, typer.Option(help="State the nodes' TEE (recorded as stated), e.g. tdx.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the nodes read datasets (a shared path).")
    ] = None,
    runs_dir: Annotated[
        Path, typer.Option(help="Parent of run directories (on a filesystem the nodes share).")
    ] = Path("runs"),
    run_id: Annotated[str | None, typer.Option(help="Run id (default: time-name-random).")] = None,
    nodes: Annotated[
        int | None, typer.Option(help="Nodes of the job (N+1: every party on a node of its own).")
    ] = None,
    cpus_per_task: Annotated[
        int | None, typer.Option(help="CPUs per party (default: the plan's training.threads).")
    ] = None,
    aggregator_node: Annotated[
        str | None,
        typer.Option(help="The aggregator's node (default: network.host when it is a node)."),
    ] = None,
    aggregator_host: Annotated[
        str, typer.Option(help="What collaborators dial, from the node's name, e.g. {node}-ib.")
    ] = "{node}",
    partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account to charge.")] = None,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="Time limit of the federation, e.g. 02:00:00.")
    ] = None,
    gres: Annotated[
        str | None, typer.Option(help="Generic resources per node, e.g. gpu:1.")
    ] = None,
    overcommit: Annotated[
        bool,
        typer.Option(
            "--overcommit", help="More parties than CPUs (a small test cluster): share the CPUs."
        ),
    ] = False,
    sbatch_option: Annotated[
        list[str] | None,
        typer.Option("--sbatch-option", help="A further sbatch option, e.g. --qos=short (repeat)."),
    ] = None,
    srun_option: Annotated[
        list[str] | None,
        typer.Option("--srun-option", help="A further option of every party's srun (repeat)."),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Submit and return (follow with squeue).")
    ] = False,
    poll: Annotated[float, typer.Option(help="Seconds between two looks at the queue.")] = 2.0,
) -> None:
    """Submit a federation as one Slurm job: the aggregator and every collaborator a task.

    The run directory (RUNS_DIR/<run-id>) fills as on one host; without --detach this command
    follows the job and prints the run's summary at the end.
    """
    from rich.console import Console

    from teefl.commands.federation import overrides
    from teefl.federation.launcher import new_run_id
    from teefl.federation.report import print_summary
    from teefl.plan import load_plan, require_transport
    from teefl.resolved import resolve, with_overrides
    from teefl.slurm import client
    from teefl.slurm import federation as fed

    console = Console(highlight=False)
    client.require("sbatch", "squeue", "scontrol")
    plan = with_overrides(
        load_plan(plan_path),
        overrides(transport=transport, launcher=launcher, rounds=rounds, tee_label=tee_label),
    )
    require_transport(plan)
    resolved = resolve(plan, "launcher")
    spec = fed.JobSpec(
        cpus_per_task=cpus_per_task or plan.training.threads or 1,
        nodes=nodes,
        partition=partition,
        account=account,
        time=time_limit,
        gres=gres,
        overcommit=overcommit,
        sbatch_options=list(sbatch_option or []),
        srun_options=list(srun_option or []),
        aggregator_node=aggregator_node,
        aggregator_host=aggregator_host,
    )
    fed.check_spec(spec)
    client.check_partitions([partition])
    spec.aggregator_node = fed.pinned_node(plan, spec)
    if spec.aggregator_node is not None:
        fed.check_certificate(plan, fed.aggregator_host(aggregator_host, spec.aggregator_node))
    elif resolved.encrypted:
        console.print(
            "[yellow]the aggregator's node is chosen by Slurm: its certificate must name every "
            "node it may get (or pass --aggregator-node / set network.host to a node)[/yellow]"
        )
    rid = run_id or new_run_id(plan.name)
    run_dir = (runs_dir / rid).resolve()
    if run_dir.exists():
        raise TeeflError(f"run directory {run_dir} exists; choose another --run-id")
    job, script = fed.submit(plan, run_dir, spec, data_dir)
    n = len(plan.collaborators)
    console.print(
        f"teefl slurm federation [bold]{rid}[/bold]: aggregator + {n} collaborators as Slurm job "
        f"{job} ({n + 1} tasks"
        + (f" on {nodes} nodes" if nodes else "")
        + f"), {plan.federation.rounds} rounds, transport {resolved.transport}"
        + (f", launcher {plan.runtime.launcher}" if plan.runtime.launcher != "native" else "")
        + f"\n  run directory: {run_dir}\n  batch script:  {script}"
    )
    if not resolved.encrypted:
        console.print(
            "[yellow]warning: transport none -- model updates cross the cluster network "
            "unencrypted and unauthenticated[/yellow]"
        )
    if detach:
        console.print(
            f"submitted; follow it with: squeue -j {job}  (summary: {run_dir}/summary.json)"
        )
        return
    try:
        summary = fed.follow(job, run_dir, plan, console, poll=poll)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]stopped following; job {job} goes on (scancel {job} stops it)[/yellow]"
        )
        sys.exit(130)
    print_summary(summary, console, run_dir)


@slurm_app.command("launch", hidden=True)
def launch(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (holds plan.yaml).")],
    cpus_per_task: Annotated[int, typer.Option(help="CPUs of every party's step.")] = 1,
    overlap: Annotated[
        bool, typer.Option("--overlap", help="Steps share CPUs (a job with --overcommit).")
    ] = False,
    aggregator_node: Annotated[str | None, typer.Option(help="The aggregator's node.")] = None,
    aggregator_host: Annotated[str, typer.Option(help="Host template, {node}.")] = "{node}",
    data_dir: Annotated[Path | None, typer.Option(help="Where datasets are read from.")] = None,
    srun_option: Annotated[
        list[str] | None, typer.Option("--srun-option", help="A further srun option (repeat).")
    ] = None,
) -> None:
    """Inside the job: start every party as a job step and write the run directory."""
    import signal

    from teefl.slurm.federation import launch_in_allocation

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # scancel / time limit: the launcher's clean-up runs

    signal.signal(signal.SIGTERM, interrupt)
    launch_in_allocation(
        run_dir,
        cpus_per_task=cpus_per_task,
        overlap=overlap,
        aggregator_node=aggregator_node,
        host_template=aggregator_host,
        srun_options=list(srun_option or []),
        data_dir=data_dir,
    )


def register(app: typer.Typer) -> None:
    """Add ``teefl slurm`` to the teefl app."""
    app.add_typer(slurm_app, name="slurm")
