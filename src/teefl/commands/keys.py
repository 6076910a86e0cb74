"""CLI commands: ``teefl keys serve`` -- the model owner's key service.

Kept thin: the service is `teefl.security.keys.service`, its configuration
`teefl.security.keys.config`; both are imported inside the command so ``teefl --help`` stays
fast.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(
    help="The model owner's key service: secrets released only to attested parties.",
    no_args_is_help=True,
)


@keys_app.command("serve")
def serve(
    config: Annotated[
        Path, typer.Argument(metavar="KEYS.yaml", help="The owner's key service configuration.")
    ],
    listen: Annotated[
        str | None, typer.Option("--listen", metavar="HOST:PORT", help="Override `listen`.")
    ] = None,
    port_file: Annotated[
        Path | None, typer.Option("--port-file", help="Write the bound port here once serving.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Serve the owner's secrets (sealing key, parties' TLS keys) over mTLS: each goes only to a
    party whose TEE evidence verifies under the owner's policy, bound to its request. Every
    release and refusal is written to the audit log. Runs until SIGTERM or Ctrl-C."""
    from teefl.security.keys.config import load_config
    from teefl.security.keys.service import KeyServer

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    cfg = load_config(config)
    if listen is not None:
        cfg.listen = listen
    server = KeyServer(cfg)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        if port_file is not None:
            tmp = port_file.with_name(f".{port_file.name}.tmp")
            tmp.write_text(f"{server.port}\n", encoding="ascii")
            tmp.replace(port_file)
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    logging.getLogger("teefl.keys").info("key service stopped")


def register(app: typer.Typer) -> None:
    """Add the ``keys`` group to the teefl app."""
    app.add_typer(keys_app, name="keys")
