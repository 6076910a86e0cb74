"""Separate hosts on one machine: every party in its own network namespace, joined by a bridge.

Why namespaces: on loopback the aggregator and the collaborators share one kernel socket path with
no link in between, so the cost of moving a 45 MB model is that of a memcpy. In namespaces each
party has its own network stack and a veth link to a bridge, and a tc token bucket (tbf) on each
link (both directions) caps it like a 1 Gb/s or 100 Mb/s network -- the same study then shows how
TLS and the other overheads change from a cluster to a WAN.

Topology (nothing touches the host's own namespace, links or routing table)::

    tfl-<pid>-<tag>-hub : bridge br0, one veth end p<i> per party (tbf egress = traffic to i)
    tfl-<pid>-<tag>-agg : eth0 = <subnet>.1   (the aggregator listens here)
    tfl-<pid>-<tag>-c<i>: eth0 = <subnet>.<i+1>  (tbf egress = traffic from party i)

Everything carries the prefix ``tfl-<pid>-``; `Topology.down` removes it on exit, Ctrl-C,
SIGTERM or an exception (and at interpreter exit as a last resort). After a SIGKILL,
``teefl bench --cleanup-netns`` removes namespaces whose creating process is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from teefl.errors import TeeflError

PREFIX = "tfl-"
_NAME_RE = re.compile(r"^tfl-(\d+)-")
_CMD_TIMEOUT = 20.0


def _run(argv: list[str], what: str, *, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    except FileNotFoundError:
        raise TeeflError(f"{what}: {argv[0]} not found (install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise TeeflError(
            f"{what}: `{' '.join(argv)}` did not finish in {_CMD_TIMEOUT:.0f} s"
        ) from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise TeeflError(f"{what} failed: `{' '.join(argv)}`: {' | '.join(msg[-3:])}")
    return proc


def require_netns(bandwidth: str | None = None) -> None:
    """Fail clearly when this host cannot make network namespaces (not root, no iproute2)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        raise TeeflError("network mode netns needs Linux network namespaces")
    if os.geteuid() != 0:
        raise TeeflError(
            "network mode netns creates network namespaces and needs root: run teefl bench as "
            "root (e.g. sudo), or use network mode loopback"
        )
    if shutil.which("ip") is None:
        raise TeeflError("network mode netns needs the `ip` command (install iproute2)")
    if bandwidth and shutil.which("tc") is None:
        raise TeeflError("a bandwidth cap needs the `tc` command (install iproute2)")


def list_namespaces() -> list[str]:
    """Names of the network namespaces ``ip netns`` knows (any owner)."""
    proc = _run(["ip", "netns", "list"], "listing network namespaces", check=False)
    return [ln.split()[0] for ln in proc.stdout.splitlines() if ln.strip()]


