"""Where the cells of a study run: the seam between the runner and the machines.

The runner (`teefl.bench.runner`) picks the executor (`make_executor`), decides which cells are
to run, prints one line per finished cell, keeps the ETA and ends with the report and the fit.
An executor only turns cells into `CellOutcome`s (`teefl.bench.cell`), in the order they finish:

- `LocalExecutor`: on this host, one cell after another, every party on loopback
- `NetnsExecutor`: the same, every party in its own network namespace (study network mode netns)
- `teefl.bench.slurm.SlurmExecutor`: every cell a Slurm job (a whole federation inside one
  allocation), submitted as a job array and followed with squeue

Why a seam rather than a second runner: resumption (a finished cell is kept), the study copy in
OUT, the cell directories, the progress lines and the report are the same wherever the cells run;
only "run these cells and tell me how each went" differs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from teefl.bench.cell import CellOutcome, run_cell
from teefl.bench.matrix import Cell
from teefl.bench.study import Study
from teefl.errors import TeeflError


@dataclass
class RunContext:
    """What every executor is given for one invocation of ``teefl bench``."""

    study: Study
    out: Path
    data_dir: Path | None
    key_file: Path | None
    #: the progress display's console: lines printed here do not tear the bar
    console: Console
    #: shows what is happening now (the progress bar's description)
    status: Callable[[str], None]


class Executor:
    """Runs cells; the base class is the local executor (this host, loopback)."""

    #: the name in messages and in ``--executor``
    name = "local"
    #: whether this host must be able to run Gramine cells (False where cells run elsewhere)
    checks_launchers = True
    #: set by executors that leave their cells running without following them (slurm --detach)
    detached = False

    def describe(self) -> str | None:
        """Words for the study's header line; None prints nothing (the local executor)."""
        return None

    def check(self) -> None:
        """Fail before anything is written when this executor cannot work here."""

    def interrupted_note(self) -> str:
        return "run the same command again to resume (the interrupted cell is rerun from scratch)"

    def outcomes(self, ctx: RunContext, todo: list[Cell]) -> Generator[CellOutcome, None, None]:
        """Run ``todo`` and yield one outcome per cell as each finishes."""
        yield from self._one_by_one(ctx, todo, None)

    def _one_by_one(
        self, ctx: RunContext, todo: list[Cell], topology: Any
    ) -> Generator[CellOutcome, None, None]:
        for cell in todo:
            ctx.status(cell.name)
            try:
                o = run_cell(
                    ctx.study,
                    cell,
                    ctx.out,
                    data_dir=ctx.data_dir,
                    console=ctx.console,
                    topology=topology,
                    key_file=ctx.key_file,
                )
            except TeeflError as exc:
                o = CellOutcome(cell, "failed", error=str(exc))
            yield o


LocalExecutor = Executor


class NetnsExecutor(Executor):
    """This host, every party in its own network namespace with an optional capped link."""

    name = "netns"

    def __init__(self, study: Study) -> None:
        self.network = study.network

    def check(self) -> None:
        from teefl.bench.netns import require_netns

        require_netns(self.network.bandwidth)

    def outcomes(self, ctx: RunContext, todo: list[Cell]) -> Generator[CellOutcome, None, None]:
        from teefl.bench.netns import Topology, cleanup_leftovers

        if not todo:
            return
        removed, _kept = cleanup_leftovers()
        if removed:
            ctx.console.print(
                f"removed {len(removed)} network namespace(s) left by a killed teefl bench",
                highlight=False,
            )
        base = ctx.study.base_plan_obj()
        topo_cm = Topology(
            base.collaborators, subnet=self.network.subnet, bandwidth=self.network.bandwidth
        )
        with topo_cm as topo:
            ctx.console.print(
                f"network namespaces up: aggregator at {topo.aggregator_ip}, "
                f"{len(topo.parties) - 1} collaborators, links "
                + (f"capped at {topo.bandwidth}" if topo.bandwidth else "unlimited (veth)"),
                highlight=False,
            )
            yield from self._one_by_one(ctx, todo, topo)
