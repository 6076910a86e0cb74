"""Run-time set-up of a plan's transport for `teefl run --transport ...`.

Why throwaway certificates: a user trying mtls on one machine should not have to run a PKI first.
When the plan configures no certificates, a fresh CA and leaf certificates are issued into the run
directory (and the user is told so); configured certificates are always used as they are.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from teefl.errors import TeeflError
from teefl.plan import Plan


def apply_transport(plan: Plan, transport: str, run_dir: Path, console: Console) -> None:
    """Set ``security.transport``; issue throwaway certificates into the run dir if none exist."""
    if transport not in ("none", "tls", "mtls"):
        raise TeeflError(f"--transport must be none, tls or mtls (got {transport!r})")
    tls = plan.security.tls
    if transport != "none" and tls.ca is None:
        from teefl.security.pki import issue_for_plan

        pki = issue_for_plan(plan, run_dir / "pki")
        tls.ca, tls.server_cert, tls.server_key = pki.ca, pki.server_cert, pki.server_key
        tls.client_dir = pki.client_dir
        console.print(
            f"no certificates configured: issued a throwaway CA and certificates for this run "
            f"into {pki.directory} (use `teefl pki plan` for a real deployment)"
        )
    plan.security.transport = transport  # type: ignore[assignment]