def _pids_in(ns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", ns], f"listing processes in {ns}", check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def _kill_in(ns: str) -> None:
    """Stop what still runs in a namespace of ours (it would keep the namespace alive)."""
    pids = _pids_in(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as gone
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _delete(ns: str) -> None:
    _kill_in(ns)
    _run(["ip", "netns", "delete", ns], f"deleting namespace {ns}", check=False)


def cleanup_leftovers(*, include_live: bool = False) -> tuple[list[str], list[str]]:
    """Delete ``tfl-<pid>-*`` namespaces whose creating process is gone.

    Returns (removed, kept); namespaces of a live teefl process are kept unless ``include_live``.
    """
    removed, kept = [], []
    for ns in list_namespaces():
        m = _NAME_RE.match(ns)
        if not m:
            continue
        if _alive(int(m.group(1))) and not include_live:
            kept.append(ns)
            continue
        _delete(ns)
        removed.append(ns)
    return removed, kept


def tbf_args(rate: str) -> list[str]:
    """tc tbf parameters for ``rate``: a burst of 4 ms at line rate (>= 64 KiB, enough for one
    GSO super-packet on veth) and a 50 ms queue."""
    from teefl.bench.study import rate_bits

    burst = max(64 * 1024, int(rate_bits(rate) / 8 * 0.004))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


@dataclass
class Party:
    process: str  # launcher process name: aggregator, collaborator-<name>
    ns: str
    ip: str
    hub_if: str


class Topology:
    """The namespaces, bridge and links of one study; a context manager that always cleans up."""

    def __init__(
        self,
        collaborators: list[str],
        *,
        subnet: str = "10.213.0.0/24",
        bandwidth: str | None = None,
        tag: str | None = None,
    ) -> None:
        net = ipaddress.ip_network(subnet)
        hosts = list(itertools.islice(net.hosts(), len(collaborators) + 1))
        if len(hosts) < len(collaborators) + 1:
            raise TeeflError(f"subnet {subnet} is too small for {len(collaborators) + 1} parties")
        self.prefix = f"{PREFIX}{os.getpid()}-{tag or secrets.token_hex(2)}-"
        self.subnet, self.prefixlen, self.bandwidth = subnet, net.prefixlen, bandwidth
        self.hub = self.prefix + "hub"
        names = ["aggregator", *(f"collaborator-{c}" for c in collaborators)]
        short = ["agg", *(f"c{i + 1}" for i in range(len(collaborators)))]
        self.parties = {
            proc: Party(proc, self.prefix + s, str(hosts[i]), f"p{i}")
            for i, (proc, s) in enumerate(zip(names, short, strict=True))
        }
        self._up = False

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> Topology:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def namespaces(self) -> list[str]:
        return [self.hub, *(p.ns for p in self.parties.values())]

    def up(self) -> None:
        """Create the hub with its bridge, one namespace and capped veth link per party."""
        require_netns(self.bandwidth)
        atexit.register(self.down)
        self._up = True
        try:
            _run(["ip", "netns", "add", self.hub], "creating the hub namespace")
            hub = ["ip", "-n", self.hub]
            _run([*hub, "link", "add", "br0", "type", "bridge"], "creating the bridge")
            _run([*hub, "link", "set", "br0", "up"], "starting the bridge")
            for p in self.parties.values():
                _run(["ip", "netns", "add", p.ns], f"creating namespace {p.ns}")
                peer = ["peer", "name", "eth0", "netns", p.ns]
                _run(
                    [*hub, "link", "add", p.hub_if, "type", "veth", *peer],
                    f"creating the link of {p.process}",
                )
                _run([*hub, "link", "set", p.hub_if, "master", "br0"], "joining the bridge")
                _run([*hub, "link", "set", p.hub_if, "up"], "starting the hub's link end")
                inner = ["ip", "-n", p.ns]
                _run(
                    [*inner, "addr", "add", f"{p.ip}/{self.prefixlen}", "dev", "eth0"],
                    f"addressing {p.process}",
                )
                _run([*inner, "link", "set", "eth0", "up"], f"starting the link of {p.process}")
                _run([*inner, "link", "set", "lo", "up"], f"starting loopback of {p.process}")
                if self.bandwidth:
                    tbf = tbf_args(self.bandwidth)
                    _run(
                        ["tc", "-n", p.ns, "qdisc", "add", "dev", "eth0", "root", *tbf],
                        f"capping the uplink of {p.process}",
                    )
                    _run(
                        ["tc", "-n", self.hub, "qdisc", "add", "dev", p.hub_if, "root", *tbf],
                        f"capping the downlink of {p.process}",
                    )
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove every namespace of this topology (idempotent; safe from atexit)."""
        if not self._up:
            return
        self._up = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)
        existing = set(list_namespaces())
        for ns in [*(p.ns for p in self.parties.values()), self.hub]:
            if ns in existing:
                _delete(ns)
        for ns in list_namespaces():  # anything else with our prefix (a half-made topology)
            if ns.startswith(self.prefix):
                _delete(ns)

    # -- use -------------------------------------------------------------------------------
    @property
    def aggregator_ip(self) -> str:
        return self.parties["aggregator"].ip

    def wrap(self, process: str, argv: list[str]) -> list[str]:
        """For `teefl.federation.launcher.launch(wrap=...)`: start ``process`` in its namespace."""
        party = self.parties.get(process)
        if party is None:
            raise TeeflError(f"no network namespace for process {process!r}")
        return ["ip", "netns", "exec", party.ns, *argv]

    def link_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes each party has sent (tx) and received (rx) on its link, from the kernel."""
        out: dict[str, dict[str, int]] = {}
        for p in self.parties.values():
            proc = _run(
                ["ip", "-n", p.ns, "-s", "-j", "link", "show", "dev", "eth0"],
                "reading link statistics",
                check=False,
            )
            try:
                stats: dict[str, Any] = json.loads(proc.stdout)[0]["stats64"]
                out[p.process] = {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        return out

    def describe(self) -> dict[str, Any]:
        """What a cell's bench.json records about the network."""
        return {
            "mode": "netns",
            "bandwidth": self.bandwidth,
            "subnet": self.subnet,
            "parties": {k: {"namespace": p.ns, "ip": p.ip} for k, p in self.parties.items()},
        }
