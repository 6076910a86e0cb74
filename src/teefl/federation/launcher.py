"""Start one aggregator and N collaborator processes on this host and watch them.

Why real processes (not threads): each party must own its interpreter, memory and torch threads as
it would on its own host (or inside its own enclave), so the timings mean what they say. The
launcher reads the aggregator's event file to drive progress bars; it never talks gRPC itself.
How a signal stops it: `teefl.federation.stopsignals`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from teefl.errors import TeeflError
from teefl.federation.stopsignals import stop
from teefl.plan import Plan
from teefl.rundir import AGGREGATOR, RUN_LOCK, RunDir, collaborator_process
from teefl.writable import writable_dir

POLL_S = 0.1


def new_run_id(name: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(2)}"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: str
    procs: list[Proc] = field(default_factory=list)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + t for t in text[-lines:])


class _EventTail:
    """Incrementally reads new complete lines of a JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.buf = path, 0, ""

    def read(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self.pos)
                data = fh.read()
                self.pos = fh.tell()
        except FileNotFoundError:
            return []
        self.buf += data
        *lines, self.buf = self.buf.split("\n")
        out = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


def _spawn(
    name: str,
    argv: list[str],
    log: Path,
    env: dict[str, str],
    wrap: Callable[[str, list[str]], list[str]] | None,
    procs: list[Proc],
) -> Proc:
    """Start one party in its own session and add it to ``procs`` (which the clean-up stops)."""
    if wrap is not None:
        argv = wrap(name, argv)  # may take long (gramine-sgx-sign): signals act at once here
    from teefl.runfiles import append_private, private_dir

    private_dir(log.parent)
    fh = open(append_private(log), "ab")  # noqa: SIM115 - owned by the child for its lifetime
    try:
        with stop.deferred():
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            procs.append(Proc(name, popen, log))
    finally:
        fh.close()
    return procs[-1]


def _gramine(
    plan: Plan, process: str, argv: list[str], run_dir: Path, data_dir: Path | None
) -> list[str]:
    """Start the process natively or under Gramine, as the plan's runtime.launcher says.

    Under Gramine every party gets its own manifest (its arguments are measured into it, and the
    plan, CA, certificates, collateral and the workload's code files as trusted files with their
    hashes); a missing Gramine
    installation fails here, before the process starts, naming the binary.
    """
    launcher = plan.runtime.launcher
    if launcher == "native":
        return argv
    from teefl.security.tee.gramine import wrap_command
    from teefl.workload.datasets import resolve_root
    from teefl.workload.digest import code_paths

    role = "aggregator" if process == "aggregator" else "collaborator"
    sec = plan.security
    tls = sec.tls
    # each party sees only its own key material: a collaborator's enclave never gets the
    # aggregator's key (nor another collaborator's), the aggregator no collaborator's
    certs: list[Path] = [] if tls.ca is None else [tls.ca]
    keys: list[Path] = []
    if role == "aggregator":
        certs += [p for p in (tls.server_cert,) if p is not None]
        keys += [p for p in (tls.server_key,) if p is not None]
        if sec.at_rest.mode == "sealed" and sec.at_rest.key_file is not None:
            keys.append(sec.at_rest.key_file)
        # the client certificate for the owner's key service (the sealing key itself is
        # released into the enclave's memory, never a file)
        certs += [p for p in (sec.at_rest.client_cert,) if p is not None]
        keys += [p for p in (sec.at_rest.client_key,) if p is not None]
    elif tls.client_dir is not None:
        name = process.removeprefix("collaborator-")
        certs.append(tls.client_dir / f"{name}.crt")
        keys.append(tls.client_dir / f"{name}.key")
    collateral = sec.attestation.collateral
    if plan.workload.is_vision:
        roots = resolve_root(plan.dataset.name, plan.dataset.root, data_dir)
    else:  # this party's own data (--data-dir, else workload.data_root/NAME)
        root = plan.workload.data_root
        own = root / process.removeprefix("collaborator-") if root is not None else None
        roots = [p for p in (data_dir or own,) if p is not None]
    data = [d for d in roots if d.is_dir()]
    # the workload's code (the files its digest covers) is trusted: hashed into the manifest,
    # so the enclave's measurement vouches for the code the workload digest names
    code = code_paths(plan.workload.name, plan.workload.base)
    trusted = [*([collateral] if collateral is not None else []), *code]
    return wrap_command(
        launcher,
        argv,
        RunDir(run_dir).gramine_dir,
        role=role,
        name=process,
        plan_path=RunDir(run_dir).plan,
        cert_paths=certs,
        key_paths=keys,
        trusted_paths=trusted,
        data_dirs=data if role == "collaborator" else [],
        run_dir=run_dir,
        threads=plan.training.threads or 1,
        enclave_size=plan.runtime.enclave_size,
        max_threads=plan.runtime.max_threads,
        sign_key=plan.runtime.sign_key,
    )


