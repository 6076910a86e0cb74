"""``teefl slurm federation PLAN``: a federation whose parties are the tasks of one Slurm job.

The job has N+1 tasks. Inside it, ``teefl slurm launch RUN_DIR`` is teefl's own launcher
(`teefl.federation.launcher.launch`, as ``teefl run`` uses it) with every party started through
``srun`` as a job step of one task on the node Slurm gave that task: task 0 is the aggregator,
task i the plan's i-th collaborator (or the aggregator on the node the plan or
``--aggregator-node`` names). The launcher waits for the aggregator's port, passes
``<aggregator's node>:<port>`` to every collaborator at start, watches every step and writes the run
directory exactly as on one host -- plus ``slurm/`` (the batch script and the job's output).
Under ``--launcher gramine-sgx`` the launcher wraps each party's command in Gramine first, and
``srun`` outside that, so each party's enclave starts on its node.

Why one job with one step per party (not a heterogeneous job): heterogeneous jobs are disabled or
restricted at some sites, and a one-node cluster (ours in the tests) cannot place two components
on one node; steps of one job run everywhere, and the task layout (``--nodes``,
``--ntasks-per-node``) says which parties share a node.

Why the aggregator listens on 0.0.0.0 (unless the plan sets network.listen): collaborators dial
the node's name, which resolves to an address of the cluster network that the plan cannot know
before Slurm picks the node. The aggregator's certificate must name that node (``teefl pki plan``
with network.host set to it, or ``teefl pki issue DIR --aggregator node1,node2,...``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from teefl.errors import TeeflError
from teefl.plan import Plan
from teefl.resolved import transport_of, with_overrides
from teefl.rundir import RunDir
from teefl.slurm import client

#: how long a finished job's run directory may take to show its last files on another node
FILES_GRACE_S = 60.0
UNREACHABLE_LIMIT_S = 600.0


@dataclass
class JobSpec:
    """What the federation's job asks Slurm for, and how its parties are placed."""

    cpus_per_task: int = 1
    nodes: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    gres: str | None = None
    #: more tasks than CPUs (a small test cluster): the job asks --overcommit, steps --overlap
    overcommit: bool = False
    sbatch_options: list[str] = field(default_factory=list)
    srun_options: list[str] = field(default_factory=list)
    #: the node the aggregator must run on (None: the node of task 0)
    aggregator_node: str | None = None
    #: what collaborators dial, from the aggregator's node name: "{node}" or e.g. "{node}-ib"
    aggregator_host: str = "{node}"

    def sbatch(self, n_tasks: int) -> list[str]:
        opts = [f"--ntasks={n_tasks}", f"--cpus-per-task={self.cpus_per_task}"]
        for flag, value in (
            ("--nodes", self.nodes),
            ("--partition", self.partition),
            ("--account", self.account),
            ("--time", self.time),
            ("--gres", self.gres),
            ("--nodelist", self.aggregator_node),
        ):
            if value is not None:
                opts.append(f"{flag}={value}")
        if self.overcommit:
            opts.append("--overcommit")
        return opts + list(self.sbatch_options)


def aggregator_host(template: str, node: str) -> str:
    try:
        host = template.format(node=node)
    except (KeyError, IndexError, ValueError) as exc:
        raise TeeflError(
            f"--aggregator-host {template!r}: only {{node}} may be used in it ({exc})"
        ) from None
    if not host or any(c.isspace() for c in host):
        raise TeeflError(f"--aggregator-host {template!r} gives no host name for node {node}")
    return host


def _check_options(options: list[str], what: str, own: tuple[str, ...]) -> None:
    for opt in options:
        if not opt.startswith("-"):
            raise TeeflError(f"{what} {opt!r} is not an option (e.g. --qos=short)")
        if opt.split("=", 1)[0] in own:
            raise TeeflError(f"{what} {opt.split('=', 1)[0]} is set by teefl itself")


def check_spec(spec: JobSpec) -> None:
    """One clear line for what would make the job or its steps wrong."""
    _check_options(
        spec.sbatch_options,
        "--sbatch-option",
        ("--ntasks", "--output", "--error", "--chdir", "--parsable", "--wrap", "--array"),
    )
    _check_options(
        spec.srun_options,
        "--srun-option",
        ("--ntasks", "--nodes", "--nodelist", "--relative", "--output", "--error", "--overlap"),
    )
    aggregator_host(spec.aggregator_host, "node")
    if spec.cpus_per_task < 1:
        raise TeeflError("--cpus-per-task must be at least 1")
    if spec.nodes is not None and spec.nodes < 1:
        raise TeeflError("--nodes must be at least 1")


def pinned_node(plan: Plan, spec: JobSpec) -> str | None:
    """The aggregator's node when the command or the plan names one (network.host a node)."""
    from teefl.security.plan_pki import is_loopback

    if spec.aggregator_node:
        if not client.node_exists(spec.aggregator_node):
            raise TeeflError(f"--aggregator-node {spec.aggregator_node}: no such Slurm node")
        return spec.aggregator_node
    host = plan.network.host
    if not is_loopback(host) and client.node_exists(host):
        return host
    return None


