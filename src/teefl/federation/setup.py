"""Run-time set-up of a plan's transport for `teefl run --transport ...`.

Why throwaway certificates: a user trying mtls on one machine should not have to run a PKI first.
When the plan configures no certificates, a fresh CA and leaf certificates are issued into the run
directory (and the user is told so); configured certificates are always used as they are.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from teefl.plan import Plan


def issue_throwaway_pki(plan: Plan, run_dir: Path, console: Console) -> None:
    """Issue a fresh CA and certificates into ``run_dir/pki`` and point the plan at them."""
    from teefl.rundir import RunDir
    from teefl.security.plan_pki import issue_for_plan

    pki = issue_for_plan(plan, RunDir(run_dir).pki_dir)
    tls = plan.security.tls
    tls.ca, tls.server_cert, tls.server_key = pki.ca, pki.server_cert, pki.server_key
    tls.client_dir = pki.client_dir
    console.print(
        f"no certificates configured: issued a throwaway CA and certificates for this run into "
        f"{pki.directory} (use `teefl pki plan` for a real deployment)"
    )
