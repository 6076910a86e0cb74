"""teefl bench in network namespaces: separate network stacks, a capped link, full cleanup.

Needs root and iproute2; everything lives in namespaces named tfl-<pid>-... on a private subnet
that exists only inside them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedutil import SYNTHETIC, teefl

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2",
    ),
]


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return sorted(ln.split()[0] for ln in out.stdout.splitlines() if ln.strip())


def _links() -> list[str]:
    out = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    return sorted(ln.split()[0] for ln in out.stdout.splitlines() if ln.strip())


def _ours() -> list[str]:
    return [n for n in _netns() if n.startswith(f"tfl-{os.getpid()}-")]


def test_topology_is_removed_after_an_error() -> None:
    from teefl.bench.netns import Topology

    before_ns, before_links = _netns(), _links()
    topo = Topology(["a", "b"], bandwidth="50mbit", subnet="10.213.7.0/24")
    with pytest.raises(RuntimeError), topo:
        assert len(_ours()) == 4  # hub, aggregator, 2 collaborators
        assert topo.wrap("collaborator-b", ["true"])[:3] == ["ip", "netns", "exec"]
        raise RuntimeError("crash in the middle of a study")
    assert _netns() == before_ns and _links() == before_links


def test_cleanup_removes_leftovers_of_dead_runners() -> None:
    from teefl.bench.netns import cleanup_leftovers

    name = "tfl-99999999-test-hub"  # pid beyond pid_max: its creator is certainly gone
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed, _kept = cleanup_leftovers()
        assert name in removed
        assert name not in _netns()
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.mark.slow
def test_bench_in_namespaces_with_a_bandwidth_cap(tmp_path: Path) -> None:
    before_ns, before_links = _netns(), _links()
    base = copy.deepcopy(SYNTHETIC)
    base["collaborators"] = 2
    base["federation"] = {"rounds": 1}
    data = {
        "name": "netns",
        "base": base,
        "axes": {"transport": ["tls"], "repeats": 1},
        "network": {"mode": "netns", "bandwidth": "50mbit", "subnet": "10.213.9.0/24"},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    res = teefl(
        "bench", "s.yaml", "--out", "out", "--no-report", "--no-progress", cwd=tmp_path, timeout=180
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "capped at 50mbit" in res.stdout
    cell = tmp_path / "out" / "small_cnn-synthetic-tls-r1"
    assert json.loads((cell / "run.json").read_text())["status"] == "completed"
    plan = yaml.safe_load((cell / "plan.yaml").read_text())
    assert plan["network"]["host"] == "10.213.9.1"  # the aggregator's namespace address
    rec = json.loads((cell / "bench.json").read_text())
    net = rec["network"]
    assert net["mode"] == "netns" and net["bandwidth"] == "50mbit"
    assert net["parties"]["aggregator"]["ip"] == "10.213.9.1"
    log = (cell / "logs" / "aggregator.log").read_text()
    assert "listening on 10.213.9.1:" in log
    assert "joined from ipv4:10.213.9.2:" in log and "joined from ipv4:10.213.9.3:" in log
    # the model went over the namespaces' links: each collaborator received at least one copy
    summary = json.loads((cell / "summary.json").read_text())
    per_col = summary["bytes"]["per_collaborator"]
    for name in ("col1", "col2"):
        got = net["bytes"][f"collaborator-{name}"]["rx"]
        moved = per_col.get(f"collaborator-{name}") or per_col.get(name)
        assert got >= moved["download"] > 0
    # nothing is left behind
    assert _netns() == before_ns
    assert _links() == before_links
