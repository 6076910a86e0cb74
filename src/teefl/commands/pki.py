"""CLI commands: ``teefl pki init|issue|show|plan`` -- the certificates for tls/mtls transports.

The heavy lifting is in `teefl.security.pki`; this module only parses options and prints. Its
imports of ``cryptography`` happen inside the commands so ``teefl --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

pki_app = typer.Typer(
    name="pki",
    help="Certificates for the tls/mtls transports: a CA, the aggregator, the collaborators.",
    no_args_is_help=True,
)

DaysOpt = Annotated[int, typer.Option("--days", min=1, help="Validity in days.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing files.")]


def _console() -> Any:
    from rich.console import Console

    # No markup/emoji interpretation of our data: a fingerprint's ":AB:" must not become an emoji.
    return Console(highlight=False, emoji=False)


def _split(values: list[str] | None) -> list[str]:
    """``--aggregator a,b --aggregator c`` -> [a, b, c]."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


@pki_app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="PKI directory to create.")],
    key_type: Annotated[
        Literal["ec", "rsa"], typer.Option("--key-type", help="ec (P-384) or rsa (3072 bits).")
    ] = "ec",
    days: DaysOpt = 3650,
    force: ForceOpt = False,
) -> None:
    """Create a CA (DIR/ca.crt, DIR/ca.key). Keep ca.key on the machine that issues certificates."""
    from teefl.security import certificates, pki

    cert = pki.init_ca(directory, key_type=key_type, days=days, force=force)
    info = certificates.describe_certificate(cert)
    out = _console()
    for line in (
        f"created CA {cert} and {certificates.ca_paths(directory)[1]} (mode 0600)",
        f"  subject     {info['subject']}",
        f"  valid until {certificates.format_time(info['not_after'])}",
        f"  SHA-256     {info['fingerprint_sha256']}",
    ):
        out.print(line, markup=False, soft_wrap=True)


@pki_app.command("issue")
def issue(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="PKI directory with the CA.")],
    aggregator: Annotated[
        list[str] | None,
        typer.Option(
            "--aggregator",
            metavar="HOST[,HOST...]",
            help="Issue the aggregator certificate for these host names / IP addresses.",
        ),
    ] = None,
    collaborator: Annotated[
        list[str] | None,
        typer.Option(
            "--collaborator",
            metavar="NAME[,NAME...]",
            help="Issue a client certificate with CN=NAME (DIR/collaborators/NAME.crt).",
        ),
    ] = None,
    key_service: Annotated[
        list[str] | None,
        typer.Option(
            "--key-service",
            metavar="HOST[,HOST...]",
            help="Issue the key service's server certificate (DIR/key-service.crt) for these "
            "hosts (teefl keys serve).",
        ),
    ] = None,
    key_client: Annotated[
        list[str] | None,
        typer.Option(
            "--key-client",
            metavar="NAME[,NAME...]",
            help="Issue a client certificate for the key service with CN=NAME "
            "(DIR/key-clients/NAME.crt; the aggregator's is 'aggregator').",
        ),
    ] = None,
    days: DaysOpt = 365,
    force: ForceOpt = False,
) -> None:
    """Issue the aggregator's server certificate and/or collaborators' client certificates (and
    those of the owner's key service and its clients)."""
    from teefl.errors import TeeflError
    from teefl.security import certificates, pki

    hosts, names = _split(aggregator), _split(collaborator)
    service_hosts, key_clients = _split(key_service), _split(key_client)
    if not (hosts or names or service_hosts or key_clients):
        raise TeeflError(
            "nothing to issue: give --aggregator HOST[,HOST...], --collaborator NAME, "
            "--key-service HOST or --key-client NAME"
        )
    out = _console()
    if hosts:
        cert = pki.issue_aggregator(directory, hosts, days=days, force=force)
        sans = ", ".join(certificates.describe_certificate(cert)["sans"])
        out.print(f"issued {cert} for {sans}", markup=False, soft_wrap=True)
    for name in names:
        cert = pki.issue_collaborator(directory, name, days=days, force=force)
        out.print(f"issued {cert} (CN={name})", markup=False, soft_wrap=True)
    if service_hosts:
        cert = pki.issue_aggregator(
            directory, service_hosts, days=days, force=force, name=certificates.KEY_SERVICE
        )
        sans = ", ".join(certificates.describe_certificate(cert)["sans"])
        out.print(f"issued {cert} for {sans}", markup=False, soft_wrap=True)
    for name in key_clients:
        cert = pki.issue_key_client(directory, name, days=days, force=force)
        out.print(f"issued {cert} (CN={name})", markup=False, soft_wrap=True)


