"""The `teefl` command: a thin Typer app that parses, calls into the packages and prints.

Each command group lives in `teefl.commands.<group>` and registers itself on the app, so the CLI
module stays small and imports of heavy packages (torch, grpc) happen only in the command that
needs them -- `teefl report` on a laptop never loads torch.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import typer

from teefl.commands import analysis, bench, federation, keys, model, pki, slurm, tee, workload
from teefl.errors import TeeflError

app = typer.Typer(
    name="teefl",
    help="Confidential federated learning, with the cost of every protection measured.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (federation, pki, tee, model, keys, analysis, bench, workload, slurm):
    module.register(app)


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2.

    ``kill -USR1 <pid>`` makes a party that seems stuck print every thread's stack to its stderr
    (its log) and go on: the one way to see where a long federation waits without stopping it."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        # without standalone mode, Typer returns (not raises) the exit code of typer.Exit and
        # of Ctrl-C: pass it on, or an interrupted run would exit 0
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except TeeflError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # usage errors arrive here with standalone_mode=False
        show = getattr(exc, "show", None)
        code = getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):  # a click/typer usage exception
            show()
            sys.exit(code)
        raise


if __name__ == "__main__":
    main()