def _stop_all(procs: list[Proc], sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    for p in procs:
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, sig)
    deadline = time.monotonic() + wait
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait()


def launch(
    plan: Plan,
    run_dir: Path,
    run_id: str,
    *,
    data_dir: Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    startup_timeout: float = 120.0,
    wrap: Callable[[str, list[str]], list[str]] | None = None,
) -> RunResult:
    """Run a whole federation as separate processes; returns once every process has exited.

    ``wrap(process_name, argv) -> argv`` lets a caller start each process differently without a
    launcher of its own -- e.g. `teefl bench` puts every party in its own network namespace
    (``ip netns exec NS ...``). None starts the processes as they are.
    """
    console = console or Console(stderr=True)
    from teefl.strategy.registry import check_plan_strategy

    check_plan_strategy(plan.federation.strategy)  # one line here, not in the aggregator's log

    def spawn_wrap(process: str, argv: list[str]) -> list[str]:
        argv = _gramine(plan, process, argv, run_dir, data_dir)  # innermost: the TEE runtime
        return wrap(process, argv) if wrap is not None else argv

    from teefl.runfiles import private_dir

    writable_dir(run_dir, "run directory")
    private_dir(run_dir)  # the run's files are its owner's alone (docs/security.md)
    with RunDir(run_dir).hold(RUN_LOCK, "teefl run"):  # before anything is written
        return _launch(
            plan, run_dir, run_id, data_dir, console, progress, startup_timeout, spawn_wrap
        )


def _launch(
    plan: Plan,
    run_dir: Path,
    run_id: str,
    data_dir: Path | None,
    console: Console,
    progress: bool,
    startup_timeout: float,
    spawn_wrap: Callable[[str, list[str]], list[str]],
) -> RunResult:
    from teefl.runfiles import write_private

    rd = RunDir(run_dir)
    plan_path = rd.plan
    write_private(plan_path, plan.to_yaml())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "teefl"]
    port_file = rd.port_file
    port_file.unlink(missing_ok=True)
    procs: list[Proc] = []
    result = RunResult(run_id, run_dir, "failed", procs)
    error: str | None = None
    try:
        _spawn(
            "aggregator",
            [
                *base,
                "aggregator",
                "--plan",
                str(plan_path),
                "--run-dir",
                str(run_dir),
                "--run-id",
                run_id,
                "--port-file",
                str(port_file),
            ],
            rd.log(AGGREGATOR),
            env,
            spawn_wrap,
            procs,
        )
        port = _await_port(procs[0], port_file, startup_timeout)
        address = f"{plan.network.host}:{port}"
        # a shared dataset each collaborator takes its shard of (simulation); with the plan's
        # workload.data_root each reads <data_root>/<name> itself, its own data
        extra = []
        if data_dir and plan.workload.data_root is None:
            extra = ["--data-dir", str(data_dir), "--data-mode", "shard"]
        for name in plan.collaborators:
            _spawn(
                collaborator_process(name),
                [
                    *base,
                    "collaborator",
                    "--plan",
                    str(plan_path),
                    "--name",
                    name,
                    "--address",
                    address,
                    "--run-dir",
                    str(run_dir),
                    *extra,
                ],
                rd.log(collaborator_process(name)),
                env,
                spawn_wrap,
                procs,
            )
        _watch(plan, run_dir, procs, console, progress)
        result.status = "completed"
        return result
    except TeeflError as exc:
        error = str(exc)
        raise
    except KeyboardInterrupt:
        result.status = "interrupted"
        console.print("[yellow]interrupted: stopping all processes[/yellow]")
        raise
    finally:
        with stop.deferred():
            _stop_all(procs)
            if result.status != "completed":
                _record_end(plan, run_dir, result.status, error)


