"""Everything a plan needs for mtls, in one idempotent call: the CA (if missing), the
aggregator's certificate for every host collaborators dial, one certificate per collaborator, and
the plan's ``security:`` block pointing at them."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teefl.errors import TeeflError
from teefl.security.certificates import (
    COLLABORATOR_DIR,
    Purpose,
    aggregator_paths,
    ca_paths,
    check_certificate,
    check_validity,
    collaborator_paths,
    covers_host,
    load_ca,
    load_certificate,
)
from teefl.security.crl import crl_path
from teefl.security.pki import KeyType, init_ca, issue_aggregator, issue_collaborator

if TYPE_CHECKING:
    from teefl.plan import Plan

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """localhost or a loopback address: such a plan runs on one machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class PlanPki:
    """Where `issue_for_plan` put things, and what it created versus kept."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_dir: Path
    crl: Path | None = None  # the CA's revocation list, when `revoke` made one
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    def security_yaml(self, relative_to: Path | None = None) -> str:
        """The ``security:`` block for the plan (paths relative to the plan's directory, as
        `teefl.plan` resolves them, so the plan and its pki/ can be moved together)."""

        def rel(p: Path) -> str:
            if relative_to is None:
                return str(p)
            try:
                return os.path.relpath(p.resolve(), Path(relative_to).resolve())
            except ValueError:  # another drive (Windows)
                return str(p.resolve())

        import yaml

        tls = {
            "ca": rel(self.ca),
            "server_cert": rel(self.server_cert),
            "server_key": rel(self.server_key),
            "client_dir": rel(self.client_dir),
        }
        if self.crl is not None:
            tls["crl"] = rel(self.crl)
        block = {"security": {"transport": "mtls", "tls": tls}}
        return yaml.safe_dump(block, sort_keys=False, default_flow_style=False)


def plan_hosts(plan: Plan) -> list[str]:
    """Names the aggregator certificate must cover for ``plan``: the host collaborators dial, and
    for a single-machine plan the usual loopback spellings too (localhost vs 127.0.0.1 is the most
    common way to get a host-name mismatch)."""
    hosts = [plan.network.host]
    if is_loopback(plan.network.host):
        hosts += [h for h in _LOOPBACK_NAMES if h != plan.network.host]
    return hosts


def _usable_leaf(
    cert_path: Path, key_path: Path, ca_path: Path, purpose: Purpose, hosts: list[str]
) -> str | None:
    """None when an existing certificate can be kept, else why not."""
    try:
        cert = check_certificate(cert_path, ca_path=ca_path, key_path=key_path, purpose=purpose)
    except TeeflError as exc:
        return str(exc)
    missing = [h for h in hosts if not covers_host(cert, h)]
    if missing:
        return f"certificate {cert_path} does not cover host {', '.join(map(repr, missing))}"
    return None


def issue_for_plan(
    plan: Plan,
    directory: Path,
    *,
    days: int = 365,
    force: bool = False,
    key_type: KeyType = "ec",
) -> PlanPki:
    """Everything ``plan`` needs for mtls: CA (if missing), aggregator and collaborator certs.

    Idempotent so it can be re-run after adding a collaborator to the plan: certificates that
    exist and still fit (signed by this CA, valid, right usage, covering the hosts) are kept; one
    that does not fit is an error unless ``force``, which re-issues the aggregator and collaborator
    certificates. ``force`` never replaces an existing CA: that would invalidate certificates
    already copied to other machines -- use ``teefl pki init --force`` for that deliberately.
    """
    directory = Path(directory)
    result = PlanPki(
        directory=directory,
        ca=ca_paths(directory)[0],
        server_cert=aggregator_paths(directory)[0],
        server_key=aggregator_paths(directory)[1],
        client_dir=directory / COLLABORATOR_DIR,
        crl=crl_path(directory) if crl_path(directory).exists() else None,
    )
    ca_cert, ca_key = ca_paths(directory)
    if ca_cert.exists() or ca_key.exists():
        load_ca(directory)  # fails clearly on half a CA or a mismatched key
        check_validity(load_certificate(ca_cert), ca_cert)
        result.kept.append(ca_cert)
    else:
        result.created.append(init_ca(directory, key_type=key_type))

    hosts = plan_hosts(plan)
    leaves: list[tuple[tuple[Path, Path], Purpose, list[str], Any]] = [
        (
            aggregator_paths(directory),
            "server",
            hosts,
            lambda f: issue_aggregator(directory, hosts, days=days, force=f),
        )
    ]
    for name in plan.collaborators:
        leaves.append(
            (
                collaborator_paths(directory, name),
                "client",
                [],
                lambda f, n=name: issue_collaborator(directory, n, days=days, force=f),
            )
        )
    # Decide for every leaf first, so a refusal does not leave a half-issued set behind.
    todo = []
    for (cert_path, key_path), purpose, need_hosts, issue in leaves:
        if force or not (cert_path.exists() or key_path.exists()):
            todo.append(issue)
            continue
        problem = _usable_leaf(cert_path, key_path, ca_cert, purpose, need_hosts)
        if problem is not None:
            raise TeeflError(f"{problem}; pass --force to re-issue it")
        result.kept.append(cert_path)
    for issue in todo:
        result.created.append(issue(True))
    return result