@pki_app.command("revoke")
def revoke(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="PKI directory with the CA.")],
    names: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[NAME...]", help="Collaborators whose current certificate is revoked."
        ),
    ] = None,
    aggregator: Annotated[
        bool, typer.Option("--aggregator", help="Revoke the aggregator's current certificate.")
    ] = False,
    serial: Annotated[
        list[str] | None,
        typer.Option("--serial", metavar="HEX", help="Revoke a certificate by serial number."),
    ] = None,
    days: DaysOpt = 365,
) -> None:
    """Add certificates to DIR/ca.crl (signed by the CA); without arguments, refresh the list.

    Revoke before re-issuing (``teefl pki issue DIR --collaborator NAME --force``): the old
    certificate is then refused wherever the plan names the list (security.tls.crl).
    """
    from teefl.errors import TeeflError
    from teefl.security import certificates, crl

    certs = [certificates.collaborator_paths(directory, n)[0] for n in _split(names)]
    if aggregator:
        certs.append(certificates.aggregator_paths(directory)[0])
    serials = []
    for value in _split(serial):
        try:
            serials.append(int(value.replace(":", ""), 16))
        except ValueError:
            raise TeeflError(f"--serial {value!r} is not a hexadecimal serial number") from None
    path, added = crl.revoke(directory, certificates=certs, serials=serials, days=days)
    out = _console()
    for number in added:
        out.print(f"revoked serial {number:x}", markup=False, soft_wrap=True)
    out.print(
        f"wrote {path} ({len(added)} added); the plan names it as security.tls.crl -- copy it "
        "to the aggregator host (and to collaborators, which check the aggregator's endorsement "
        "against it)",
        markup=False,
        soft_wrap=True,
    )


@pki_app.command("show")
def show(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A PEM certificate.")],
) -> None:
    """Print what a certificate says: names, usages, validity, fingerprint."""
    from rich.table import Table
    from rich.text import Text

    from teefl.security import certificates

    info = certificates.describe_certificate(file)
    status_style = {"valid": "green"}.get(info["status"], "red")
    table = Table(title=str(file), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("subject", info["subject"]),
        ("issuer", info["issuer"]),
        ("CA", "yes" if info["is_ca"] else "no"),
        ("SANs", ", ".join(info["sans"]) or "-"),
        ("EKU", ", ".join(info["eku"]) or "-"),
        ("not before", certificates.format_time(info["not_before"])),
        ("not after", certificates.format_time(info["not_after"])),
        ("key", info["key_type"]),
        ("serial", info["serial"]),
        ("SHA-256", info["fingerprint_sha256"]),
    ]
    for label, value in rows:
        # Text(), not a str: certificate fields are data and must not be parsed as rich markup.
        table.add_row(label, Text(value))
    table.add_row("status", Text(info["status"], style=status_style))
    _console().print(table)


@pki_app.command("plan")
def plan(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan YAML.")],
    directory: Annotated[
        Path | None, typer.Option("--dir", help="PKI directory (default: <plan dir>/pki).")
    ] = None,
    days: DaysOpt = 365,
    force: ForceOpt = False,
) -> None:
    """Issue everything PLAN needs for mtls and print the ``security:`` block to paste into it.

    Re-running after adding collaborators issues only the missing certificates.
    """
    from teefl.plan import load_plan
    from teefl.security import plan_pki

    the_plan = load_plan(plan_path)
    plan_dir = plan_path.resolve().parent
    directory = directory if directory is not None else plan_dir / "pki"
    result = plan_pki.issue_for_plan(the_plan, directory, days=days, force=force)
    out = _console()
    for p in result.created:
        out.print(f"created {p}", markup=False, soft_wrap=True)
    for p in result.kept:
        out.print(f"kept    {p}", markup=False, soft_wrap=True)
    out.print(
        f"\n# paste into {plan_path} (paths are relative to the plan's directory):", markup=False
    )
    out.print(result.security_yaml(relative_to=plan_dir), markup=False, soft_wrap=True, end="")
    out.print(
        f"\n# aggregator host: {result.server_cert}, {result.server_key}, {result.ca}"
        f"\n# collaborator NAME's host: {result.ca}, "
        f"{result.client_dir}/NAME.crt and NAME.key (never copy ca.key)",
        markup=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add this group's commands to the teefl app."""
    app.add_typer(pki_app, name="pki")