def _record_end(plan: Plan, run_dir: Path, status: str, error: str | None) -> None:
    """run.json of a run that did not complete: the aggregator, stopped by our SIGTERM, may have
    written "interrupted" (the run failed or was interrupted whatever it thought); one that had
    to be killed, or never started, wrote no end at all -- then rounds_completed comes from its
    events."""
    rd = RunDir(run_dir)
    info = rd.read()
    if info.get("status") == "completed":
        return
    fields: dict[str, object] = {"status": status, "finished_wall": time.time()}
    if error:
        fields["error"] = error
    if info.get("status") in (None, "starting", "running"):
        fields["rounds_completed"] = min(_rounds_closed(run_dir), plan.federation.rounds)
    rd.update(**fields)


def _rounds_closed(run_dir: Path) -> int:
    """The last round the aggregator's events say it closed (0 if none)."""
    last = 0
    for ev in _EventTail(RunDir(run_dir).events()).read():
        if ev.get("what") == "round_closed" and isinstance(ev.get("round"), int):
            last = max(last, ev["round"])
    return last


def _await_port(agg: Proc, port_file: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            text = port_file.read_text().strip()
            if text:
                return int(text)
        if agg.popen.poll() is not None:
            raise TeeflError(_failure(agg))
        time.sleep(POLL_S)
    raise TeeflError(
        f"the aggregator did not start listening within {timeout:.0f} s (log: {agg.log})"
    )


def _failure(p: Proc) -> str:
    # the child's own one-line error is the most useful thing to show
    lines = _tail(p.log, 40).splitlines()
    errors = [ln.strip() for ln in lines if ln.strip().startswith("error:")]
    if errors:
        return f"{p.name} failed: {errors[-1].removeprefix('error: ')}"
    return f"{p.name} exited with code {p.popen.returncode}; last lines of {p.log}:\n" + "\n".join(
        lines
    )


def _watch(plan: Plan, run_dir: Path, procs: list[Proc], console: Console, show: bool) -> None:
    """Drive progress bars from the aggregator's events until every process has exited.

    A collaborator whose own workload code raised reports the failed round and stops (exit
    code 2). Once the aggregator has recorded that report (``round_failed``) its exit is the
    run going on without it under the quorum rules: one line here, and the run ends when the
    others do. Any other non-zero exit ends the run with one line: the aggregator's reason
    (``run_failed``) where it gave one -- e.g. a failure that leaves no quorum -- else that
    process's own error line."""
    from rich.markup import escape

    rounds, n = plan.federation.rounds, len(plan.collaborators)
    tail = _EventTail(RunDir(run_dir).events())
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
        transient=False,
    )
    tasks: dict[int, int] = {}
    counted_out: set[str] = set()  # processes of collaborators the aggregator counted out
    reason: list[str] = []  # the aggregator's run_failed reason, once it gave one

    def task_for(r: int) -> int:
        if r not in tasks:
            label = "final evaluation" if r > rounds else f"round {r}/{rounds}"
            tasks[r] = bars.add_task(label, total=n, note="updates")
        return tasks[r]

    def read_events() -> None:
        for ev in tail.read():
            what, r = ev.get("what"), ev.get("round")
            if what == "update_accepted" and r:
                bars.advance(task_for(r))
            elif what == "round_closed" and r:
                task_for(r + 1)
            elif what == "refused":
                bars.console.print(
                    f"[red]refused {ev.get('collaborator')}: {ev.get('reason')}[/red]"
                )
            elif what == "round_failed":
                name = str(ev.get("collaborator"))
                counted_out.add(collaborator_process(name))
                line = f"{name}: {ev.get('summary')}"  # printable, bounded: checked on arrival
                bars.console.print(f"[red]{escape(line)}[/red]")
            elif what == "dropped":  # a refused re-attestation: it leaves, the run goes on
                counted_out.add(collaborator_process(str(ev.get("collaborator"))))
                bars.console.print(
                    f"[yellow]dropped {escape(str(ev.get('collaborator')))}: "
                    f"{escape(str(ev.get('reason')))}[/yellow]"
                )
            elif what == "run_failed" and not reason:
                reason.append(str(ev.get("reason")))

    with bars:
        task_for(1)
        while True:
            read_events()
            ended = [(p, p.popen.poll()) for p in procs]
            if any(c not in (None, 0) and p.name not in counted_out for p, c in ended):
                # the aggregator records a report before it answers it (and a reason before
                # it stops): what a process that just exited reported is in its events now
                read_events()
            for p, code in ended:
                if code not in (None, 0) and p.name not in counted_out:
                    raise TeeflError(reason[0] if reason else _failure(p))
            if all(c == 0 or (c is not None and p.name in counted_out) for p, c in ended):
                return
            time.sleep(POLL_S)