def check_certificate(plan: Plan, host: str) -> None:
    """The aggregator's certificate must name the host collaborators dial."""
    if transport_of(plan) == "none" or plan.security.tls.server_cert is None:
        return
    from teefl.security import certificates

    path = plan.security.tls.server_cert
    cert = certificates.load_certificate(path)
    if not certificates.covers_host(cert, host):
        names = ", ".join(certificates.describe_certificate(path)["sans"]) or "none"
        raise TeeflError(
            f"the aggregator's certificate {path} does not name {host!r}, the host collaborators "
            f"will dial (its names: {names}); set network.host: {host} and run `teefl pki plan "
            f"PLAN --force`, or `teefl pki issue DIR --aggregator {host} --force`"
        )


def write_script(
    path: Path, plan: Plan, run_dir: Path, spec: JobSpec, data_dir: Path | None
) -> Path:
    q = shlex.quote
    n = len(plan.collaborators)
    lines = [
        "#!/bin/bash",
        f"# teefl federation {plan.name}, run {run_dir.name}: one Slurm job of {n + 1} tasks,",
        "# written and submitted by `teefl slurm federation`. Inside the job, `teefl slurm launch`",
        "# starts the aggregator (task 0) and each collaborator (task i, the plan's order) as a",
        "# job step on its task's node, passes the aggregator's address to the collaborators at",
        "# start and writes the run directory as `teefl run` does. A run directory holds one run:",
        "# to run the federation again, use `teefl slurm federation` again.",
    ]
    sb = [
        f"--job-name=teefl-{plan.name}",
        *spec.sbatch(n + 1),
        f"--output={run_dir / 'slurm'}/job-%j.out",
        f"--chdir={Path.cwd()}",
    ]
    lines += [f"#SBATCH {o}" for o in sb]
    lines += ["", "export PYTHONUNBUFFERED=1"]
    if os.environ.get("PYTHONPATH"):
        lines.append(f"export PYTHONPATH={q(os.environ['PYTHONPATH'])}  # as the submitter had it")
    cmd = [q(sys.executable), "-m", "teefl", "slurm", "launch", q(str(run_dir))]
    cmd += ["--cpus-per-task", str(spec.cpus_per_task)]
    if spec.overcommit:
        cmd.append("--overlap")
    if spec.aggregator_node:
        cmd += ["--aggregator-node", q(spec.aggregator_node)]
    cmd += ["--aggregator-host", q(spec.aggregator_host)]
    if data_dir is not None:
        cmd += ["--data-dir", q(str(data_dir.resolve()))]
    for opt in spec.srun_options:
        cmd.append(f"--srun-option={q(opt)}")
    lines += ["exec " + " ".join(cmd), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def submit(plan: Plan, run_dir: Path, spec: JobSpec, data_dir: Path | None) -> tuple[str, Path]:
    """Write the run directory's plan and batch script and submit it; returns (job id, script)."""
    for where in (run_dir, Path.cwd()):
        if any(c.isspace() for c in str(where)):
            raise TeeflError(
                f"{where}: a path with spaces cannot be put in #SBATCH lines; use another "
                "--runs-dir or working directory"
            )
    run_dir.mkdir(parents=True)
    rd = RunDir(run_dir)
    rd.plan.write_text(plan.to_yaml(), encoding="utf-8")
    script = write_script(rd.slurm_dir / "federation.sbatch", plan, run_dir, spec, data_dir)
    job = client.submit(script)
    (rd.slurm_dir / "job.json").write_text(
        json.dumps({"job": job, "script": script.name, "submitted_wall": time.time()}) + "\n",
        encoding="utf-8",
    )
    return job, script


# -- following the job from the login node ------------------------------------------------------


class _Lines:
    """New complete JSON lines of a file that another node appends to."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.buf = path, 0, ""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self.pos)
                data = fh.read()
                self.pos = fh.tell()
        except OSError:
            return []
        self.buf += data
        *lines, self.buf = self.buf.split("\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def follow(job: str, run_dir: Path, plan: Plan, console: Console, poll: float = 2.0) -> dict:
    """Follow the job until it has left the queue; the run's summary, or one line why not."""
    rd = RunDir(run_dir)
    events = _Lines(rd.events())
    rounds = plan.federation.rounds
    shown, silent_since = "", None
    while True:
        try:
            entry = client.queue([job]).get(job)
            silent_since = None
        except client.SlurmUnavailable as exc:
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since > UNREACHABLE_LIMIT_S:
                raise TeeflError(
                    f"Slurm has not answered for {UNREACHABLE_LIMIT_S / 60:.0f} min ({exc}); "
                    f"job {job} may still run: see {run_dir}"
                ) from None
            time.sleep(poll)
            continue
        for ev in events.read():
            if ev.get("what") == "round_closed" and ev.get("round"):
                console.print(f"  round {ev['round']}/{rounds} closed", highlight=False)
        if entry is None:
            break
        state = entry.state
        if state == "PENDING" and entry.reason not in ("None", ""):
            state += f" ({entry.reason})"
        elif state == "RUNNING":
            state += f" on {entry.nodes}"
        if state != shown:
            console.print(f"job {job}: {state}", highlight=False)
            shown = state
        time.sleep(poll)
    log = rd.slurm_dir / f"job-{job}.out"
    info = client.job_info(job) or {}
    # a job that ran to its end may show its last files late on this node; one cancelled while
    # it waited has none to show
    ran = info.get("JobState") in (None, "COMPLETED", "FAILED")
    deadline = time.monotonic() + (FILES_GRACE_S if ran else 0.0)
    while True:
        run = rd.read()
        summary = rd.summary
        if run.get("status") == "completed" and summary.is_file():
            return json.loads(summary.read_text(encoding="utf-8"))
        if run.get("status") not in (None, "starting", "running") or time.monotonic() > deadline:
            break
        time.sleep(min(poll, 1.0))
    state = info.get("JobState", "gone")
    why = run.get("error") or _last_error(log) or f"Slurm job {job} {state}"
    raise TeeflError(
        f"federation {run_dir.name} did not complete (job {job} {state}, run "
        f"{run.get('status', 'not started')}): {why} (job output: {log})"
    )


def _last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errors = [ln.strip() for ln in lines if ln.strip().startswith("error:")]
    return errors[-1].removeprefix("error:").strip() if errors else None


# -- inside the job -----------------------------------------------------------------------------


def place(
    collaborators: list[str],
    nodes: list[str],
    tasks: list[int],
    aggregator_node: str | None = None,
) -> dict[str, str]:
    """Process name -> node: the aggregator on task 0's node (or ``aggregator_node``), the i-th
    collaborator on the next task's node, as Slurm laid the tasks out (``tasks`` per node)."""
    slots = [node for node, count in zip(nodes, tasks, strict=False) for _ in range(count)]
    slots = slots or list(nodes)
    if aggregator_node is not None:
        if aggregator_node not in nodes:
            raise TeeflError(
                f"the aggregator's node {aggregator_node} is not in the job's nodes "
                f"({', '.join(nodes)})"
            )
        first = slots.index(aggregator_node) if aggregator_node in slots else None
        agg = aggregator_node
        if first is not None:
            slots.pop(first)
    else:
        agg = slots.pop(0)
    slots = slots or [agg]
    out = {"aggregator": agg}
    for i, name in enumerate(collaborators):
        out[f"collaborator-{name}"] = slots[i % len(slots)]
    return out


def launch_in_allocation(
    run_dir: Path,
    *,
    cpus_per_task: int = 1,
    overlap: bool = False,
    aggregator_node: str | None = None,
    host_template: str = "{node}",
    srun_options: list[str] | None = None,
    data_dir: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """``teefl slurm launch``: run the federation of RUN_DIR/plan.yaml on this job's tasks."""
    from teefl.federation.launcher import launch
    from teefl.federation.report import finish_run, print_summary
    from teefl.plan import load_plan, require_transport

    console = console or Console(highlight=False)
    run_dir = run_dir.resolve()
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise TeeflError("teefl slurm launch runs inside a Slurm job (SLURM_JOB_NODELIST unset)")
    client.require("srun", "scontrol")
    plan = load_plan(RunDir(run_dir).plan)
    nodes = client.hostnames(nodelist)
    tasks = client.tasks_per_node(os.environ.get("SLURM_TASKS_PER_NODE", "1"))
    where = place(plan.collaborators, nodes, tasks, aggregator_node)
    host = aggregator_host(host_template, where["aggregator"])
    # the host collaborators dial is known only now, inside the allocation
    plan = with_overrides(
        plan,
        {"network.host": host, "network.listen": plan.network.listen or "0.0.0.0"},
        "the allocation's",
    )
    require_transport(plan)
    check_certificate(plan, host)
    console.print(
        f"placement: aggregator on {where['aggregator']} (collaborators dial {host}), "
        + ", ".join(
            f"{p.removeprefix('collaborator-')} on {n}"
            for p, n in where.items()
            if p != "aggregator"
        ),
    )

    def srun(process: str, argv: list[str]) -> list[str]:
        return [
            "srun",
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={where[process]}",
            f"--cpus-per-task={cpus_per_task}",
            "--overlap" if overlap else "--exact",
            f"--job-name={process}",
            *(srun_options or []),
            *argv,
        ]

    launch(
        plan, run_dir, run_dir.name, data_dir=data_dir, console=console, progress=False, wrap=srun
    )
    summary = finish_run(run_dir)
    print_summary(summary, console, run_dir)
    return summary
